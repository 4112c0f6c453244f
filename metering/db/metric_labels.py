"""Admission of the label values and label sets that get their own series on ``/metrics``: decided once, at a
scrape, and kept (``metrics_label_values``, ``metrics_label_sets``), so no series ever takes a sum out of ``other``.

A value (a set) not yet admitted is admitted while its label has fewer than N admitted (the set cap, fewer than
``max_label_sets``): most calls first, ties by code point, as the ranking of the rollups' all-time sums. One first seen
when its label (the cap) is full is not recorded and stays ``other``: nothing is admitted to a full label (unless its
setting is raised). The hot path, ingest, never writes here. The rules themselves: ``metric_label_plan``.

The rollups are read (one aggregation: the calls per raw label set, which ranks the values of each label and the
sets) before any lock is taken; under the lock only the small admitted tables are read again (a scrape may have
admitted meanwhile: the plan is then made again from the same sums) and the plan is inserted, so ingest waits on
this writer for milliseconds, not for the aggregation. Values stored between the read and the lock are not in the
plan: left out (undecided) until the next scrape, never ``other`` while their label has room.

Scrapes of several workers or replicas at once: on PostgreSQL one admits at a time (a transaction-scoped advisory
lock, tried: a scrape that finds another admitting leaves it to it); SQLite's write lock serialises them. Positions
are unique per label: admitting more than N would fail rather than pass."""

from __future__ import annotations

from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session

from metering.db.metric_label_plan import Admitted, SetKey, plan_admission
from metering.db.models import MetricsLabelSetRow as S
from metering.db.models import MetricsLabelValueRow as V
from metering.db.models import PlatformUsageDailyRow as R
from metering.db.row_lock import lock_sqlite_for_write

_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtext('metrics_label_admission'))")
# lowercased: events stored before provider names were lowercased keep their spelling (``OpenAI``)
_RAW_KEYS = (func.lower(R.provider), R.model, R.purpose, R.extension_id, R.is_byollm, R.status)


def admit_label_values(session: Session, *, top_models: int, top_labels: int, max_label_sets: int) -> bool:
    """Admit what the rollups hold and was not decided yet, in this transaction (commit it). False when another
    transaction is admitting now (PostgreSQL): nothing was done, it decides them.

    Call it on a fresh session: the rollups are read before the lock (SQLite's driver runs reads outside a
    transaction; PostgreSQL's READ COMMITTED reads what was committed when each query starts, so the admitted tables
    read again under the lock are current)."""
    caps = {"top_models": top_models, "top_labels": top_labels, "max_label_sets": max_label_sets}
    calls = _calls_per_label_set(session)
    seen = _admitted(session)
    plan = plan_admission(calls, seen, **caps)
    if session.get_bind().dialect.name == "postgresql":
        if not session.scalar(_LOCK):
            return False
    else:
        lock_sqlite_for_write(session)
    admitted = _admitted(session)
    if admitted != seen:  # another scrape admitted meanwhile
        plan = plan_admission(calls, admitted, **caps)
    if plan.values:
        session.execute(
            insert(V), [{"label": label, "value": value, "position": pos} for label, value, pos in plan.values]
        )
    if plan.sets:
        columns = ("provider", "model", "purpose", "extension", "is_byollm", "status")
        session.execute(
            insert(S), [dict(zip(columns, key, strict=True), position=position) for key, position in plan.sets]
        )
    return True


def _calls_per_label_set(session: Session) -> list[tuple[SetKey, int]]:
    rows = session.execute(select(*_RAW_KEYS, func.sum(R.calls)).group_by(*_RAW_KEYS))
    return [((p, m, pu, e, bool(b), st), int(calls or 0)) for p, m, pu, e, b, st, calls in rows]


def _admitted(session: Session) -> Admitted:
    values: dict[str, dict[str, int]] = {}
    for label, value, position in session.execute(select(V.label, V.value, V.position)):
        values.setdefault(label, {})[value] = position
    sets = {
        (p, m, pu, e, bool(b), st): position
        for p, m, pu, e, b, st, position in session.execute(
            select(S.provider, S.model, S.purpose, S.extension, S.is_byollm, S.status, S.position)
        )
    }
    return Admitted(values=values, sets=sets)
