"""Repository for the read side's all-time usage totals, summed from the daily platform rollups
(``platform_usage_daily``: one row per day and label set, so a scrape stays cheap however many events).

Grouped by bounded labels only (provider, model, purpose, extension, byollm, status): tenant and user ids
never leave this query. ``folded_usage_totals`` folds and caps the label sets in the database by what scrapes
admitted (``metric_labels``), so what it answers is bounded however many distinct models or extensions were
ingested. Only reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, literal, null, select, tuple_
from sqlalchemy.orm import Session

from metering.db.collation import by_code_point
from metering.db.models import MetricsLabelSetRow as S
from metering.db.models import MetricsLabelValueRow as V
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


@dataclass(frozen=True, slots=True)
class FoldedTotals:
    rows: list[LabelTotals]
    # Rows were left out: a value (a label set) not admitted while its label (the cap) had room, first stored after
    # the last admission. ``metric_labels.admit_label_values`` decides them; read again then.
    undecided: bool


def label_sets() -> Any:
    """``usage_totals`` as a CTE: the sums per label set, named by ``LABEL_NAMES``."""
    return (
        select(
            *(key.label(name) for key, name in zip(_KEYS, LABEL_NAMES, strict=True)),
            *(func.sum(getattr(R, column)).label(column) for column in TOTAL_COLUMNS),
        )
        .group_by(*_KEYS)
        .cte("label_sets")
    )


def top_n(label: str, top_models: int, top_labels: int) -> int:
    return top_models if label == "model" else top_labels


def relabelled(sets: Any, *, top_models: int, top_labels: int, undecided: ColumnElement[Any]) -> Any:
    """``sets``' rows with each provider, model, purpose and extension as reported: itself when admitted within its
    label's top N (``metrics_label_values``), ``OTHER`` when not and the label is full (it never will be), else
    ``undecided`` (not admitted yet: NULL, left out of the answer until admitted)."""
    columns = []
    for name in LABEL_NAMES[:4]:
        n = top_n(name, top_models, top_labels)
        within = (V.label == name, V.position <= n)
        full = select(func.count()).select_from(V).where(*within).scalar_subquery() >= n
        column = sets.c[name]
        columns.append(
            case((column.in_(select(V.value).where(*within)), column), (full, literal(OTHER)), else_=undecided).label(
                name
            )
        )
    return select(*columns, sets.c.byollm, sets.c.status, *(sets.c[column] for column in TOTAL_COLUMNS)).subquery(
        "relabelled"
    )


def set_key(labelled: Any) -> Any:
    return tuple_(*(labelled.c[name] for name in LABEL_NAMES))


def admitted_set_key() -> Any:
    return select(S.provider, S.model, S.purpose, S.extension, S.is_byollm, S.status)


def folded_usage_totals(session: Session, *, top_models: int, top_labels: int, max_label_sets: int) -> FoldedTotals:
    """``usage_totals`` with each label value reported as itself only if it was admitted (``metrics_label_values``,
    within the top N of its label: models ``top_models``; providers, purposes, extensions ``top_labels``), else as
    ``OTHER``; then each resulting label set as itself only if it was admitted (``metrics_label_sets``, within
    ``max_label_sets``), else summed into (other, other, other, other, byollm, status). What was admitted stays, so
    no value and no set moves between series once reported: every series only grows (a ranking recomputed at each
    scrape moved a value that overtook one of the top N out of ``other``, which stepped down).

    A value (a set) not admitted while its label (the cap) has room was stored after the last admission: its rows
    are left out, and ``undecided`` says so (``metric_labels.admit_label_values`` decides them). Never counted as
    ``OTHER`` meanwhile (when no admission is possible, a read-only database): admitted later, they would leave it,
    which would step down. Every total is exact but for rows left out so. All in the database: at most
    ``max_label_sets`` rows plus two per (byollm, status) come back, however many distinct names were ingested."""
    undecided = null()
    relabel = relabelled(label_sets(), top_models=top_models, top_labels=top_labels, undecided=undecided)
    folded = _grouped(relabel).cte("folded")
    decided = and_(*(folded.c[name].is_not(None) for name in LABEL_NAMES[:4]))
    within = S.position <= max_label_sets
    admitted = set_key(folded).in_(admitted_set_key().where(within))
    full = select(func.count()).select_from(S).where(within).scalar_subquery() >= max_label_sets
    capped = select(
        *(
            case((~decided, null()), (admitted, folded.c[name]), (full, literal(OTHER)), else_=undecided).label(name)
            for name in LABEL_NAMES[:4]
        ),
        folded.c.byollm,
        folded.c.status,
        *(folded.c[column] for column in TOTAL_COLUMNS),
    ).subquery("capped")
    final = _grouped(capped)
    rows = session.execute(final.order_by(*(_by_code_point(session, capped.c[n]) for n in LABEL_NAMES))).all()
    return FoldedTotals(
        rows=[_totals(row) for row in rows if row[0] is not None], undecided=any(row[0] is None for row in rows)
    )


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
