"""Alembic environment: the URL comes from the caller (metering.db.migrate) or from settings."""

from __future__ import annotations

from sqlalchemy import Connection, text

from alembic import context
from metering.config import get_settings
from metering.db.engine import make_engine, normalise_url
from metering.db.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return normalise_url(config.attributes.get("url") or get_settings().resolved_database_url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


# How long a run waits on SQLite for the write lock another run (or a writer) holds. The engine's busy_timeout
# (10 s) is shorter than a long migration (~20 s from 0001 with 1M events): the second run gave up, 'database is
# locked'. PostgreSQL's advisory lock waits as long as it takes.
SQLITE_LOCK_WAIT_MS = 3_600_000


def _one_at_a_time(conn: Connection) -> None:
    """Begin the one transaction the whole run takes, holding a lock no other run gets meanwhile: two processes
    migrating at once (replicas starting, a command run while ``serve`` migrates) then run one after the other,
    and the second finds the database at head; both read the version first and the second failed ('already
    exists'). PostgreSQL: a transaction-level advisory lock; SQLite: the database write lock (BEGIN IMMEDIATE),
    waited for up to ``SQLITE_LOCK_WAIT_MS`` (this connection only: the engine is disposed after the run)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('metering:migrations'))"))
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
    try:
        with engine.connect() as conn:
            _one_at_a_time(conn)  # alembic runs in this transaction (it sees it begun) and we commit it
            context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
