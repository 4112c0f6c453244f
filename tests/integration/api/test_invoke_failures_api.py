"""POST …:invoke with an Idempotency-Key, on its failure paths: whatever failed, a retry with the key gets a sensible
answer at once (the recorded failure replayed, or a fresh run), never a key stuck `running`; both databases."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event

from tests.integration.api.conftest import assert_problem
from tests.integration.api.test_invoke_api import _invoke, _keyed, _spooled_and_stored, admin, settings

__all__ = ["admin", "settings"]  # fixtures


def _fail_commit_after(engine: Engine, monkeypatch: pytest.MonkeyPatch, statement: str) -> list[str]:
    """The next COMMIT after ``statement`` fails as the driver's outage, as each database fails it: SQLite's
    `database is locked` leaves the transaction open (holding the write lock) until its session lets it go;
    PostgreSQL's server has ended it (psycopg's connection is never left in a transaction by a failed COMMIT).
    Returns the statements seen."""
    seen: list[str] = []

    def watch(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        seen.append(sql)

    event.listen(engine, "before_cursor_execute", watch)
    monkeypatch.setattr(engine.dialect, "do_commit", _failing_commit(engine, seen, statement))
    return seen


def _failing_commit(engine: Engine, seen: list[str], statement: str) -> Any:
    real = engine.dialect.do_commit
    sqlite = engine.dialect.name == "sqlite"
    armed = [True]

    def do_commit(dbapi_connection: Any) -> None:
        if armed and seen and seen[-1].startswith(statement):
            armed.clear()
            if sqlite:
                raise sqlite3.OperationalError("database is locked")
            dbapi_connection.rollback()
            raise psycopg.OperationalError("the connection was lost during COMMIT")
        real(dbapi_connection)

    return do_commit


def test_a_claim_whose_commit_failed_is_let_go_before_it_is_released(
    client, admin, session_factory, monkeypatch, caplog
):
    """The claim's COMMIT failed (it may have gone through on a dropped connection): the request releases the claim
    on a fresh connection. It did so while its own failed transaction was still open: on SQLite that transaction
    holds the database's write lock, so the release (and every other writer: the flusher, other requests) waited
    out the busy timeout, and the release failed."""
    engine = client.app.state.engine
    _fail_commit_after(engine, monkeypatch, "INSERT INTO invoke_requests")
    with caplog.at_level(logging.WARNING, logger="metering.api"):
        assert_problem(_invoke(client, _keyed(admin, "c-1")), 503, "database_unavailable")
    assert not [r.getMessage() for r in caplog.records if "could not release" in r.getMessage()]
    retry = _invoke(client, _keyed(admin, "c-1"))
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "false", retry.text
    assert _spooled_and_stored(client, session_factory) == 1
