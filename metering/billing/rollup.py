"""Hourly rollups (pure): the key columns of a bucket, the counters it sums, and their units."""

from __future__ import annotations

from datetime import datetime

RollupKey = tuple[datetime, str, str, str, str, str, str, str, bool, str]
KEY_COLUMNS = (
    "hour",
    "tenant_id",
    "user_id",
    "extension_id",
    "function",
    "purpose",
    "provider",
    "model",
    "is_byollm",
    "status",
)
COUNTER_COLUMNS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "billed_nanos",
    "shadow_nanos",
    "cost_nanos",
    "latency_us_sum",
    "error_count",
    "unpriced_count",
)


def hour_of(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def latency_us(latency_ms: float) -> int:
    """Latency in whole microseconds (latencies carry at most 3 decimals of ms, so this is exact)."""
    return int(latency_ms * 1000 + 0.5)
