"""Repository for raw usage events. Only flushes; the caller owns the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from metering.db.models import UsageEventRow


def count_events(session: Session, user_id: str | None = None, tenant_id: str | None = None) -> int:
    stmt = select(func.count()).select_from(UsageEventRow)
    if user_id is not None:
        stmt = stmt.where(UsageEventRow.user_id == user_id)
    if tenant_id is not None:
        stmt = stmt.where(UsageEventRow.tenant_id == tenant_id)
    return session.execute(stmt).scalar_one()


def events_for_invocations(session: Session, invocation_ids: Sequence[Any]) -> list[UsageEventRow]:
    if not invocation_ids:
        return []
    stmt = (
        select(UsageEventRow)
        .where(UsageEventRow.invocation_id.in_(list(invocation_ids)))
        .order_by(UsageEventRow.occurred_at, UsageEventRow.event_id)
    )
    return list(session.scalars(stmt))


def recent_events(
    session: Session, limit: int = 20, user_id: str | None = None, tenant_id: str | None = None
) -> list[UsageEventRow]:
    stmt = select(UsageEventRow).order_by(UsageEventRow.event_id.desc()).limit(limit)
    if user_id is not None:
        stmt = stmt.where(UsageEventRow.user_id == user_id)
    if tenant_id is not None:
        stmt = stmt.where(UsageEventRow.tenant_id == tenant_id)
    return list(session.scalars(stmt))
