"""Usage rollups (pure): the key columns of a bucket, the counters it sums, and their units.

``usage_rollups`` is keyed per hour and user by every dimension. The coarse rollups (``COARSE_ROLLUPS``) sum it
over some dimensions, so that queries not asking for those read far fewer rows: ``platform_usage_hourly`` and
``platform_usage_daily`` without tenant and user, ``user_usage_daily`` with only tenant and user. All are
written in the ingest transaction, from the same events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    "cache_write_1h_tokens",  # part of cache_write_tokens (migration 0012)
    "web_searches",
)


NAME_COLUMNS = KEY_COLUMNS[1:8]  # tenant_id, user_id, extension_id, function, purpose, provider, model
# PostgreSQL indexes a B-tree entry of at most 2,704 bytes, and the primary key of ``usage_rollups`` holds an
# event's seven names with the hour, is_byollm and status (at most 87 bytes more, with headers and alignment).
# Names of 200 characters each fit as ASCII (1,400 bytes) but not as CJK text (3 bytes a character): the rollup
# row failed with ``index row size … exceeds btree version 4 maximum 2704``. SQLite has no such limit.
MAX_NAME_BYTES = 2600


def names_too_wide(names: Sequence[str]) -> str | None:
    """Why an event's names (``NAME_COLUMNS`` order) cannot key a rollup row, or None when they can."""
    if sum(map(len, names)) * 4 <= MAX_NAME_BYTES:  # even at 4 bytes a character (nearly every event: no encoding)
        return None
    size = sum(len(name.encode("utf-8")) for name in names)
    if size <= MAX_NAME_BYTES:
        return None
    return (
        f"{', '.join(NAME_COLUMNS)} take {size} bytes together in UTF-8, more than the {MAX_NAME_BYTES} the "
        "database can index as a rollup's key: use shorter names"
    )


def hour_of(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def latency_us(latency_ms: float) -> int:
    """Latency in whole microseconds (latencies carry at most 3 decimals of ms, so this is exact)."""
    return int(latency_ms * 1000 + 0.5)


@dataclass(frozen=True, slots=True)
class CoarseRollup:
    """A rollup table summing ``usage_rollups`` per ``grain`` (its first key column, ``hour`` or ``day``: the
    UTC date) and ``dimensions`` (a subset of ``KEY_COLUMNS``, in their order)."""

    table: str
    grain: str
    dimensions: tuple[str, ...]

    @property
    def key_columns(self) -> tuple[str, ...]:
        return (self.grain, *self.dimensions)


PLATFORM_HOURLY = CoarseRollup("platform_usage_hourly", "hour", PLATFORM_KEY_COLUMNS)
PLATFORM_DAILY = CoarseRollup("platform_usage_daily", "day", PLATFORM_KEY_COLUMNS)
USER_DAILY = CoarseRollup("user_usage_daily", "day", ("tenant_id", "user_id"))
COARSE_ROLLUPS = (PLATFORM_HOURLY, PLATFORM_DAILY, USER_DAILY)
# The order every writer takes the rollup tables' rows in: PostgreSQL's ingest statement (``batch_sql``) takes
# them in this order (it runs its WITH clauses last-written first), so reprice and re-rate must too.
LOCK_ORDER = (*(r.table for r in reversed(COARSE_ROLLUPS)), "usage_rollups")


def coarse_buckets(buckets: dict[RollupKey, list[int]]) -> dict[CoarseRollup, dict[tuple[Any, ...], list[int]]]:
    """The fine buckets summed into each coarse rollup's buckets (keys in ``key_columns`` order)."""
    result: dict[CoarseRollup, dict[tuple[Any, ...], list[int]]] = {}
    for rollup in COARSE_ROLLUPS:
        positions = [KEY_COLUMNS.index(d) for d in rollup.dimensions]
        daily = rollup.grain == "day"
        target: dict[tuple[Any, ...], list[int]] = {}
        for key, counters in buckets.items():
            coarse = (key[0].date() if daily else key[0], *(key[i] for i in positions))
            total = target.get(coarse)
            if total is None:
                target[coarse] = list(counters)
            else:
                for i, value in enumerate(counters):
                    total[i] += value
        result[rollup] = target
    return result
