"""Names that fit their columns one by one but not, together, PostgreSQL's index of a rollup key: the event is
rejected on its own (index, event_id, reason), on both databases; the rest of the batch goes in."""

from __future__ import annotations

from metering.auth import Scope
from metering.events import MAX_NAME
from tests.fakes.events import record
from tests.fakes.wide_names import wide_names
from tests.integration.api.conftest import post_events


def test_an_event_whose_names_are_too_wide_together_is_rejected_alone(client, make_token) -> None:
    """PostgreSQL refused the batch's rollup row (`index row size 3248 exceeds btree version 4 maximum 2704`) as
    an outage: 503 for the whole batch, forever, so a spool's HTTP sink retried it (and every event behind it)
    without end; SQLite stored the event."""
    secret = make_token(Scope.INGEST)
    wide = record(1, **wide_names(3150))  # 7 names of 150 CJK characters: each valid, too wide together
    assert all(len(wide[name]) <= MAX_NAME for name in ("tenant_id", "user_id", "model"))
    records = [record(0), wide, record(2)]
    response = post_events(client, records, secret)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["inserted"], body["duplicates"]) == (2, 0)
    [rejected] = body["rejected"]
    assert rejected["index"] == 1 and rejected["event_id"] == str(wide["event_id"])
    assert "3150 bytes" in rejected["reason"] and "2600" in rejected["reason"]
    again = post_events(client, records, secret).json()
    assert (again["inserted"], again["duplicates"], len(again["rejected"])) == (0, 2, 1)


def test_names_up_to_the_budget_are_stored_on_both_databases(client, make_token) -> None:
    """The budget is one PostgreSQL can index: an event right at it goes in, like any with ASCII names."""
    secret = make_token(Scope.INGEST)
    at_budget = record(0, **wide_names(2600))
    ascii_max = record(1, **{name: "x" * MAX_NAME for name in wide_names(7)})
    response = post_events(client, [at_budget, ascii_max], secret)
    assert response.status_code == 200, response.text
    assert response.json() == {"inserted": 2, "duplicates": 0, "rejected": []}
