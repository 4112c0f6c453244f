"""Reads and deletes the admin API needs beside ``settings_store`` (SQL; only flushes, the edge commits)."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from metering.db.models import ExtensionBudgetRow, PurposeSettingsRow


def get_purpose_row(session: Session, purpose: str) -> PurposeSettingsRow | None:
    return session.get(PurposeSettingsRow, purpose)


def get_budget_row(session: Session, extension_id: str) -> ExtensionBudgetRow | None:
    return session.get(ExtensionBudgetRow, extension_id)


def list_budgets(session: Session) -> list[ExtensionBudgetRow]:
    return list(session.scalars(select(ExtensionBudgetRow).order_by(ExtensionBudgetRow.extension_id)))


def delete_budget(session: Session, extension_id: str) -> bool:
    result = session.execute(delete(ExtensionBudgetRow).where(ExtensionBudgetRow.extension_id == extension_id))
    session.flush()
    return bool(result.rowcount)  # type: ignore[attr-defined]
