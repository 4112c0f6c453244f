"""Run Alembic migrations programmatically (``metering migrate``, tests, the demo)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from alembic import command
from metering.db.engine import make_engine, normalise_url
from metering.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def alembic_config(url: str, lock_timeout_s: float | None = None) -> Config:
    ini = PROJECT_ROOT / "alembic.ini"
    if not ini.exists():
        raise ConfigError(f"alembic.ini not found at {ini}: install metering from a source checkout (pip install -e .)")
    cfg = Config(str(ini))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    cfg.attributes["url"] = normalise_url(url)
    if lock_timeout_s is not None:
        cfg.attributes["lock_timeout_s"] = lock_timeout_s
    return cfg


def upgrade(url: str, revision: str = "head", *, lock_timeout_s: float | None = None) -> None:
    """``alembic upgrade``; nothing when the database is at ``head`` already. A run locks out every other run (see
    ``alembic/env.py``; on SQLite that is the database write lock): every command migrates first, and one finding
    nothing to do must not wait for a writer. ``lock_timeout_s``: see ``migration_locks`` (default: the setting)."""
    if revision == "head" and _at_head(url):
        return
    command.upgrade(alembic_config(url, lock_timeout_s), revision)


def _at_head(url: str) -> bool:
    engine = make_engine(url)
    try:
        return current_revision(engine) == head_revision(url)
    finally:
        engine.dispose()


def downgrade(url: str, revision: str = "base", *, lock_timeout_s: float | None = None) -> None:
    command.downgrade(alembic_config(url, lock_timeout_s), revision)


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
