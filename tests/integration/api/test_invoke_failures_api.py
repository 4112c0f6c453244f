"""POST …:invoke with an Idempotency-Key, on its failure paths: whatever failed, a retry with the key gets a sensible
answer at once (the recorded failure replayed, or a fresh run), never a key stuck `running`; both databases."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, event

from tests.integration.api.admin_helpers import audit_rows
from tests.integration.api.conftest import assert_problem
from tests.integration.api.test_invoke_api import MULTIPLE, _invoke, _keyed, _spooled_and_stored, admin, settings

__all__ = ["admin", "settings"]  # fixtures


def _fail_commit_after(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, statement: str, *, went_through: bool = False
) -> list[str]:
    """The next COMMIT after ``statement`` fails as the driver's outage, as each database fails it: SQLite's
    `database is locked` leaves the transaction open (holding the write lock) until its session lets it go;
    PostgreSQL's server has ended it (psycopg's connection is never left in a transaction by a failed COMMIT).
    ``went_through``: the COMMIT committed, and its answer was lost (a connection dying just after it). Returns the
    statements seen."""
    seen: list[str] = []

    def watch(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        seen.append(sql)

    event.listen(engine, "before_cursor_execute", watch)
    monkeypatch.setattr(engine.dialect, "do_commit", _failing_commit(engine, seen, statement, went_through))
    return seen


def _failing_commit(engine: Engine, seen: list[str], statement: str, went_through: bool) -> Any:
    real = engine.dialect.do_commit
    sqlite = engine.dialect.name == "sqlite"
    armed = [True]

    def do_commit(dbapi_connection: Any) -> None:
        if armed and seen and seen[-1].startswith(statement):
            armed.clear()
            if went_through:
                real(dbapi_connection)
            elif not sqlite:
                dbapi_connection.rollback()
            raise (sqlite3.OperationalError if sqlite else psycopg.OperationalError)("the COMMIT failed")
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


@pytest.mark.parametrize("went_through", [False, True])
def test_a_failed_invocations_release_whose_commit_failed_is_done_again(
    client, admin, session_factory, monkeypatch, went_through
):
    """A provider failing without usage: the call is metered, not billed, and the key is released so that a retry
    runs. The release's COMMIT failed (a dropped connection, a lock): the key stayed `running`, so the retry answered
    `idempotency_in_progress` for 15 minutes, then `idempotency_outcome_unknown` ("use a new key") for 24 h, for an
    invocation that cost nothing. It is now done once more on a fresh connection (nothing twice: the audit entry
    only with the release)."""
    down = {"provider": "simulated", "model": "unavailable-model"}
    assert client.put("/v1/admin/purposes/content_rewrite", json=down, headers=admin).status_code == 200
    _fail_commit_after(client.app.state.engine, monkeypatch, "DELETE FROM invoke_requests", went_through=went_through)
    first = assert_problem(_invoke(client, _keyed(admin, "r-1")), 502, "provider_error")
    again = _invoke(client, _keyed(admin, "r-1"))
    assert again.status_code == 502 and again.headers["Idempotent-Replayed"] == "false", again.text
    assert again.json()["event_ids"] != first["event_ids"]  # it ran again
    entries = audit_rows(session_factory, "extension.invoke")
    assert sorted(e.after["invocation_id"] for e in entries) == sorted(
        [first["invocation_id"], again.json()["invocation_id"]]
    )


@pytest.mark.parametrize("went_through", [False, True])
def test_a_failure_after_billed_calls_whose_commit_failed_is_stored_again(
    client, admin, session_factory, monkeypatch, went_through
):
    """A budget refusing the third call after two billed ones: the 429 naming them is stored under the key. Its
    COMMIT failed: the key stayed `running` (the retry: `idempotency_in_progress`, then `idempotency_outcome_unknown`
    for an outcome the first request knew). It is now stored once more on a fresh connection and replayed; one
    audit entry."""
    put = client.put("/v1/admin/budgets/rewrite", json={"max_calls": 2, "mode": "enforce"}, headers=admin)
    assert put.status_code == 200
    _fail_commit_after(client.app.state.engine, monkeypatch, "UPDATE invoke_requests", went_through=went_through)
    params = {"text": "hello", "tone": "casual", "n_variations": 3}
    first = _invoke(client, _keyed(admin, "b-1"), MULTIPLE, **params)
    body = assert_problem(first, 429, "budget_exceeded")
    assert len(body["event_ids"]) == 2
    again = _invoke(client, _keyed(admin, "b-1"), MULTIPLE, **params)
    assert (again.status_code, again.headers["Idempotent-Replayed"], again.json()) == (429, "true", body)
    assert _spooled_and_stored(client, session_factory) == 2
    (entry,) = audit_rows(session_factory, "extension.invoke")
    assert entry.after["invocation_id"] == body["invocation_id"]
