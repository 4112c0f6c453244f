"""Engine settings on PostgreSQL: the session options the usage queries rely on, with the URL's own kept. SQLite: a
pooled connection is never left in a transaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from metering.db.engine import make_engine, make_session_factory


def test_postgresql_sessions_plan_each_query_for_its_values_without_jit(pg_url: str) -> None:
    url = make_url(pg_url).update_query_dict({"options": "-c work_mem=8MB -c jit=on"})
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            settings = [conn.execute(text(f"SHOW {name}")).scalar() for name in ("plan_cache_mode", "work_mem", "jit")]
    finally:
        engine.dispose()
    assert settings == ["force_custom_plan", "8MB", "on"]  # the URL's options come last and win
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW jit")).scalar() == "off"
    finally:
        engine.dispose()


def test_a_sqlite_commit_refused_with_its_transaction_open_is_rolled_back_not_pooled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite may refuse a COMMIT and keep the transaction active (`database is locked` at COMMIT). SQLAlchemy then
    returns the connection to the pool without its rollback-on-return: the idle connection kept the write lock, and
    the next session given it committed the failed transaction's row with its own."""
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    real = engine.dialect.do_commit
    refused: list[bool] = []

    def do_commit(dbapi_connection: Any) -> None:
        if not refused:
            refused.append(True)
            raise sqlite3.OperationalError("database is locked")  # the transaction stays active, as SQLite's
        real(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_commit", do_commit)
    sessions = make_session_factory(engine)
    try:
        with sessions() as session:
            session.execute(text("INSERT INTO t VALUES (1)"))
            with pytest.raises(OperationalError):
                session.commit()
        other = sqlite3.connect(tmp_path / "x.db", timeout=0)  # another writer: not locked out
        other.execute("INSERT INTO t VALUES (3)")
        other.commit()
        other.close()
        with sessions() as session:  # the pooled connection
            session.execute(text("INSERT INTO t VALUES (2)"))
            session.commit()
        with engine.connect() as conn:
            assert sorted(conn.scalars(text("SELECT x FROM t"))) == [2, 3]
    finally:
        engine.dispose()
