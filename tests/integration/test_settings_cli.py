"""`metering purpose / byollm / budget set` (in-process) apply the rules the admin API applies, on both databases."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import select
from typer.testing import CliRunner

from metering.cli import app
from metering.db.models import ByollmSettingsRow, PurposeSettingsRow


@pytest.fixture
def run(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("METERING_ENV", "METERING_SECRET_KEYS"):
        monkeypatch.delenv(name, raising=False)
    env = {"METERING_DATA_DIR": str(tmp_path), "METERING_DATABASE_URL": db_url, "COLUMNS": "200"}
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), env=env)


def refused(result: Result, *needles: str) -> None:
    """Exit 1 with a one-line ``error:`` naming the reason; never a traceback."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") <= 2, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_purpose_params_named_like_secrets_are_refused_as_by_the_api(run, session_factory) -> None:
    params = '{"api_key": "sk-live-SECRET", "nested": {"token": "t0k"}, "top_p": 0.9}'
    done = run("purpose", "set", "leaky", "--provider", "openai", "--model", "gpt-4o-mini", "--params", params)
    refused(done, "params.api_key, params.nested.token", "stored and shown in clear", "[invalid_input]")
    assert "sk-live-SECRET" not in done.output
    with session_factory() as session:
        assert session.scalars(select(PurposeSettingsRow)).all() == []
    ok = run("purpose", "set", "fine", "--provider", "openai", "--model", "m", "--params", '{"api_key": null}')
    assert ok.exit_code == 0, ok.output  # a null (no secret) is fine, as in the API


def test_byollm_set_never_moves_a_user_to_another_tenant(run, session_factory) -> None:
    assert run("byollm", "set", "-u", "carol", "-t", "acme", "--provider", "simulated", "--model", "m1").exit_code == 0
    moved = run("byollm", "set", "-u", "carol", "-t", "globex", "--provider", "simulated", "--model", "m2")
    refused(moved, "'carol' has BYOLLM settings under another tenant", "[conflict]")
    with session_factory() as session:
        row = session.get(ByollmSettingsRow, "carol")
        assert row is not None and (row.tenant_id, row.model) == ("acme", "m1")
    again = run("byollm", "set", "-u", "carol", "-t", "acme", "--provider", "simulated", "--model", "m3")
    assert again.exit_code == 0, again.output  # its own tenant: replaced
    assert run("byollm", "delete", "-u", "carol").exit_code == 0
    moved = run("byollm", "set", "-u", "carol", "-t", "globex", "--provider", "simulated", "--model", "m2")
    assert moved.exit_code == 0, moved.output  # deleted first: set under the other tenant
