"""``metering invoke`` of a handler that fails after metered calls shows those calls (billed when they used the
provider) whatever the error, then exits non-zero (in-process, both databases)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import select
from typer.testing import CliRunner

from metering import extensions
from metering.cli import app
from metering.db.models import UsageEventRow
from tests.fakes.extensions import buggy


@pytest.fixture
def invoke_buggy(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], Result]:
    for name in ("METERING_ENV", "METERING_SECRET_KEYS", "METERING_BILLING__MARKUP_PCT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(extensions.BUNDLED, "buggy", buggy)
    env = {"METERING_DATA_DIR": str(tmp_path), "METERING_DATABASE_URL": db_url, "COLUMNS": "200"}

    def invoke(function: str, user: str) -> Result:
        args = ["invoke", "buggy", function, "-p", '{"text": "hello"}', "-u", user]
        return CliRunner().invoke(app, args, env=env)

    return invoke


def shows_the_billed_call(result: Result, session_factory: Any, user: str, function: str) -> None:
    with session_factory() as session:
        [row] = session.scalars(select(UsageEventRow).where(UsageEventRow.user_id == user)).all()
    assert (row.status, row.billing_status) == ("ok", "billed")
    assert f"Metered usage of failed invocation {row.invocation_id}" in result.stdout, result.stdout
    assert f"buggy.{function}#0" in result.stdout


def test_a_handler_bug_after_a_billed_call_shows_the_call_then_fails(invoke_buggy, session_factory) -> None:
    """Not a MeteringError (a bug in the handler): the CLI showed a traceback and no usage, as if nothing had been
    spent, while the call before it was billed."""
    result = invoke_buggy("run", "bug-u")
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, RuntimeError) and "a bug after the call" in str(result.exception)
    shows_the_billed_call(result, session_factory, "bug-u", "run")


def test_a_ctrl_c_after_a_billed_call_shows_the_call_then_fails(invoke_buggy, session_factory) -> None:
    """asyncio.run turns the Ctrl-C into a cancellation of the invocation, then raises a new KeyboardInterrupt."""
    result = invoke_buggy("interrupted", "ctrl-c-u")
    assert result.exit_code == 130, result.output  # typer: a KeyboardInterrupt exits 130
    shows_the_billed_call(result, session_factory, "ctrl-c-u", "interrupted")
