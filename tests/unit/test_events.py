"""UsageEvent contract and UUIDv7 ids."""

from __future__ import annotations

import types
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from pydantic import ValidationError

from metering import events
from metering.events import ADDED_COUNTS, Status, UsageEvent, record_of, uuid7, uuid7_str
from metering.llm.event_record import CallScope, event_record, prompt_fingerprint
from metering.llm.types import TokenUsage


def _record(**overrides):
    scope = CallScope("t1", "u1", "rewrite", "rewrite", uuid7())
    base = dict(
        scope=scope,
        call_index=0,
        occurred_at=datetime.now(UTC),
        purpose="content_rewrite",
        provider="anthropic",
        model="claude-sonnet-4-6",
        is_byollm=False,
        is_failover=False,
        is_stream=False,
        usage=TokenUsage(100, 20, 30, 10, 0),
        max_tokens=1500,
        stop_reason="end_turn",
        latency_ms=12.5,
        time_to_first_token_ms=None,
        status=Status.OK,
        error_type=None,
        fingerprint=prompt_fingerprint("sys", [{"role": "user", "content": "hi"}]),
        budget_exceeded=[],
    )
    base.update(overrides)
    return event_record(**base)


def test_uuid7_is_version_7_and_strictly_increasing() -> None:
    ids = [uuid7() for _ in range(10_000)]
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_uuid7_str_is_the_text_of_the_uuid7_the_same_state_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_764_000_000_000_000_000]
    monkeypatch.setattr(events, "time", types.SimpleNamespace(time_ns=lambda: now[0]))
    steps = [0, 0, 1_000, 1_000_000, 0, 3_000_000, 0, 0] * 700  # within a millisecond, the next, a later one
    steps += [0] * 5_000  # past 4,096 in one millisecond: the counter borrows the next one
    steps += [-2_000_000, 0, 1_000_000, -60_000_000_000, 0, 5_000_000] * 50  # the clock stepped back (NTP)
    made = []
    for step in steps:
        now[0] += step
        state = (events._random.getstate(), events._uuid7_last_ms, events._uuid7_seq)
        text = uuid7_str()
        events._random.setstate(state[0])
        events._uuid7_last_ms, events._uuid7_seq = state[1], state[2]
        assert text == str(uuid7())
        made.append(text)
    assert made == sorted(made) and len(set(made)) == len(made)  # the clock stepping back included
    ids = [uuid7_str() for _ in range(10_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_uuid7_carries_the_time() -> None:
    before = datetime.now(UTC)
    value = uuid7()
    ms = value.int >> 80
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    assert abs(stamp - before) < timedelta(seconds=1)


def test_record_round_trips_through_json_into_a_usage_event() -> None:
    record = _record()
    event = UsageEvent.model_validate(orjson.loads(orjson.dumps(record)))
    assert str(event.event_id) == record["event_id"]
    assert event.input_tokens == 100 and event.cache_read_tokens == 30
    assert event.occurred_at.tzinfo is not None


USAGES = [
    TokenUsage(100, 20, 30, 10, 0),
    TokenUsage(100, 20, 30, 10, 0, cache_write_1h_tokens=4),
    TokenUsage(100, 20, 30, 10, 0, web_searches=3),
]


@pytest.mark.parametrize("usage", USAGES)
def test_an_events_record_has_the_keys_of_its_spool_line_and_round_trips(usage: TokenUsage) -> None:
    """What the HTTP sink sends: the added counts only when not 0, as the metered client writes its spool lines."""
    line = _record(usage=usage)
    event = UsageEvent.model_validate(orjson.loads(orjson.dumps(line)))
    assert set(record_of(event)) == set(line)
    assert {name for name in ADDED_COUNTS if getattr(usage, name)} == set(ADDED_COUNTS) & set(line)
    assert UsageEvent.model_validate(orjson.loads(orjson.dumps(record_of(event)))) == event


def test_cache_tokens_must_be_part_of_input() -> None:
    with pytest.raises(ValidationError, match="cache_read_tokens"):
        UsageEvent.model_validate(orjson.loads(orjson.dumps(_record(usage=TokenUsage(10, 5, 8, 8, 0)))))


def test_reasoning_must_be_part_of_output() -> None:
    with pytest.raises(ValidationError, match="reasoning_tokens"):
        UsageEvent.model_validate(orjson.loads(orjson.dumps(_record(usage=TokenUsage(10, 5, 0, 0, 6)))))


def test_naive_time_and_non_v7_ids_are_rejected() -> None:
    data = orjson.loads(orjson.dumps(_record()))
    with pytest.raises(ValidationError, match="timezone"):
        UsageEvent.model_validate({**data, "occurred_at": "2026-11-25T10:00:00"})
    with pytest.raises(ValidationError, match="UUIDv7"):
        UsageEvent.model_validate({**data, "event_id": str(uuid.uuid4())})
    converted = UsageEvent.model_validate({**data, "occurred_at": "2026-11-25T12:00:00+02:00"})
    assert converted.occurred_at == datetime(2026, 11, 25, 10, tzinfo=UTC)
    assert converted.occurred_at.tzinfo == UTC


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("schema_version", 2, "less than or equal to 1"),  # a version this code does not understand
        ("schema_version", 0, "greater than or equal to 1"),
        ("schema_version", 2**63, "less than or equal to 1"),  # used to reach the database and fail the batch
        ("schema_version", "1", "valid integer"),
        ("input_tokens", True, "valid integer"),  # a bool is not a count
        ("input_tokens", "100", "valid integer"),
        ("input_tokens", 100.0, "valid integer"),
        ("call_index", "3", "valid integer"),
        ("is_byollm", "false", "valid boolean"),
        ("is_byollm", 0, "valid boolean"),
        ("is_stream", "true", "valid boolean"),
        ("latency_ms", True, "valid number"),
        ("latency_ms", "12.5", "valid number"),
        ("occurred_at", 1764270000, "not a number"),  # Unix seconds, or ms past 2e10: ambiguous
        ("occurred_at", 1764270000000.0, "not a number"),
        ("occurred_at", "1764270000", "not a number"),  # as text too: it was read as Unix seconds
        ("occurred_at", "1764270000000.5", "not a number"),
        ("occurred_at", "1764270000000", "not a number"),  # read as ms (past 2e10)
        ("occurred_at", " 1764270000.5 ", "not a number"),
        ("occurred_at", "-1e3", "not a number"),
        ("occurred_at", "2016-12-31T23:59:60Z", "leap second"),  # was "unexpected extra characters at the end"
        ("occurred_at", "1.76427e9", "not a number"),  # in exponent form too: it was read as 2025-11-27T19:00Z
        ("occurred_at", "1764270000.0E+0", "not a number"),
    ],
)
def test_numbers_and_flags_are_strict(field: str, value: object, reason: str) -> None:
    data = orjson.loads(orjson.dumps(_record()))
    with pytest.raises(ValidationError, match=reason):
        UsageEvent.model_validate({**data, field: value})
    with pytest.raises(ValidationError, match=reason):  # the same from JSON text (the one-pass API path)
        UsageEvent.model_validate_json(orjson.dumps({**data, field: value}))
    assert UsageEvent.model_validate({**data, "latency_ms": 12}).latency_ms == 12.0  # an integer is a number


