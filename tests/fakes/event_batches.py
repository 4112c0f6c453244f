"""A batch of valid usage-event records that differ in every way the schema allows (for comparing ingest paths)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from metering.events import MAX_INT32, MAX_LATENCY_MS, MAX_TOKENS, utcnow, uuid7
from tests.fakes.events import record

_UNPRICED = {"provider": "ollama", "model": "llama3.1"}


def _drop(rec: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in keys}


def varied_records(now: datetime | None = None) -> list[dict[str, Any]]:
    """Valid records (for ``UsageEvent``; ingest's own rules aside): unicode and escapes, optional fields missing,
    budget flags, streams, errors, time offsets, limits, other spellings of ids, numbers and booleans."""
    now = now or utcnow()
    ago = now - timedelta(minutes=3)
    error = {
        "status": "error",
        "error_type": "overloaded_error",
        "usage_completeness": "missing",
        "cache_read_tokens": 0,
    }
    return [
        record(0),
        record(1, tenant_id="tenant-é", user_id="ユーザー-1", extension_id="rewrite ✍", function='quote " and \\ back'),
        record(2, purpose="😀" * 200, model="m\u2028\u2029\t\n\r\x7f", prompt_fingerprint="é" * 64, user_id="ü" * 200),
        record(3, action_type="x" * 50, stop_reason="s" * 100, error_type="e" * 100),
        _drop(record(4), "max_tokens", "stop_reason", "error_type", "time_to_first_token_ms", "budget_exceeded"),
        _drop(record(5), "action_type", "is_failover", "is_stream", "schema_version", "cache_read_tokens"),
        _drop(
            record(6), "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens"
        ),
        record(7, budget_exceeded=["calls"]),
        record(8, budget_exceeded=["calls", "tokens"], is_failover=True),
        record(9, is_stream=True, time_to_first_token_ms=231.25, stop_reason="max_tokens"),
        record(10, is_stream=True, time_to_first_token_ms=0, latency_ms=0, status="cancelled", stop_reason=None),
        record(11, **error, input_tokens=0, output_tokens=0),
        record(12, **error | {"usage_completeness": "estimated"}, input_tokens=15, output_tokens=3, is_stream=True),
        record(13, is_byollm=True, provider="openai", model="gpt-4o-mini", usage_completeness="estimated"),
        record(14, occurred_at=ago.astimezone(timezone(timedelta(hours=2))).isoformat(), latency_ms=1e-7),
        record(15, occurred_at=ago.strftime("%Y-%m-%dT%H:%M:%SZ"), latency_ms=MAX_LATENCY_MS, max_tokens=MAX_INT32),
        record(16, occurred_at=ago.astimezone(timezone(-timedelta(hours=5, minutes=30))).isoformat(), latency_ms=12),
        # The most tokens a count may say, on a model without a price (held): priced, they would cost more than one
        # call can (ingest rejects those, tests/integration/test_ingest.py).
        record(
            17,
            input_tokens=MAX_TOKENS,
            cache_read_tokens=MAX_TOKENS // 2,
            cache_write_tokens=MAX_TOKENS // 2,
            **_UNPRICED,
        ),
        record(
            MAX_INT32, output_tokens=MAX_TOKENS, reasoning_tokens=MAX_TOKENS, time_to_first_token_ms=0.1, **_UNPRICED
        ),
        record(19, event_id=str(uuid7()).upper(), invocation_id=uuid.uuid4().hex),
        record(20, event_id="urn:uuid:" + str(uuid7()), schema_version=1, latency_ms=0.30000000000000004),
        # Numbers and flags are strict (a count is a JSON integer, a flag a JSON bool, a time ISO 8601 text):
        # tests/unit/test_events.py has the lax spellings that are refused.
        record(21, is_byollm=True, is_stream=True, is_failover=False, input_tokens=200) | {"call_index": 7},
        record(22, occurred_at=ago.isoformat(), latency_ms=12.75, max_tokens=2048),
        record(23, provider="ollama", model="llama3.1", is_byollm=False),  # unpriced: held
    ]
