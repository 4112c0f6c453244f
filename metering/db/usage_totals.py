"""Repository for the read side's all-time usage totals, summed from the daily platform rollups
(``platform_usage_daily``: one row per day and label set, so a scrape stays cheap however many events).

Grouped by bounded labels only (provider, model, purpose, extension, byollm, status): tenant and user ids
never leave this query. Only reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from metering.db.models import PlatformUsageDailyRow as R

# The counters summed per label set, in ``LabelTotals.counters`` order.
TOTAL_COLUMNS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "web_searches",
    "billed_nanos",
    "shadow_nanos",
)


@dataclass(frozen=True, slots=True)
class LabelTotals:
    provider: str
    model: str
    purpose: str
    extension: str
    is_byollm: bool
    status: str
    counters: tuple[int, ...]  # TOTAL_COLUMNS order


def usage_totals(session: Session) -> list[LabelTotals]:
    """All-time sums of ``TOTAL_COLUMNS`` per (provider, model, purpose, extension, byollm, status)."""
    # lowercased: events stored before provider names were lowercased keep their spelling (``OpenAI``)
    keys = (func.lower(R.provider), R.model, R.purpose, R.extension_id, R.is_byollm, R.status)
    sums = [func.sum(getattr(R, column)) for column in TOTAL_COLUMNS]
    rows = session.execute(select(*keys, *sums).group_by(*keys).order_by(*keys))
    return [
        LabelTotals(
            provider=row[0],
            model=row[1],
            purpose=row[2],
            extension=row[3],
            is_byollm=bool(row[4]),
            status=row[5],
            counters=tuple(int(value or 0) for value in row[6:]),  # PostgreSQL sums BIGINT as NUMERIC
        )
        for row in rows
    ]


def unpriced_events(session: Session) -> int:
    """Events held as ``unpriced`` now (ingest adds them to the rollups, reprice takes them out)."""
    return int(session.execute(select(func.coalesce(func.sum(R.unpriced_count), 0))).scalar_one())
