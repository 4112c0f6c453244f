"""Alembic environment: the URL comes from the caller (metering.db.migrate) or from settings."""

from __future__ import annotations

import io
import re
import sys
from typing import TextIO

from alembic.util import CommandError
from sqlalchemy import Connection, make_url, text
from sqlalchemy.exc import DBAPIError

from alembic import context
from metering.config import get_settings
from metering.db.engine import make_engine, normalise_url
from metering.db.migration_locks import is_lock_timeout, lock_timeout_error, lock_timeout_sql
from metering.db.migration_script import NotScriptable
from metering.db.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return normalise_url(config.attributes.get("url") or get_settings().resolved_database_url)


class _Script(io.TextIOBase):
    """The script being printed; remembers the step it is at (alembic prints ``-- Running <step>, <doc>``)."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.step = out, ""

    def write(self, s: str) -> int:
        if step := re.match(r"-- Running (\w+) (\w*) -> (\w*)", s):
            self.step = f"{step[1]} {step[2] or 'base'} -> {step[3] or 'base'}"
        return self.out.write(s)

    def flush(self) -> None:
        self.out.flush()


def run_migrations_offline() -> None:
    """``--sql``: print the script. A step it cannot hold (see ``metering.db.migration_script``; on SQLite a table
    rebuilt in batch mode, which reads the table from the database) fails with one line naming the step."""
    url = _url()
    script = _Script(config.output_buffer or sys.stdout)
    context.configure(
        url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=True, output_buffer=script
    )
    try:
        with context.begin_transaction():
            context.run_migrations()
    except (NotScriptable, CommandError) as exc:
        if not script.step:  # not in a step: alembic's own error as it was
            raise
        why = str(exc)
        if "cannot proceed in --sql mode" in why:
            why = "it rebuilds a table (batch mode), reading the table's definition from the database"
        dialect = "PostgreSQL" if make_url(url).get_backend_name() == "postgresql" else "SQLite"
        raise CommandError(
            f"cannot render {script.step} for {dialect} offline (--sql): {why}; run that step online instead "
            "(alembic without --sql, or metering migrate to upgrade, on the database); the script printed is incomplete"
        ) from exc


# How long a run waits on SQLite for the write lock another run (or a writer) holds. The engine's busy_timeout
# (10 s) is shorter than a long migration (~20 s from 0001 with 1M events): the second run gave up, 'database is
# locked'. PostgreSQL's advisory lock waits as long as it takes.
SQLITE_LOCK_WAIT_MS = 3_600_000


def _lock_timeout_s() -> float:
    """``metering.db.migrate``'s ``lock_timeout_s``, else ``METERING_MIGRATION_LOCK_TIMEOUT_S``."""
    given = config.attributes.get("lock_timeout_s")
    return float(given) if given is not None else get_settings().migration_lock_timeout_s


def _one_at_a_time(conn: Connection, lock_timeout_s: float) -> None:
    """Begin the one transaction the whole run takes, holding a lock no other run gets meanwhile: two processes
    migrating at once (replicas starting, a command run while ``serve`` migrates) then run one after the other,
    and the second finds the database at head; both read the version first and the second failed ('already
    exists'). PostgreSQL: a transaction-level advisory lock, waited for as long as it takes (whatever the server's
    own lock_timeout), then ``lock_timeout_s`` for every statement of the run (``metering.db.migration_locks``);
    SQLite: the database write lock (BEGIN IMMEDIATE), waited for up to ``SQLITE_LOCK_WAIT_MS`` (this connection
    only: the engine is disposed after the run)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(lock_timeout_sql(0))
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('metering:migrations'))"))
        conn.exec_driver_sql(lock_timeout_sql(lock_timeout_s))
    else:
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {SQLITE_LOCK_WAIT_MS}")
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    lock_timeout_s = _lock_timeout_s()
    try:
        with engine.connect() as conn:
            _one_at_a_time(conn, lock_timeout_s)  # alembic runs in this transaction (it sees it begun); we commit it
            context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
    except DBAPIError as exc:
        if is_lock_timeout(exc):
            raise lock_timeout_error(exc.statement, lock_timeout_s) from exc
        raise
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
