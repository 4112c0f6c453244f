"""Ending a price override before events it priced: refused unless the admin keeps them (and then re-rates).

An override for llama3* priced events at 10:00 and 11:00 (a late one arrives after the end is decided, or the end is
put in the past). Ending it at 10:30 used to answer 200 and say nothing: the 11:00 event kept a price that, by the
override's own window, no longer applied when it occurred, and nothing told the admin to re-rate it. Now the end is
409 ``override_priced_events`` naming the events and the re-rate, and with ``keep_priced_events`` it is done and the
answer says which events to re-rate. SQLite and PostgreSQL (the CLI: test_billing_ledger_cli.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy.orm import Session, sessionmaker

from metering.auth import Scope
from metering.billing.ingest import ingest
from metering.billing.overrides import add_override, end
from metering.billing.rerate import apply_rerate
from metering.db.models import UsageEventRow
from metering.errors import OverridePricedEventsError
from metering.events import event_from_record
from tests.fakes.events import record
from tests.integration.api.admin_helpers import audit_rows
from tests.integration.api.conftest import assert_problem, bearer

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
MARKUP = Decimal(20)


@pytest.fixture
def admin(make_token):
    return bearer(make_token(Scope.ADMIN, name="ops-admin"))


def priced_by_llamas(session_factory: sessionmaker[Session], *hours: int, byollm: tuple[int, ...] = ()) -> None:
    """Override ``llamas`` (llama3*, from Nov 1) and events of llama3.1 at these hours of NOW's day, priced by it."""
    with session_factory() as session:
        add_override(session, provider="ollama", model_pattern="llama3*", effective_from=datetime(2026, 11, 1,
                     tzinfo=UTC), effective_to=None, input_mtok=Decimal("0.10"), output_mtok=Decimal("0.40"),
                     id="llamas", now=NOW)  # fmt: skip
        hours_byollm = [(hour, False) for hour in hours] + [(hour, True) for hour in byollm]
        events = [
            event_from_record(
                record(i, provider="ollama", model="llama3.1", is_byollm=is_byollm, occurred_at=NOW.replace(hour=hour))
            )
            for i, (hour, is_byollm) in enumerate(hours_byollm)
        ]
        ingest(session, events, markup_pct=MARKUP, now=NOW)
        session.commit()


def test_an_end_before_events_the_override_priced_is_refused_naming_them(client, admin, session_factory):
    priced_by_llamas(session_factory, 10, 11, byollm=(11,))
    at = {"at": "2026-11-27T10:30:00Z"}
    refused = assert_problem(
        client.post("/v1/admin/price-overrides/llamas:end", json=at, headers=admin), 409, "override_priced_events"
    )
    assert "priced 1 billed event(s) and 1 BYOLLM event(s)" in refused["detail"]
    assert (
        "metering billing rerate --from 2026-11-27T11:00:00+00:00 --to 2026-11-27T11:00:00.000001+00:00"
        in (refused["detail"])
    )
    assert client.get("/v1/admin/price-overrides", headers=admin).json()[0]["effective_to"] is None  # unchanged
    assert audit_rows(session_factory, "price_override.end") == []

    kept = client.post("/v1/admin/price-overrides/llamas:end", json={**at, "keep_priced_events": True}, headers=admin)
    assert kept.status_code == 200, kept.text
    assert kept.json()["effective_to"] == "2026-11-27T10:30:00Z"
    assert kept.json()["events_to_rerate"] == {
        "billed": 1,
        "byollm": 1,
        "first_occurred_at": "2026-11-27T11:00:00Z",
        "last_occurred_at": "2026-11-27T11:00:00Z",
        "rerate": "metering billing rerate --from 2026-11-27T11:00:00+00:00 --to 2026-11-27T11:00:00.000001+00:00 "
        "--model 'llama3*'",
    }
    assert len(audit_rows(session_factory, "price_override.end")) == 1
    again = client.post("/v1/admin/price-overrides/llamas:end", json=at, headers=admin)  # a retry: nothing changes
    assert again.status_code == 200 and again.json() == kept.json()
    assert len(audit_rows(session_factory, "price_override.end")) == 1

    with session_factory() as session:  # the successor's price, and the re-rate it names: they are priced again
        add_override(session, provider="ollama", model_pattern="llama3*", effective_from=NOW.replace(hour=10,
                     minute=30), effective_to=None, input_mtok=Decimal("0.20"), output_mtok=Decimal("0.80"),
                     id="llamas-2", now=NOW)  # fmt: skip
        result = apply_rerate(session, start=NOW.replace(hour=11), end=NOW.replace(hour=11, microsecond=1),
                              markup_pct=MARKUP, run_id="after-end", now=NOW)  # fmt: skip
        session.commit()
    assert (result.diff.total.events, result.diff.shadow.events) == (1, 1)
    after = client.post("/v1/admin/price-overrides/llamas:end", json=at, headers=admin)
    assert after.status_code == 200 and after.json()["events_to_rerate"] is None


def test_an_end_after_every_billed_event_it_priced_needs_no_acknowledgement(client, admin, session_factory):
    """BYOLLM shadow costs past the end (reporting, never billed) do not refuse it; the answer names them."""
    priced_by_llamas(session_factory, 10, 11, byollm=(12,))
    ended = client.post("/v1/admin/price-overrides/llamas:end", json={"at": "2026-11-27T11:00:01Z"}, headers=admin)
    assert ended.status_code == 200, ended.text
    assert ended.json()["events_to_rerate"]["billed"] == 0 and ended.json()["events_to_rerate"]["byollm"] == 1
    bad = {"at": "2026-11-27T10:00:00Z", "keep_priced_events": "yes"}  # a JSON boolean, nothing that reads like one
    assert_problem(
        client.post("/v1/admin/price-overrides/llamas:end", json=bad, headers=admin), 422, "validation_error"
    )


