"""Repository for raw usage events. Only flushes; the caller owns the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from metering.db.models import UsageEventRow
from metering.events import UsageEvent, utcnow


@dataclass(frozen=True, slots=True)
class InsertResult:
    inserted: list[UsageEvent]
    duplicates: int


def event_row_values(event: UsageEvent, ingested_at: datetime) -> dict[str, Any]:
    values = event.model_dump()
    values["usage_completeness"] = event.usage_completeness.value
    values["status"] = event.status.value
    values["budget_exceeded"] = [limit.value for limit in event.budget_exceeded]
    values["ingested_at"] = ingested_at
    return values


def insert_events(session: Session, events: Sequence[UsageEvent]) -> InsertResult:
    """Insert events, skipping event_ids already stored (``ON CONFLICT DO NOTHING RETURNING``).

    Duplicates inside ``events`` itself are collapsed to their first occurrence.
    """
    if not events:
        return InsertResult(inserted=[], duplicates=0)
    unique: dict[Any, UsageEvent] = {}
    for event in events:
        unique.setdefault(event.event_id, event)
    now = utcnow()
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = UsageEventRow.__table__
    # One cached statement executed with many parameter sets: SQLAlchemy's "insertmanyvalues" batches
    # them into multi-row INSERT ... RETURNING without recompiling per batch.
    stmt = insert(table).on_conflict_do_nothing(index_elements=["event_id"]).returning(table.c.event_id)
    batch = list(unique.values())
    rows = [event_row_values(e, now) for e in batch]
    inserted_ids = set(session.connection().execute(stmt, rows).scalars())
    inserted = [e for e in batch if e.event_id in inserted_ids]
    return InsertResult(inserted=inserted, duplicates=len(events) - len(inserted))


def count_events(session: Session) -> int:
    return session.execute(select(func.count()).select_from(UsageEventRow)).scalar_one()


def events_for_invocations(session: Session, invocation_ids: Sequence[Any]) -> list[UsageEventRow]:
    if not invocation_ids:
        return []
    stmt = (
        select(UsageEventRow)
        .where(UsageEventRow.invocation_id.in_(list(invocation_ids)))
        .order_by(UsageEventRow.occurred_at, UsageEventRow.event_id)
    )
    return list(session.scalars(stmt))


def recent_events(session: Session, limit: int = 20, user_id: str | None = None) -> list[UsageEventRow]:
    stmt = select(UsageEventRow).order_by(UsageEventRow.event_id.desc()).limit(limit)
    if user_id is not None:
        stmt = stmt.where(UsageEventRow.user_id == user_id)
    return list(session.scalars(stmt))