def test_error_needs_an_error_type() -> None:
    data = orjson.loads(orjson.dumps(_record(status=Status.ERROR)))
    with pytest.raises(ValidationError, match="error_type"):
        UsageEvent.model_validate(data)


def test_fingerprint_hashes_roles_and_lengths_not_content() -> None:
    a = prompt_fingerprint("sys", [{"role": "user", "content": "secret one"}])
    b = prompt_fingerprint("sys", [{"role": "user", "content": "secret two"}])  # same length
    c = prompt_fingerprint("sys", [{"role": "user", "content": "longer secret"}])
    assert a == b != c
    assert "secret" not in a


@pytest.mark.parametrize(
    ("field", "min_length", "max_length"),
    [("user_id", 1, 200), ("action_type", 0, 50), ("stop_reason", 0, 100), ("error_type", 0, 100),
     ("prompt_fingerprint", 1, 64)],
)  # fmt: skip
def test_text_limits_and_nul(field: str, min_length: int, max_length: int) -> None:
    data = orjson.loads(orjson.dumps(_record()))
    assert getattr(UsageEvent.model_validate({**data, field: "é" * max_length}), field) == "é" * max_length
    with pytest.raises(ValidationError, match=f"{field}\n  String should have at most {max_length} characters"):
        UsageEvent.model_validate({**data, field: "é" * (max_length + 1)})
    with pytest.raises(ValidationError, match=f"{field}\n  Value error, text must not contain NUL"):
        UsageEvent.model_validate({**data, field: "a\x00b"})
    with pytest.raises(ValidationError, match=f"{field}\n  Input should be a valid string"):
        UsageEvent.model_validate({**data, field: "a\ud800b"})  # a lone surrogate: no database can store it
    if min_length:
        with pytest.raises(ValidationError, match=f"{field}\n  String should have at least 1 character"):
            UsageEvent.model_validate({**data, field: ""})
    else:
        assert getattr(UsageEvent.model_validate({**data, field: ""}), field) == ""


def test_text_limits_are_checked_by_pydantic_core() -> None:
    """A length constraint placed after a Python validator runs in Python: ≈ 3 µs more per event."""
    assert "length_validator" not in repr(UsageEvent.__pydantic_core_schema__)


def test_provider_names_are_case_insensitive_and_stored_lowercase() -> None:
    data = orjson.loads(orjson.dumps(_record()))
    assert UsageEvent.model_validate({**data, "provider": "Anthropic"}).provider == "anthropic"
    assert UsageEvent.model_validate({**data, "provider": "OpenAI"}).provider == "openai"
    assert UsageEvent.model_validate({**data, "provider": "İ" * 100}).provider == "i̇" * 100  # 200 once lowered
    with pytest.raises(ValidationError, match="provider\n  Value error, String should have at most 200"):
        UsageEvent.model_validate({**data, "provider": "İ" * 101})  # 202 characters once lowered
    with pytest.raises(ValidationError, match="provider\n  Value error, text must not contain NUL"):
        UsageEvent.model_validate({**data, "provider": "a\x00b"})
