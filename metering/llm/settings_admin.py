"""Reads and deletes the admin API needs beside ``settings_store`` (SQL; only flushes, the edge commits)."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from metering.db.models import ExtensionBudgetRow, PurposeSettingsRow
from metering.db.row_lock import get_for_update


def get_purpose_row(session: Session, purpose: str, *, for_update: bool = False) -> PurposeSettingsRow | None:
    """``for_update``: to change it (``row_lock``: waits for a concurrent change, so an audit's before is right)."""
    if for_update:
        return get_for_update(session, PurposeSettingsRow, purpose)
    return session.get(PurposeSettingsRow, purpose)


def get_budget_row(session: Session, extension_id: str, *, for_update: bool = False) -> ExtensionBudgetRow | None:
    if for_update:
        return get_for_update(session, ExtensionBudgetRow, extension_id)
    return session.get(ExtensionBudgetRow, extension_id)


def list_budgets(session: Session) -> list[ExtensionBudgetRow]:
    return list(session.scalars(select(ExtensionBudgetRow).order_by(ExtensionBudgetRow.extension_id)))


def delete_budget(session: Session, extension_id: str) -> bool:
    result = session.execute(delete(ExtensionBudgetRow).where(ExtensionBudgetRow.extension_id == extension_id))
    session.flush()
    return bool(result.rowcount)  # type: ignore[attr-defined]
