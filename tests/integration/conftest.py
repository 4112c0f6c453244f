"""Fixtures of the integration tests. ``run``: ``metering`` (the CLI) invoked in-process with the test's database
and data dir; ``fresh_url``: an empty database of its own (a SQLite file, then a new PostgreSQL database), for
migration tests (never the shared ``db_url``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metering.cli import app
from tests.conftest import temporary_pg_database


@pytest.fixture
def run(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("METERING_ENV", "METERING_SECRET_KEYS"):
        monkeypatch.delenv(name, raising=False)
    env = {"METERING_DATA_DIR": str(tmp_path), "METERING_DATABASE_URL": db_url}
    runner = CliRunner()
    return lambda *args, columns=260: runner.invoke(app, list(args), env={**env, "COLUMNS": str(columns)})


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with temporary_pg_database() as url:
        yield url
