"""The `metering` command as a person runs it (subprocess), on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from metering.db.models import ByollmSettingsRow, UsageEventRow

pytestmark = pytest.mark.slow
SECRET = "sk-ant-api03-CLI-SECRET-wxyz"


def metering(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metering.cli.main", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERING_", "ANTHROPIC_", "OPENAI_"))}
    env.update(METERING_DATA_DIR=str(tmp_path), METERING_DATABASE_URL=db_url, COLUMNS="200")
    return env


def test_rewrite_prints_the_result_and_the_recorded_usage(cli_env, session_factory) -> None:
    done = metering(
        [
            "rewrite",
            "--tone",
            "casual",
            "--user",
            "u1",
            "--tenant",
            "t1",
            "Per our previous conversation, attached please find the document.",
        ],
        cli_env,
    )
    assert done.returncode == 0, done.stderr
    assert '"provider": "simulated"' in done.stdout and '"is_byollm": false' in done.stdout
    assert "Recorded usage of invocation" in done.stdout and "content_rewrite" in done.stdout
    with session_factory() as session:
        rows = session.scalars(select(UsageEventRow)).all()
    assert [(r.user_id, r.function, r.status) for r in rows] == [("u1", "rewrite", "ok")]


def test_byollm_key_is_write_only(cli_env, session_factory) -> None:
    done = metering(
        ["byollm", "set", "--user", "u2", "--tenant", "t1", "--provider", "anthropic", "--model", "claude-haiku-4-5"],
        cli_env,
        stdin=SECRET + "\n",
    )
    assert done.returncode == 0, done.stderr
    shown = metering(["byollm", "show", "--user", "u2"], cli_env)
    assert shown.returncode == 0, shown.stderr
    for output in (done.stdout + done.stderr, shown.stdout + shown.stderr):
        assert SECRET not in output
    assert "sk-…wxyz" in shown.stdout
    with session_factory() as session:
        row = session.scalars(select(ByollmSettingsRow)).one()
    assert row.api_key_ciphertext and SECRET.encode() not in row.api_key_ciphertext


def test_bad_input_gets_a_clear_error_and_exit_code(cli_env) -> None:
    done = metering(["rewrite", "--tone", "sarcastic", "hello"], cli_env)
    assert done.returncode != 0
    assert "tone" in done.stderr and "Traceback" not in done.stderr
    missing = metering(["byollm", "show", "--user", "nobody"], cli_env)
    assert missing.returncode == 2 and "no BYOLLM settings" in missing.stderr
    for command in (
        ["byollm", "set", "--user", "u3", "--tenant", "t1", "--provider", "openai_compatible", "--model", "llama3"],
        ["purpose", "set", "content_rewrite", "--provider", "openai_compatible", "--model", "llama3"],
    ):
        leaky = metering([*command, "--base-url", "http://admin:hunter2@localhost:11434/v1"], cli_env)
        assert leaky.returncode != 0 and "must not carry credentials" in leaky.stderr, leaky.stderr
        assert "hunter2" not in leaky.stdout + leaky.stderr and "Traceback" not in leaky.stderr


def test_rewrite_with_the_http_sink_down_keeps_the_event_and_waits_once(cli_env, tmp_path) -> None:
    """The sink is unreachable: the call's result is printed, the event stays spooled, and the command waits for
    delivery once (30 s), not a second time on its way out (it used to take 61 s)."""
    import time

    from metering.spool.inspect import slot_states

    env = {
        **cli_env,
        "METERING_SPOOL__SINK": "http",
        "METERING_SPOOL__HTTP_URL": "http://127.0.0.1:9",  # discard port: connection refused
        "METERING_SPOOL__HTTP_TOKEN": "mtr_unused",
    }
    start = time.monotonic()
    done = metering(["rewrite", "--tone", "formal", "hey, send me the file"], env)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert "stays on disk" in done.stdout and "Recorded usage" not in done.stdout
    assert elapsed < 50, elapsed
    assert sum(state.pending for state in slot_states(tmp_path / "spool")) == 1
