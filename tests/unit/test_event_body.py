"""POST /v1/events bodies: the one-pass path (``EventsRequest.json``) against the per-item path (``json.loads`` +
``event_from_record`` per event), which it must match exactly whenever it is taken."""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from metering.api.event_body import EventsRequest, has_foreign_events
from metering.events import MAX_INT32, MAX_TOKENS, UsageEvent, event_from_record, uuid7
from tests.fakes.event_batches import varied_records
from tests.fakes.events import record


def _request(body: bytes) -> EventsRequest:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/events", "headers": [], "query_string": b""}
    return EventsRequest(scope, receive)


async def _fast(body: bytes) -> tuple[Any, bool]:
    request = _request(body)
    return await request.json(), request.events_validated


def _per_item(body: bytes) -> list[UsageEvent | str]:
    """Today's path: each item validated on its own (the reason when it is invalid)."""
    out: list[UsageEvent | str] = []
    for item in json.loads(body)["events"]:
        try:
            out.append(event_from_record(item))
        except ValidationError as exc:
            out.append(str(exc))
    return out


def _exact(event: UsageEvent) -> list[tuple[str, type, Any]]:
    """Every field with its type (a float is compared bit for bit by repr, a time with its tzinfo)."""
    return [(k, type(v), repr(v)) for k, v in event.__dict__.items()] + [
        ("tzinfo", type(event.occurred_at.tzinfo), repr(event.occurred_at.tzinfo)),
        ("fields_set", set, repr(sorted(event.model_fields_set))),
    ]


async def test_a_valid_batch_is_validated_in_one_pass_into_the_events_of_the_per_item_path() -> None:
    records = varied_records()
    body = orjson.dumps({"events": records})
    parsed, validated = await _fast(body)
    assert validated
    events = parsed["events"]
    expected = _per_item(body)
    assert all(isinstance(e, UsageEvent) for e in expected), expected
    assert len(events) == len(expected) == len(records)
    for got, want in zip(events, expected, strict=True):
        assert isinstance(got, UsageEvent) and isinstance(want, UsageEvent)
        assert got == want
        assert _exact(got) == _exact(want)


async def test_repeated_keys_keep_the_last_value_on_both_paths() -> None:
    rec = record(0)
    text = orjson.dumps(rec).decode()
    body = ('{"events": [' + text.replace('"input_tokens":120', '"input_tokens":-1,"input_tokens":120') + "]}").encode()
    assert b'"input_tokens":-1' in body
    parsed, validated = await _fast(body)
    assert validated and _exact(parsed["events"][0]) == _exact(_per_item(body)[0])  # type: ignore[arg-type]


# One field changed at a time, valid and invalid values: the one-pass path is taken exactly when every event is
# valid on its own, and then gives the same events.
_CHANGES: dict[str, list[Any]] = {
    "event_id": [str(uuid.uuid4()), "not-a-uuid", 7, None, str(uuid7()).replace("-", "")],
    "occurred_at": [
        "2026-11-27T14:00:00",
        "2026-11-27",
        "yesterday",
        1.5e9,
        1764270000,
        None,
        "9999-12-31T23:00:00-05:00",
    ],
    "tenant_id": ["", "a\x00b", "x" * 200, "x" * 201, "\x00" * 300, 5, None, ["t"], "\ud800", "a\udc00b"],
    "action_type": ["", "x" * 51, None],
    "prompt_fingerprint": ["", "f" * 65, "é" * 65, "\x00"],
    "stop_reason": ["", "s" * 101, "a\x00"],
    "error_type": ["e\x00", "e" * 101],
    "call_index": [-1, MAX_INT32 + 1, 1.5, "3", True, None],
    "input_tokens": [-3, MAX_TOKENS + 1, 10**30, "many", 2.0, None, True, "100"],
    "cache_read_tokens": [121, 120],
    "reasoning_tokens": [41, 40],
    "latency_ms": [-0.1, 1e13, 1e400, "fast", None, True, "12.5", 12],
    "time_to_first_token_ms": [-1, 1e300],
    "is_byollm": ["yes", "maybe", 2, None, "false", 0],
    "status": ["OK", "error", "failed"],
    "usage_completeness": ["exact", None],
    "budget_exceeded": [["calls", "calls"], ["time"], "calls", None],
    "schema_version": ["v1", 1.5, 2, 0, 2**63, True, 1],
    "extra_field": ["surprise"],
}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, values in _CHANGES.items() for v in values])
async def test_the_one_pass_path_is_taken_exactly_when_every_event_is_valid(field: str, value: Any) -> None:
    body = json.dumps({"events": [record(0), record(1) | {field: value}]}, default=str).encode()
    parsed, validated = await _fast(body)
    expected = _per_item(body)
    assert validated == all(isinstance(e, UsageEvent) for e in expected), expected
    if validated:
        assert [_exact(e) for e in parsed["events"]] == [_exact(e) for e in expected]  # type: ignore[arg-type]
    else:
        assert parsed == json.loads(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"evts": []}',
        b"[]",
        b'{"events": 3}',
        b'{"events": [42, "event", null]}',
        b'{"events": [{}]}',
        b"\xef\xbb\xbf" + orjson.dumps({"events": [record(0)]}),  # a BOM: json.loads accepts it, the Rust parser not
        orjson.dumps({"events": [record(0)]}).replace(b'"latency_ms":12.5', b'"latency_ms":NaN'),
        orjson.dumps({"events": [record(0)], "note": "PLACEHOLDER"}).replace(b"PLACEHOLDER", b"\\ud800"),
        orjson.dumps({"events": [record(0)]}).decode().encode("utf-16"),  # json.loads detects UTF-16
    ],
)
async def test_anything_else_is_what_json_loads_returns(body: bytes) -> None:
    parsed, validated = await _fast(body)
    assert not validated
    expected = json.loads(body)
    assert parsed == expected or repr(parsed) == repr(expected)  # NaN != NaN


@pytest.mark.parametrize("body", [b'{"events": [', b'{"events": [}', b'{"a": "\xff"}', b"{'a': 1}", b""])
async def test_a_body_json_loads_refuses_raises_what_json_loads_raises(body: bytes) -> None:
    with pytest.raises(Exception) as expected:
        json.loads(body)
    with pytest.raises(type(expected.value)):
        await _fast(body)


async def test_json_events_gives_the_items_as_json_loads_does() -> None:
    records = [record(0, event_id=str(uuid7()).upper()), record(1)]
    body = orjson.dumps({"events": records, "other": 1})
    request = _request(body)
    await request.json()
    assert request.events_validated
    assert request.json_events() == json.loads(body)["events"]
    with pytest.raises(RuntimeError):
        _request(body).json_events()


def test_foreign_events_are_only_those_of_another_tenant_for_a_bound_token() -> None:
    ours, theirs = (event_from_record(record(i, tenant_id=t)) for i, t in enumerate(("tenant-1", "tenant-2")))
    assert has_foreign_events([ours, theirs], "tenant-1")
    assert not has_foreign_events([ours, ours], "tenant-1")
    assert not has_foreign_events([ours, theirs], None)
    assert not has_foreign_events([record(0, tenant_id="tenant-2")], "tenant-1")  # JSON items: tenancy's job
