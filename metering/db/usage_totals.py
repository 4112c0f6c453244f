"""Repository for the read side's all-time usage totals, summed from the daily platform rollups
(``platform_usage_daily``: one row per day and label set, so a scrape stays cheap however many events).

Grouped by bounded labels only (provider, model, purpose, extension, byollm, status): tenant and user ids
never leave this query. ``folded_usage_totals`` folds and caps the label sets in the database, so what it answers
is bounded however many distinct models or extensions were ingested. Only reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, case, func, literal, select
from sqlalchemy.orm import Session

from metering.db.collation import by_code_point
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


# What a label value beyond its top N, or a label set beyond the cap, is reported as.
OTHER = "other"
LABEL_NAMES = ("provider", "model", "purpose", "extension", "byollm", "status")
# lowercased: events stored before provider names were lowercased keep their spelling (``OpenAI``)
_KEYS = (func.lower(R.provider), R.model, R.purpose, R.extension_id, R.is_byollm, R.status)


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
    sums = [func.sum(getattr(R, column)) for column in TOTAL_COLUMNS]
    return [_totals(row) for row in session.execute(select(*_KEYS, *sums).group_by(*_KEYS).order_by(*_KEYS))]


def folded_usage_totals(
    session: Session, *, top_models: int, top_labels: int, max_label_sets: int
) -> list[LabelTotals]:
    """``usage_totals`` with each label value beyond the top N of its label (by calls, ties by code point) replaced
    by ``OTHER`` (models: ``top_models``; providers, purposes, extensions: ``top_labels``), then, beyond
    ``max_label_sets`` label sets (most calls first, ties by labels), the rest summed into (other, other, other,
    other, byollm, status); every total stays exact. All in the database: at most ``max_label_sets`` rows plus one
    per (byollm, status) come back, however many distinct names were ingested (the rows were all read and folded
    here: a client sending a million model names made every scrape hold a million rows)."""
    sets = (
        select(
            *(key.label(name) for key, name in zip(_KEYS, LABEL_NAMES, strict=True)),
            *(func.sum(getattr(R, column)).label(column) for column in TOTAL_COLUMNS),
        )
        .group_by(*_KEYS)
        .cte("label_sets")
    )

    def kept(name: str, n: int) -> ColumnElement[Any]:
        column = sets.c[name]
        top = select(column).group_by(column).order_by(func.sum(sets.c.calls).desc(), _by_code_point(session, column))
        return case((column.in_(top.limit(n)), column), else_=literal(OTHER))

    relabelled = select(
        kept("provider", top_labels).label("provider"),
        kept("model", top_models).label("model"),
        kept("purpose", top_labels).label("purpose"),
        kept("extension", top_labels).label("extension"),
        sets.c.byollm,
        sets.c.status,
        *(sets.c[column] for column in TOTAL_COLUMNS),
    ).subquery("relabelled")
    folded = _grouped(relabelled).cte("folded")
    ranking = (folded.c.calls.desc(), *(_by_code_point(session, folded.c[name]) for name in LABEL_NAMES))
    ranked = select(folded, func.row_number().over(order_by=ranking).label("rank")).subquery("ranked")
    within = ranked.c.rank <= max_label_sets
    capped = select(
        *(case((within, ranked.c[name]), else_=literal(OTHER)).label(name) for name in LABEL_NAMES[:4]),
        ranked.c.byollm,
        ranked.c.status,
        *(ranked.c[column] for column in TOTAL_COLUMNS),
    ).subquery("capped")
    final = _grouped(capped)
    return [
        _totals(row)
        for row in session.execute(final.order_by(*(_by_code_point(session, capped.c[n]) for n in LABEL_NAMES)))
    ]


def _grouped(labelled: Any) -> Any:
    """``labelled``'s counters summed per label set."""
    labels = [labelled.c[name] for name in LABEL_NAMES]
    return select(*labels, *(func.sum(labelled.c[column]).label(column) for column in TOTAL_COLUMNS)).group_by(*labels)


def _by_code_point(session: Session, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """``column`` ordered by code point (``collation.by_code_point``); booleans as they are (false first, as
    "false" < "true")."""
    return column if column.type.python_type is bool else by_code_point(session, column)


def _totals(row: Any) -> LabelTotals:
    return LabelTotals(
        provider=row[0],
        model=row[1],
        purpose=row[2],
        extension=row[3],
        is_byollm=bool(row[4]),
        status=row[5],
        counters=tuple(int(value or 0) for value in row[6:]),  # PostgreSQL sums BIGINT as NUMERIC
    )


def unpriced_events(session: Session) -> int:
    """Events held as ``unpriced`` now (ingest adds them to the rollups, reprice takes them out)."""
    return int(session.execute(select(func.coalesce(func.sum(R.unpriced_count), 0))).scalar_one())
