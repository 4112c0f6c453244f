"""Helpers of the admin, audit and invoke API tests: settings without provider keys, audit dumps."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from metering.config import Settings
from metering.db.models import AuditLogRow


def offline_settings(db_url: str, tmp_path: Path) -> Settings:
    """No provider keys, whatever the environment holds: the simulated provider answers (offline tests)."""
    return Settings(
        env="test",
        database_url=db_url,
        data_dir=tmp_path,
        anthropic_api_key=None,
        openai_api_key=None,
        secret_keys=None,
    )


def table_dump(session_factory: sessionmaker[Session], table: str) -> str:
    """Every value of every row of ``table`` as text (bytes decoded leniently): for scanning for secrets."""
    with session_factory() as session:
        rows = session.execute(text(f"SELECT * FROM {table}")).all()
    parts: list[str] = []
    for row in rows:
        for value in row:
            if isinstance(value, bytes | memoryview):
                parts.append(bytes(value).decode("latin-1"))
            else:
                parts.append(str(value))
    return "\n".join(parts)


def audit_rows(session_factory: sessionmaker[Session], action: str | None = None) -> list[AuditLogRow]:
    with session_factory() as session:
        stmt = select(AuditLogRow).order_by(AuditLogRow.at, AuditLogRow.id)
        if action is not None:
            stmt = stmt.where(AuditLogRow.action == action)
        return list(session.scalars(stmt))


def actions(session_factory: sessionmaker[Session]) -> list[str]:
    return [row.action for row in audit_rows(session_factory)]
