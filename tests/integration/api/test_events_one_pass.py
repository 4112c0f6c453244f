"""POST /v1/events: a valid batch is validated in one pass (``metering.api.event_body``), anything else takes the
per-item path. Both must answer and store exactly the same, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import select
from starlette.requests import Request

from metering.api import tenancy
from metering.api.event_body import EventsRequest
from metering.auth import Scope
from metering.db.models import UsageEventRow
from metering.events import utcnow, uuid7
from tests.fakes.event_batches import varied_records
from tests.fakes.events import record
from tests.integration.api.conftest import bearer, post_events

_NOT_COMPARED = ("event_id", "ingested_at", "ingest_batch")


@pytest.fixture
def ingested(monkeypatch: pytest.MonkeyPatch) -> list[set[str]]:
    """The types of the items each request handed to ingest (``UsageEvent`` on the one-pass path)."""
    calls: list[set[str]] = []
    real = tenancy.ingest

    def spy(session: Any, items: Any, **kwargs: Any) -> Any:
        calls.append({type(item).__name__ for item in items})
        return real(session, items, **kwargs)

    monkeypatch.setattr(tenancy, "ingest", spy)
    return calls


def _twin(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[uuid.UUID, uuid.UUID]]:
    """The same records with fresh event ids, spelled the same way (repeats stay repeats)."""
    ids: dict[uuid.UUID, uuid.UUID] = {}
    twins = []
    for rec in records:
        spelled = str(rec["event_id"])
        old = uuid.UUID(spelled)
        new = ids.setdefault(old, uuid7())
        spelled = spelled.replace(str(old), str(new)).replace(str(old).upper(), str(new).upper())
        twins.append(rec | {"event_id": spelled})
    return twins, ids


def _without_now(body: dict[str, Any]) -> dict[str, Any]:
    """The response with the request's time taken out of the reasons (`... is in the future (now ...)`)."""
    rejected = [r | {"reason": re.sub(r"\(now [^)]*\)", "(now)", r["reason"])} for r in body["rejected"]]
    return body | {"rejected": rejected}


def _rows(session_factory: Any, ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
    table = UsageEventRow.__table__
    with session_factory() as session:
        result = session.execute(select(table).where(table.c.event_id.in_(ids))).mappings().all()
    return {row["event_id"]: {k: v for k, v in row.items() if k not in _NOT_COMPARED} for row in result}


def test_both_paths_answer_and_store_the_same(client, make_token, session_factory, ingested, monkeypatch):
    secret = make_token()
    now = utcnow()
    records = varied_records(now)
    n = len(records)
    records += [
        record(100, occurred_at=now + timedelta(hours=1)),  # in the future: rejected by ingest
        record(101, occurred_at="2019-12-31T23:59:59Z"),  # before 2020: rejected by ingest
        dict(records[1]),  # the same event_id again in the batch: a duplicate
    ]
    twins, ids = _twin(records)

    one_pass = post_events(client, records, secret).json()
    one_pass_replay = post_events(client, records, secret).json()
    assert ingested == [{"UsageEvent"}, {"UsageEvent"}]

    monkeypatch.setattr(EventsRequest, "json", Request.json)  # the per-item path, as before event_body
    per_item = post_events(client, twins, secret).json()
    per_item_replay = post_events(client, twins, secret).json()
    assert ingested[2:] == [{"dict"}, {"dict"}]

    def in_twin_ids(body: dict[str, Any]) -> dict[str, Any]:
        rejected = [r | {"event_id": str(ids[uuid.UUID(r["event_id"])])} for r in body["rejected"]]
        return _without_now(body | {"rejected": rejected})

    assert one_pass["inserted"] == n and one_pass["duplicates"] == 1
    assert [r["index"] for r in one_pass["rejected"]] == [n, n + 1]
    assert in_twin_ids(one_pass) == _without_now(per_item)
    assert one_pass_replay["inserted"] == 0 and one_pass_replay["duplicates"] == n + 1
    assert in_twin_ids(one_pass_replay) == _without_now(per_item_replay)

    stored = _rows(session_factory, list(ids))
    stored_twins = _rows(session_factory, list(ids.values()))
    assert len(stored) == len(stored_twins) == n
    for event_id, row in stored.items():
        assert row == stored_twins[ids[event_id]], event_id


def test_a_tenant_bound_token_gets_each_foreign_event_id_as_sent(client, make_token, ingested):
    secret = make_token(Scope.INGEST, tenant="tenant-1")
    assert post_events(client, [record(0), record(1)], secret).json()["inserted"] == 2
    assert ingested == [{"UsageEvent"}]  # all of its tenant: one pass

    foreign_id = str(uuid7()).upper()
    body = post_events(client, [record(0), record(1, tenant_id="tenant-2", event_id=foreign_id), record(2)], secret)
    assert body.json() == {
        "inserted": 2,
        "duplicates": 0,
        "rejected": [{"index": 1, "event_id": foreign_id, "reason": "tenant mismatch"}],
    }
    assert ingested[1] == {"dict"}  # another tenant's event: the per-item path


def test_an_event_with_a_lone_surrogate_is_rejected_alone(client, make_token):
    """``json.loads`` accepts ``"\\ud800"``, which no database can store: this was a 500 for the whole batch."""
    raw = orjson.dumps({"events": [record(0), record(1, user_id="SURROGATE")]}).replace(b"SURROGATE", b"a\\ud800b")
    headers = {"Content-Type": "application/json", **bearer(make_token())}
    response = client.post("/v1/events", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["inserted"] == 1
    assert [r["index"] for r in body["rejected"]] == [1] and body["rejected"][0]["reason"].startswith("user_id: ")
