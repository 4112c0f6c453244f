"""Usage rollups (pure): the key columns of a bucket, the counters it sums, and their units.

``usage_rollups`` is keyed per hour and user; ``platform_usage_hourly`` and ``platform_usage_daily`` sum it
over tenants and users (per hour, per UTC day), so platform-wide queries read far fewer rows. All three are
written in the ingest transaction, from the same events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

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
PLATFORM_KEY_COLUMNS = KEY_COLUMNS[3:]  # without hour (or day), tenant_id, user_id
PLATFORM_TABLES = {"hour": "platform_usage_hourly", "day": "platform_usage_daily"}
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


def platform_buckets(buckets: dict[RollupKey, list[int]]) -> dict[str, dict[tuple[Any, ...], list[int]]]:
    """The fine buckets summed into the platform tables' buckets: ``PLATFORM_TABLES`` value -> key ->
    counters, keys being (hour or UTC date, *PLATFORM_KEY_COLUMNS)."""
    hourly: dict[tuple[Any, ...], list[int]] = {}
    daily: dict[tuple[Any, ...], list[int]] = {}
    for key, counters in buckets.items():
        rest = key[3:]
        for target, coarse in ((hourly, (key[0], *rest)), (daily, (key[0].date(), *rest))):
            total = target.get(coarse)
            if total is None:
                target[coarse] = list(counters)
            else:
                for i, value in enumerate(counters):
                    total[i] += value
    return {PLATFORM_TABLES["hour"]: hourly, PLATFORM_TABLES["day"]: daily}
