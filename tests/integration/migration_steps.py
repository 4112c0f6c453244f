"""The two halves of a downgrade refusal test: the downgrade refused and the database left as it was (still at its
revision: the whole run is one transaction), then, the blocking rows deleted, the same downgrade going through."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from metering.db import migrate
from metering.db.engine import make_engine


def revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return migrate.current_revision(engine)
    finally:
        engine.dispose()


def count(url: str, table: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def assert_refused(url: str, to: str, match: str, *, at: str = "head") -> None:
    """Downgrading to ``to`` raises the refusal ``match`` finds, and the database is still at ``at``."""
    with pytest.raises(RuntimeError, match=match):
        migrate.downgrade(url, to)
    assert revision(url) == (migrate.head_revision(url) if at == "head" else at)


def delete_then_downgrade(url: str, to: str, *deletes: str) -> None:
    """Run the ``deletes`` (one transaction), then downgrade to ``to``: it goes through."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for statement in deletes:
                conn.execute(text(statement))
    finally:
        engine.dispose()
    migrate.downgrade(url, to)
    assert revision(url) == (None if to == "base" else to)
