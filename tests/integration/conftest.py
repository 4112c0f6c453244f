"""Fixtures of the integration tests. ``run``: ``metering`` (the CLI) invoked in-process with the test's database
and data dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from metering.cli import app


@pytest.fixture
def run(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("METERING_ENV", "METERING_SECRET_KEYS"):
        monkeypatch.delenv(name, raising=False)
    env = {"METERING_DATA_DIR": str(tmp_path), "METERING_DATABASE_URL": db_url}
    runner = CliRunner()
    return lambda *args, columns=260: runner.invoke(app, list(args), env={**env, "COLUMNS": str(columns)})
