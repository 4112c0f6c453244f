"""Reading a row to change it: locked, so what the change replaces (an audit entry's ``before``) is what it replaces.

Read plainly, then changed, a row another transaction was changing at the same moment is read as it was before
that change, and overwritten once that change commits: an audit entry then records, as what it replaced, a value
the row no longer held (the entries of two changes do not chain). ``get_for_update`` (one row) and
``for_update`` (a query) wait for such a change first: ``SELECT … FOR UPDATE`` on PostgreSQL; on SQLite the database
write lock, taken by a no-op write before reading.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, false, update
from sqlalchemy.orm import Session

Row = TypeVar("Row")


def _sqlite(session: Session) -> bool:
    return session.get_bind().dialect.name == "sqlite"


def _take_sqlite_write_lock(session: Session, model: type[Any]) -> None:
    table = model.__table__
    column = next(iter(table.primary_key.columns))
    session.execute(update(table).where(false()).values({column.name: column}))  # a no-op write: the write lock


def get_for_update(session: Session, model: type[Row], key: Any) -> Row | None:
    """``session.get(model, key)``, read after any concurrent change of the row has committed, and locked (the row on
    PostgreSQL, the database on SQLite) until this transaction ends."""
    if _sqlite(session):
        _take_sqlite_write_lock(session, model)
        return session.get(model, key, populate_existing=True)
    return session.get(model, key, with_for_update=True, populate_existing=True)


def for_update(session: Session, stmt: Select[Any], model: type[Any]) -> Select[Any]:
    """``stmt`` (rows of ``model``) made to lock what it reads until this transaction ends: ``FOR UPDATE`` on
    PostgreSQL; on SQLite the database write lock, taken now."""
    if _sqlite(session):
        _take_sqlite_write_lock(session, model)
        return stmt.execution_options(populate_existing=True)
    return stmt.with_for_update().execution_options(populate_existing=True)
