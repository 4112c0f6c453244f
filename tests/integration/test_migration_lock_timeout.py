"""A migration waiting for a table another transaction holds (a long export's read, an open psql session) queues
every later query on that table behind it: it gives up after ``lock_timeout_s`` instead, changing nothing and
naming the table. Two runs at once still wait for each other (the advisory lock is waited for without a limit)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from metering.db import migrate
from metering.db.engine import make_engine
from metering.errors import MigrationLockTimeoutError


def _postgresql_only(url: str) -> None:
    if not url.startswith("postgresql"):
        pytest.skip("SQLite has no table locks: a migration takes the database write lock (readers in WAL go on)")


def _upgrade_in_a_thread(url: str, *, lock_timeout_s: float) -> tuple[threading.Thread, list[BaseException]]:
    """An upgrade to head, in a thread not yet started, and the list its error (if any) lands in."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            migrate.upgrade(url, lock_timeout_s=lock_timeout_s)
        except BaseException as e:  # checked by the caller
            errors.append(e)

    return threading.Thread(target=run), errors


def test_a_migration_gives_up_on_a_table_another_transaction_holds_and_changes_nothing(fresh_url: str) -> None:
    _postgresql_only(fresh_url)
    migrate.upgrade(fresh_url, "0011")
    engine = make_engine(fresh_url)
    migration, errors = _upgrade_in_a_thread(fresh_url, lock_timeout_s=0.2)
    try:
        with engine.connect() as reader:  # a long export of user_usage_daily, its read transaction open
            reader.execute(text("SELECT count(*) FROM user_usage_daily"))
            migration.start()
            migration.join(timeout=60)  # without a lock_timeout it waits as long as the reader: stalled
            stalled = migration.is_alive()
            if stalled:
                reader.commit()  # let it end
                migration.join(timeout=120)
            assert not stalled, "the migration waited for the reader (and queued every query on the table)"
            assert len(errors) == 1 and isinstance(errors[0], MigrationLockTimeoutError), errors
            message = errors[0].message
            assert "another transaction holds a lock on user_usage_daily" in message, message
            assert "retry" in message and "nothing was changed" in message, message
            assert migrate.current_revision(engine) == "0011"
            reader.commit()
        migrate.upgrade(fresh_url, lock_timeout_s=0.2)  # nothing holds it now
        assert migrate.current_revision(engine) == migrate.head_revision(fresh_url)
    finally:
        engine.dispose()


def test_a_run_waits_for_another_run_beyond_the_lock_timeout(fresh_url: str) -> None:
    """The advisory lock of the run before it is not subject to lock_timeout: the second run waits, then finds the
    database at head (a replica started meanwhile never fails because another one migrates)."""
    _postgresql_only(fresh_url)
    migrate.upgrade(fresh_url, "0011")
    engine = make_engine(fresh_url)
    migration, errors = _upgrade_in_a_thread(fresh_url, lock_timeout_s=0.1)
    try:
        with engine.connect() as other_run, engine.connect() as server:
            other_run.execute(text("SELECT pg_advisory_xact_lock(hashtext('metering:migrations'))"))
            migration.start()
            waiting = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'")
            while not server.execute(waiting).scalar():
                server.commit()
                assert migration.is_alive(), errors
                time.sleep(0.05)
            time.sleep(1)  # ten times the lock_timeout: it must still be waiting, not failed
            assert migration.is_alive(), errors
            other_run.commit()
            migration.join(timeout=120)
        assert errors == []
        assert migrate.current_revision(engine) == migrate.head_revision(fresh_url)
    finally:
        engine.dispose()
