"""Withdrawing a price override scheduled by mistake: ended at its start, an empty window that prices nothing.

Before, ``…:end`` refused any ``at`` at or before the start ("end it after that") and overrides are never deleted: an
override added with next month's start, or a wrong pattern, could not be taken back and priced every matching call
from that moment. Now ``…:withdraw`` (and ``…:end`` at ``effective_from``, and the CLI's ``overrides withdraw``)
leaves [from, from): nothing prices with it (ingest, reprice, re-rate, quotes), it stays listed, audited
``price_override.withdraw``, a retry changes nothing. Billed events it priced refuse it unless kept (then re-rated).
SQLite and PostgreSQL; the race with an ingest pricing with it, PostgreSQL (SQLite: the write lock serialises them).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from metering.auth import Scope
from metering.billing.ingest import ingest
from metering.billing.overrides import add_override, withdraw
from metering.billing.reprice import reprice_held
from metering.billing.rerate import apply_rerate
from metering.db.models import UsageEventRow
from metering.errors import OverridePricedEventsError
from metering.events import event_from_record
from tests.fakes.events import record
from tests.integration.api.admin_helpers import audit_rows
from tests.integration.api.conftest import assert_problem, bearer
from tests.integration.test_price_book_races import (
    MARKUP,
    change_while_pricing,
    ollama,
    override,
    wait_for_an_advisory_waiter,
)

START = datetime(2026, 12, 1, tzinfo=UTC)  # next month, by mistake
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture
def admin(make_token):
    return bearer(make_token(Scope.ADMIN, name="ops-admin"))


@pytest.fixture
def reader(make_token):
    return bearer(make_token(Scope.READ))


def scheduled(client, admin, id: str = "ovr_dec", start: str = "2026-12-01T00:00:00Z", **body) -> None:
    body = {"id": id, "provider": "ollama", "model_pattern": "llama3*", "effective_from": start, "input_mtok": "0.10",
            "output_mtok": "0.40", **body}  # fmt: skip
    assert client.post("/v1/admin/price-overrides", json=body, headers=admin).status_code == 201


def test_an_override_scheduled_by_mistake_is_withdrawn_before_it_starts(client, admin, reader, session_factory):
    scheduled(client, admin)
    withdrawn = client.post("/v1/admin/price-overrides/ovr_dec:withdraw", headers=admin)
    assert withdrawn.status_code == 200, withdrawn.text
    body = withdrawn.json()
    assert body["effective_from"] == body["effective_to"] == "2026-12-01T00:00:00Z"
    assert body["events_to_rerate"] is None and body["withdrawn"] is True
    (entry,) = audit_rows(session_factory, "price_override.withdraw")
    assert (entry.target, entry.before["effective_to"], entry.after["effective_to"]) == (
        "price_override:ovr_dec", None, "2026-12-01T00:00:00Z"
    )  # fmt: skip
    again = client.post("/v1/admin/price-overrides/ovr_dec:withdraw", json={}, headers=admin)  # a retry
    assert again.status_code == 200 and again.json() == body
    same = client.post("/v1/admin/price-overrides/ovr_dec:end", json={"at": "2026-12-01T00:00:00Z"}, headers=admin)
    assert same.status_code == 200 and same.json() == body
    assert len(audit_rows(session_factory, "price_override.withdraw")) == 1 and (
        audit_rows(session_factory, "price_override.end") == []
    )
    later = client.post("/v1/admin/price-overrides/ovr_dec:end", json={"at": "2026-12-02T00:00:00Z"}, headers=admin)
    assert "is withdrawn" in assert_problem(later, 422, "invalid_input")["detail"]  # never reopened
    assert_problem(client.post("/v1/admin/price-overrides/nope:withdraw", headers=admin), 404, "not_found")

    # still listed (it is never deleted), active at no moment, and no price anywhere
    listed = client.get("/v1/admin/price-overrides", headers=admin).json()
    assert [(o["id"], o["withdrawn"]) for o in listed] == [("ovr_dec", True)]
    for moment in ("2026-12-01T00:00:00Z", "2026-12-15T00:00:00Z"):
        active = client.get("/v1/admin/price-overrides", params={"active_at": moment}, headers=admin)
        assert active.status_code == 200 and active.json() == []
    params = {"provider": "ollama", "model": "llama3.1", "input_tokens": 1000, "at": "2026-12-01T00:00:00Z"}
    assert_problem(client.get("/v1/prices/quote", params=params, headers=reader), 404, "unpriced_model")
    with session_factory() as session:  # an event at its start is held, not priced with it (nor a failing ingest)
        event = event_from_record(record(0, provider="ollama", model="llama3.1", occurred_at=START))
        ingest(session, [event], markup_pct=MARKUP, now=START)
        assert reprice_held(session, markup_pct=MARKUP, now=START).priced == 0
        session.commit()
        assert session.get(UsageEventRow, event.event_id).billing_status == "unpriced"


def test_ending_it_at_its_start_is_withdrawing_it_and_before_its_start_is_refused(client, admin, session_factory):
    scheduled(client, admin)
    before = client.post("/v1/admin/price-overrides/ovr_dec:end", json={"at": "2026-11-30T00:00:00Z"}, headers=admin)
    assert "at its start withdraws it" in assert_problem(before, 422, "invalid_input")["detail"]
    assert client.get("/v1/admin/price-overrides", headers=admin).json()[0]["withdrawn"] is False
    at_start = client.post("/v1/admin/price-overrides/ovr_dec:end", json={"at": "2026-12-01T01:00:00+01:00"},
                           headers=admin)  # fmt: skip
    assert at_start.status_code == 200 and at_start.json()["effective_to"] == "2026-12-01T00:00:00Z"
    assert [e.action for e in audit_rows(session_factory)] == ["price_override.add", "price_override.withdraw"]
    # one with an end already (ended early by mistake too) is withdrawn likewise
    scheduled(client, admin, id="ovr_q", start="2026-10-01T00:00:00Z", effective_to="2026-11-01T00:00:00Z")
    ended = client.post("/v1/admin/price-overrides/ovr_q:withdraw", json={"keep_priced_events": False}, headers=admin)
    assert ended.status_code == 200 and ended.json()["effective_to"] == "2026-10-01T00:00:00Z"
    # adding an override with an empty window is still refused: it would price nothing
    empty = {"effective_to": "2026-12-01T00:00:00Z"}
    refused = client.post(
        "/v1/admin/price-overrides",
        json={"id": "x", "provider": "ollama", "model_pattern": "m", "effective_from": "2026-12-01T00:00:00Z",
              "input_mtok": "1", "output_mtok": "1", **empty},
        headers=admin,
    )  # fmt: skip
    assert "effective_to must be after" in assert_problem(refused, 422, "invalid_input")["detail"]


def test_a_started_override_that_billed_events_is_withdrawn_only_kept_then_re_rated(client, admin, session_factory):
    """A negotiated Sonnet price added by mistake billed two calls; withdrawing it names them (409), withdrawing it
    with keep_priced_events says what to re-rate, and that re-rate bills them at genai-prices' price again."""
    scheduled(client, admin, id="ovr_sonnet", start="2026-11-01T00:00:00Z", provider="anthropic",
              model_pattern="claude-sonnet-4-6", input_mtok="1", output_mtok="5")  # fmt: skip
    with session_factory() as session:
        events = [event_from_record(record(i, occurred_at=NOW - timedelta(hours=i))) for i in (1, 2)]
        ingest(session, events, markup_pct=MARKUP, now=NOW)
        session.commit()
        assert {session.get(UsageEventRow, e.event_id).price_version for e in events} == {"ovr_sonnet"}
    refused = assert_problem(
        client.post("/v1/admin/price-overrides/ovr_sonnet:withdraw", headers=admin), 409, "override_priced_events"
    )
    assert "priced 2 billed event(s)" in refused["detail"]
    assert audit_rows(session_factory, "price_override.withdraw") == []
    kept = client.post("/v1/admin/price-overrides/ovr_sonnet:withdraw", json={"keep_priced_events": True},
                       headers=admin)  # fmt: skip
    assert kept.status_code == 200, kept.text
    assert kept.json()["events_to_rerate"]["billed"] == 2
    assert kept.json()["events_to_rerate"]["first_occurred_at"] == "2026-11-27T10:00:00Z"
    assert kept.json()["events_to_rerate"]["last_occurred_at"] == "2026-11-27T11:00:00Z"
    assert len(audit_rows(session_factory, "price_override.withdraw")) == 1

    with session_factory() as session:
        result = apply_rerate(session, start=NOW - timedelta(hours=2), end=NOW - timedelta(hours=1, microseconds=-1),
                              markup_pct=MARKUP, run_id="withdrawn", now=NOW)  # fmt: skip
        session.commit()
        assert result.diff.total.events == 2
        rows = session.scalars(select(UsageEventRow)).all()
        assert {(r.billing_status, r.price_source) for r in rows} == {("billed", "genai-prices")}
    after = client.post("/v1/admin/price-overrides/ovr_sonnet:withdraw", headers=admin)  # a retry, nothing left
    assert after.status_code == 200 and after.json()["events_to_rerate"] is None