def test_the_refusal_changes_nothing_in_the_callers_transaction(session_factory):
    """Refused before the window changes: a caller that goes on (and commits) has not ended it."""
    priced_by_llamas(session_factory, 10, 11)
    with session_factory() as session:
        with pytest.raises(OverridePricedEventsError, match="priced 2 billed event"):
            end(session, "llamas", NOW.replace(hour=9))
        session.commit()
    with session_factory() as session:
        ending = end(session, "llamas", NOW.replace(hour=9), keep_priced_events=True)
        session.commit()
    assert ending.changed and ending.priced_beyond.billed == 2
    assert ending.priced_beyond.first == NOW.replace(hour=10) and ending.priced_beyond.last == NOW.replace(hour=11)


def test_events_re_rated_at_the_same_charge_no_longer_name_the_ended_override(client, admin, session_factory):
    """The re-rate an end names, when the price now in effect (a successor at the same price, or genai-prices) gives
    the same charge, changed nothing: each event still named the ended override as its price although its window no
    longer covered it, so the end's answer (and any later end or withdrawal, 409 without keep_priced_events) still
    listed them to re-rate, and no re-rate could clear them. It now names the price it comes from (no transfer)."""
    priced_by_llamas(session_factory, 10, 11, byollm=(11,))
    at = {"at": "2026-11-27T10:30:00Z", "keep_priced_events": True}
    kept = client.post("/v1/admin/price-overrides/llamas:end", json=at, headers=admin)
    assert kept.status_code == 200 and kept.json()["events_to_rerate"]["billed"] == 1
    with session_factory() as session:  # a successor at the same price, and the re-rate the end named
        add_override(session, provider="ollama", model_pattern="llama3*", effective_from=NOW.replace(hour=10,
                     minute=30), effective_to=None, input_mtok=Decimal("0.10"), output_mtok=Decimal("0.40"),
                     id="llamas-2", now=NOW)  # fmt: skip
        result = apply_rerate(session, start=NOW.replace(hour=11), end=NOW.replace(hour=11, microsecond=1),
                              markup_pct=MARKUP, run_id="after-end", now=NOW)  # fmt: skip
        session.commit()
    assert (result.diff.total.events, result.diff.shadow.events, result.transfers) == (0, 0, 0)  # the same charge
    after = client.post("/v1/admin/price-overrides/llamas:end", json=at, headers=admin)
    assert after.status_code == 200 and after.json()["events_to_rerate"] is None
    with session_factory() as session:
        names = {(e.occurred_at.hour, e.price_version) for e in session.query(UsageEventRow)}
    assert names == {(10, "llamas"), (11, "llamas-2")}
    earlier = {"at": "2026-11-27T10:45:00Z"}  # the successor now answers for the 11:00 event: ending it before refused
    assert client.post("/v1/admin/price-overrides/llamas-2:end", json=earlier, headers=admin).status_code == 409


def test_the_cli_prints_an_override_and_its_events_to_rerate_with_the_apis_times(client, admin, session_factory, run):
    """`metering billing overrides add/list/end/withdraw` printed their times as ``…+00:00`` where the API writes
    ``…Z`` (`events_to_rerate` too), and without the override's ``created_at``: the same times, in the same text."""
    import json

    priced_by_llamas(session_factory, 10, 11)
    ended = run("billing", "overrides", "end", "llamas", "--at", "2026-11-27T10:30:00Z", "--keep-priced-events")
    assert ended.exit_code == 0, ended.output
    printed = json.loads(ended.output)
    api = client.post("/v1/admin/price-overrides/llamas:end", json={"at": "2026-11-27T10:30:00Z"}, headers=admin)
    body = api.json()  # a retry: the same override, the same events
    times = ("effective_from", "effective_to", "created_at")
    assert {t: printed[t] for t in times} == {t: body[t] for t in times}
    assert printed["effective_to"] == "2026-11-27T10:30:00Z"
    assert printed["events_to_rerate"] == body["events_to_rerate"]
    assert printed["events_to_rerate"]["first_occurred_at"] == "2026-11-27T11:00:00Z"

    listed = run("billing", "overrides", "list")
    assert listed.exit_code == 0, listed.output
    (shown,) = json.loads(listed.output)
    (api_shown,) = client.get("/v1/admin/price-overrides", headers=admin).json()
    assert {t: shown[t] for t in times} == {t: api_shown[t] for t in times}

    prices = ("--input", "0.1", "--output", "0.2")
    window = ("--from", "2026-12-01", "--to", "2027-01-01T00:00:00+02:00")
    added = run("billing", "overrides", "add", "--provider", "ollama", "--model", "mistral*", *prices, *window,
                "--id", "mistrals")  # fmt: skip
    assert added.exit_code == 0, added.output
    new = json.loads(added.output)
    assert (new["effective_from"], new["effective_to"]) == ("2026-12-01T00:00:00Z", "2026-12-31T22:00:00Z")
    withdrawn = run("billing", "overrides", "withdraw", "mistrals")
    assert withdrawn.exit_code == 0, withdrawn.output
    api_new = next(o for o in client.get("/v1/admin/price-overrides", headers=admin).json() if o["id"] == "mistrals")
    gone = json.loads(withdrawn.output)
    assert {t: gone[t] for t in times} == {t: api_new[t] for t in times} and gone["created_at"] == new["created_at"]
