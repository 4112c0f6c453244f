"""Text compared by code point on both databases, as Python compares it.

SQLite compares text by its bytes (BINARY: UTF-8 bytes sort as code points); PostgreSQL by the database's collation,
which may follow a language (``en_US.UTF-8``, an ICU locale: ``ann, Ann, Bob`` where code points give
``Ann, Bob, ann``). Its "C" collation compares by code point. An index built in the database's collation does not
serve an ORDER BY in "C": use it where the rows are sorted anyway (groups, unions), not for a keyset on an index.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement
from sqlalchemy.orm import QueryableAttribute, Session


def by_code_point(session: Session, column: ColumnElement[Any] | QueryableAttribute[Any]) -> ColumnElement[Any]:
    """``column`` (text) compared and ordered by code point: PostgreSQL's "C" collation, SQLite's default as it is."""
    element = column.expression if isinstance(column, QueryableAttribute) else column
    if session.get_bind().dialect.name != "postgresql":
        return element
    return element.collate("C")
