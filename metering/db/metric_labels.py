"""Admission of the label values and label sets that get their own series on ``/metrics``: decided once, at a
scrape, and kept (``metrics_label_values``, ``metrics_label_sets``), so no series ever takes a sum out of ``other``.

A value (a set) not yet admitted is admitted while its label has fewer than N admitted (the set cap, fewer than
``max_label_sets``): most calls first, ties by code point, as the ranking of the rollups' all-time sums. One first seen
when its label (the cap) is full is not recorded and stays ``other``: nothing is admitted to a full label (unless its
setting is raised). The hot path, ingest, never writes here.

Scrapes of several workers or replicas at once: on PostgreSQL one admits at a time (a transaction-scoped advisory
lock, tried: a scrape that finds another admitting leaves it to it); SQLite's write lock serialises them. Positions
are unique per label: admitting more than N would fail rather than pass."""

from __future__ import annotations

from sqlalchemy import ColumnElement, func, insert, literal, null, select, text
from sqlalchemy.orm import Session

from metering.db.collation import by_code_point
from metering.db.models import MetricsLabelSetRow as S
from metering.db.models import MetricsLabelValueRow as V
from metering.db.models import PlatformUsageDailyRow as R
from metering.db.row_lock import lock_sqlite_for_write
from metering.db.usage_totals import (
    LABEL_NAMES,
    admitted_set_key,
    label_sets,
    relabelled,
    set_key,
    top_n,
)

_VALUES: dict[str, ColumnElement[str]] = {
    "provider": func.lower(R.provider),
    "model": R.model.expression,
    "purpose": R.purpose.expression,
    "extension": R.extension_id.expression,
}
_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtext('metrics_label_admission'))")


def admit_label_values(session: Session, *, top_models: int, top_labels: int, max_label_sets: int) -> bool:
    """Admit what the rollups hold and was not decided yet, in this transaction (commit it). False when another
    transaction is admitting now (PostgreSQL): nothing was done, it decides them."""
    if session.get_bind().dialect.name == "postgresql":
        if not session.scalar(_LOCK):
            return False
    else:
        lock_sqlite_for_write(session)
    admitted = dict(session.execute(select(V.label, func.count()).group_by(V.label)).all())
    for label, column in _VALUES.items():
        n, count = top_n(label, top_models, top_labels), admitted.get(label, 0)
        if count < n:
            _admit_values(session, label, column, count, n)
    count = session.scalar(select(func.count()).select_from(S)) or 0
    if count < max_label_sets:
        _admit_sets(session, top_models=top_models, top_labels=top_labels, count=count, cap=max_label_sets)
    return True


def _admit_values(session: Session, label: str, column: ColumnElement[str], count: int, n: int) -> None:
    """Up to ``n - count`` values of ``label`` not admitted yet, most calls first, at positions after ``count``."""
    grouped = select(column.label("value"), func.sum(R.calls).label("calls")).group_by(column).subquery()
    ranking = (grouped.c.calls.desc(), by_code_point(session, grouped.c.value))
    ranked = (
        select(
            grouped.c.value,
            (literal(count) + func.row_number().over(order_by=ranking)).label("position"),
        )
        .where(grouped.c.value.not_in(select(V.value).where(V.label == label)))
        .subquery()
    )
    chosen = select(literal(label).label("label"), ranked.c.value, ranked.c.position).where(ranked.c.position <= n)
    session.execute(insert(V).from_select(["label", "value", "position"], chosen))


def _admit_sets(session: Session, *, top_models: int, top_labels: int, count: int, cap: int) -> None:
    """The label sets as reported (values not admitted as ``other``) not admitted yet, while the cap has room. A set
    with a value not decided yet (stored since the values' admission, on PostgreSQL) waits for the next scrape."""
    relabel = relabelled(label_sets(), top_models=top_models, top_labels=top_labels, undecided=null())
    names = [relabel.c[name] for name in LABEL_NAMES]
    grouped = (
        select(*names, func.sum(relabel.c.calls).label("calls"))
        .where(*(relabel.c[name].is_not(None) for name in LABEL_NAMES[:4]))
        .group_by(*names)
        .subquery()
    )
    ranking = (
        grouped.c.calls.desc(),
        *(by_code_point(session, grouped.c[name]) for name in LABEL_NAMES[:4]),
        grouped.c.byollm,
        by_code_point(session, grouped.c.status),
    )
    ranked = (
        select(
            *(grouped.c[name] for name in LABEL_NAMES),
            (literal(count) + func.row_number().over(order_by=ranking)).label("position"),
        )
        .where(set_key(grouped).not_in(admitted_set_key()))
        .subquery()
    )
    chosen = select(*(ranked.c[name] for name in LABEL_NAMES), ranked.c.position).where(ranked.c.position <= cap)
    columns = ["provider", "model", "purpose", "extension", "is_byollm", "status", "position"]
    session.execute(insert(S).from_select(columns, chosen))
