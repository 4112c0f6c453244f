"""Realistic usage-event records and spool lines for tests."""

from __future__ import annotations

from datetime import datetime, timedelta
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


# (provider, model, purpose, extension_id, function) of mixed_records, in turn
MIX = (
    ("anthropic", "claude-sonnet-4-6", "content_rewrite", "rewrite", "rewrite"),
    ("anthropic", "claude-haiku-4-5", "action_items", "rewrite", "extract_action_items"),
    ("openai", "gpt-4o-mini", "thread_summary", "chatty", "summarize_thread"),
)


def mixed_records(n: int, *, now: datetime | None = None, unpriced_every: int = 0) -> list[dict[str, Any]]:
    """``n`` events over the two hours before ``now``: the models of ``MIX`` in turn, users u0..u8, varying token
    counts, every 5th BYOLLM, every 7th failed; with ``unpriced_every`` k, every k-th of a model nobody prices."""
    now = now or utcnow()
    records = []
    for i in range(n):
        provider, model, purpose, extension, function = MIX[i % len(MIX)]
        if unpriced_every and i % unpriced_every == 0:
            model = "acme-private-7b"
        failed = i % 7 == 0
        records.append(
            record(
                i % 40,
                user_id=f"u{i % 9}",
                provider=provider,
                model=model,
                purpose=purpose,
                extension_id=extension,
                function=function,
                is_byollm=i % 5 == 0,
                occurred_at=now - timedelta(seconds=37 * i % 7200),
                input_tokens=100 + i,
                cache_read_tokens=i % 50,
                output_tokens=0 if failed else 10 + i % 300,
                status=Status.ERROR.value if failed else Status.OK.value,
                error_type="RateLimitError" if failed else None,
                stop_reason=None if failed else "end_turn",
            )
        )
    return records
