"""Rows written the old way: plain inserts into a table as an earlier revision created it (reflected from the
database, never today's models or ingest), and rows read back in one form on both backends.

SQLite keeps moments as naive UTC text and UUIDs as 32 hex digits: ``insert`` converts them as the ORM of the time
did; ``rows`` gives moments back as naive UTC and UUIDs as hex, whatever the backend.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, MetaData, Table, select, text
from sqlalchemy.engine import make_url

from metering.db import migrate
from metering.db.engine import make_engine

# A server in local time, half an hour off UTC: an upgrade that truncated a moment to its hour or date in the
# session's time zone instead of UTC would put rows in the wrong bucket (PostgreSQL only; SQLite has no zone).
PG_TIME_ZONE = "Asia/Kolkata"


@contextmanager
def at_revision(url: str, revision: str) -> Iterator[Engine]:
    """The database upgraded to ``revision`` (PostgreSQL: its sessions in ``PG_TIME_ZONE``), and an engine on it."""
    if url.startswith("postgresql"):
        engine = make_engine(url)
        with engine.connect() as conn:
            conn.execute(text(f"ALTER DATABASE \"{make_url(url).database}\" SET timezone TO '{PG_TIME_ZONE}'"))
            conn.commit()
        engine.dispose()
    migrate.upgrade(url, revision)
    engine = make_engine(url)
    try:
        if url.startswith("postgresql"):
            with engine.connect() as conn:
                assert conn.execute(text("SHOW timezone")).scalar() == PG_TIME_ZONE
        yield engine
    finally:
        engine.dispose()


def _stored(value: Any, sqlite: bool) -> Any:
    """A value as the ORM bound it; a naive moment is UTC (never the PostgreSQL session's zone)."""
    if sqlite and isinstance(value, uuid.UUID):
        return value.hex
    if isinstance(value, datetime):
        utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return utc.replace(tzinfo=None) if sqlite else utc
    return value


def insert(engine: Engine, table_name: str, rows: Sequence[dict[str, Any]]) -> None:
    """Insert complete rows (every column of the table as it is now, no more) with a plain INSERT."""
    table = Table(table_name, MetaData(), autoload_with=engine)
    columns = {c.name for c in table.columns}
    sqlite = engine.dialect.name == "sqlite"
    for row in rows:
        assert set(row) == columns, f"{table_name}: {set(row) ^ columns}"
    with engine.begin() as conn:
        conn.execute(table.insert(), [{k: _stored(v, sqlite) for k, v in row.items()} for row in rows])


def _read(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return value.hex
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def rows(engine: Engine, table_name: str) -> list[dict[str, Any]]:
    """Every row of the table (reflected), in primary key order, as plain values (see the module doc)."""
    engine.dispose()  # a new connection sees the schema the migration left
    table = Table(table_name, MetaData(), autoload_with=engine)
    order = list(table.primary_key.columns) or list(table.columns)
    with engine.connect() as conn:
        return [{k: _read(v) for k, v in row._mapping.items()} for row in conn.execute(select(table).order_by(*order))]


def naive(moment: datetime) -> datetime:
    """A moment as ``rows`` gives it back: naive UTC."""
    return moment.astimezone(UTC).replace(tzinfo=None)
