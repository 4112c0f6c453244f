"""Hourly rollups (pure): the key of an event's bucket and the counters it adds."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class RollupInput:
    key: RollupKey
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    billed_nanos: int
    shadow_nanos: int
    cost_nanos: int
    latency_us: int
    is_error: bool
    is_unpriced: bool


def fold(items: Iterable[RollupInput]) -> dict[RollupKey, list[int]]:
    """Sum the counters of every bucket; the result is what one upsert per bucket adds."""
    buckets: dict[RollupKey, list[int]] = {}
    for item in items:
        counters = buckets.get(item.key)
        if counters is None:
            counters = buckets[item.key] = [0] * len(COUNTER_COLUMNS)
        counters[0] += 1
        counters[1] += item.input_tokens
        counters[2] += item.output_tokens
        counters[3] += item.cache_read_tokens
        counters[4] += item.cache_write_tokens
        counters[5] += item.reasoning_tokens
        counters[6] += item.billed_nanos
        counters[7] += item.shadow_nanos
        counters[8] += item.cost_nanos
        counters[9] += item.latency_us
        counters[10] += item.is_error
        counters[11] += item.is_unpriced
    return buckets
