"""Realistic usage-event records and spool lines for tests."""

from __future__ import annotations

from typing import Any

import orjson

from metering.events import Status, utcnow, uuid7
from metering.llm.event_record import CallScope, event_record
from metering.llm.types import TokenUsage, UsageCompleteness


def record(call_index: int = 0, **overrides: Any) -> dict[str, Any]:
    scope = CallScope("tenant-1", overrides.pop("user_id", "user-1"), "rewrite", "rewrite", uuid7())
    base = event_record(
        scope=scope,
        call_index=call_index,
        occurred_at=utcnow(),
        purpose="content_rewrite",
        provider="anthropic",
        model="claude-sonnet-4-6",
        is_byollm=False,
        is_failover=False,
        is_stream=False,
        usage=TokenUsage(120, 40, 20, 0, 0, UsageCompleteness.REPORTED),
        max_tokens=1500,
        stop_reason="end_turn",
        latency_ms=12.5,
        time_to_first_token_ms=None,
        status=Status.OK,
        error_type=None,
        fingerprint="f" * 32,
        budget_exceeded=[],
    )
    base.update(overrides)
    return base


def line(call_index: int = 0, **overrides: Any) -> bytes:
    return orjson.dumps(record(call_index, **overrides))
