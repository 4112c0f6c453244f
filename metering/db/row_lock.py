"""Reading a row to change it: locked, so what the change replaces (an audit entry's ``before``) is what it replaces.

Read plainly, then changed, a row another transaction was changing at the same moment is read as it was before
that change, and overwritten once that change commits: an audit entry then records, as what it replaced, a value
the row no longer held (the entries of two changes do not chain). ``get_for_update`` (one row) and
``for_update`` (a query) wait for such a change first: ``SELECT … FOR UPDATE`` on PostgreSQL; on SQLite the database
write lock, taken by a no-op write before reading.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, text
from sqlalchemy.orm import Session

Row = TypeVar("Row")


def lock_sqlite_for_write(session: Session) -> None:
    """SQLite: take the database write lock now (a no-op write; it holds to commit), so nothing another writer
    commits can change what this transaction reads next. Without it, reads run before the first write see the
    database as it was then, and a writer that waited for the lock would write from that stale view.
    PostgreSQL: nothing (its writers lock rows, or advisory locks, instead)."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("UPDATE invoices SET status = status WHERE 1 = 0"))


def get_for_update(session: Session, model: type[Row], key: Any) -> Row | None:
    """``session.get(model, key)``, read after any concurrent change of the row has committed, and locked (the row on
    PostgreSQL, the database on SQLite) until this transaction ends."""
    if session.get_bind().dialect.name == "sqlite":
        lock_sqlite_for_write(session)
        return session.get(model, key, populate_existing=True)
    return session.get(model, key, with_for_update=True, populate_existing=True)


def for_update(session: Session, stmt: Select[Any]) -> Select[Any]:
    """``stmt`` (rows of a model) made to lock what it reads until this transaction ends: ``FOR UPDATE`` on
    PostgreSQL; on SQLite the database write lock, taken now."""
    if session.get_bind().dialect.name == "sqlite":
        lock_sqlite_for_write(session)
        return stmt.execution_options(populate_existing=True)
    return stmt.with_for_update().execution_options(populate_existing=True)