def test_the_cli_withdraws_audited_once(session_factory, db_url, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from metering.cli.billing_ledger import register

    app = typer.Typer()
    register(app)
    monkeypatch.setenv("METERING_DATABASE_URL", db_url)
    monkeypatch.setenv("METERING_DATA_DIR", str(tmp_path))
    with session_factory() as session:
        add_override(session, provider="ollama", model_pattern="llama3*", effective_from=START, effective_to=None,
                     input_mtok=Decimal("0.1"), output_mtok=Decimal("0.4"), id="ovr_dec", now=NOW)  # fmt: skip
        session.commit()
    runner = CliRunner()
    for _ in range(2):  # the second changes nothing
        out = runner.invoke(app, ["overrides", "withdraw", "ovr_dec"])
        assert out.exit_code == 0, out.output
        assert '"effective_to": "2026-12-01T00:00:00Z"' in out.output and '"withdrawn": true' in out.output
    assert [e.action for e in audit_rows(session_factory)] == ["price_override.withdraw"]
    missing = runner.invoke(app, ["overrides", "withdraw", "nope"])
    assert missing.exit_code == 1 and "no price override with id 'nope'" in missing.output
    assert "withdraw" in runner.invoke(app, ["overrides", "--help"]).output


def test_a_withdrawal_waits_for_an_ingest_pricing_with_the_override_and_counts_its_events(
    session_factory: sessionmaker[Session], monkeypatch, backend
):
    """An ingest has read the price book (the override) and not committed when the override is withdrawn: the
    withdrawal waits for it (the price book's lock), then finds its event billed by the override and refuses, naming
    it; kept, it says to re-rate it. Counted before the ingest committed, the withdrawal would have said nothing."""
    if backend != "postgresql":
        return  # SQLite: the ingest holds the database write lock from before it reads the prices; so does this
    with session_factory() as session:
        override(session, "llamas", "llama3*", "0.10", "0.40")
        session.commit()
    refusals: list[OverridePricedEventsError] = []

    def ingest_priced() -> None:
        with session_factory() as session:
            ingest(session, [ollama(0)], markup_pct=MARKUP, now=datetime(2026, 11, 27, 12, 30, tzinfo=UTC))
            session.commit()

    def withdraw_it() -> None:
        with session_factory() as session:
            try:
                withdraw(session, "llamas")
            except OverridePricedEventsError as exc:
                refusals.append(exc)

    change_while_pricing(session_factory, monkeypatch, ingest_priced, withdraw_it, lambda: None)
    assert len(refusals) == 1 and "priced 1 billed event(s)" in str(refusals[0])
    with session_factory() as session:
        ending = withdraw(session, "llamas", keep_priced_events=True)
        session.commit()
    assert ending.changed and ending.priced_beyond.billed == 1


@pytest.mark.parametrize("edge", [":withdraw", ":end"])
def test_the_api_ending_an_override_as_the_cli_ends_it_does_not_deadlock(client, admin, session_factory, backend, edge):
    """The API's `:end` and `:withdraw` (and the CLI's `end` and `withdraw`) locked the override's row first, to
    snapshot it for the audit, then took the price book's lock in `overrides.end`; an end elsewhere takes the price
    book's lock, then the row (its UPDATE). At once, each waited for the other: PostgreSQL failed one with a deadlock.
    They now take the price book's lock first (`overrides.get_for_change`). (SQLite: the write lock, taken first.)"""
    if backend != "postgresql":
        return
    import threading

    from metering.billing import store
    from metering.billing.overrides import end_override

    scheduled(client, admin)
    answers: list[Any] = []
    body = {"at": "2026-12-05T00:00:00Z"} if edge == ":end" else None
    with session_factory() as ending:
        store.lock_price_book(ending, change=True)  # an end elsewhere has the price book's lock...
        worker = threading.Thread(
            target=lambda: answers.append(
                client.post(f"/v1/admin/price-overrides/ovr_dec{edge}", json=body, headers=admin)
            )
        )
        worker.start()
        wait_for_an_advisory_waiter(session_factory, worker.is_alive)  # until the request waits for it
        end_override(ending, "ovr_dec", datetime(2026, 12, 10, tzinfo=UTC))  # ...and now updates the row
        ending.commit()
    worker.join(30)
    assert not worker.is_alive() and [a.status_code for a in answers] == [200], [a.text for a in answers]
    expected = "2026-12-05T00:00:00Z" if edge == ":end" else "2026-12-01T00:00:00Z"
    assert answers[0].json()["effective_to"] == expected
