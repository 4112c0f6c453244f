"""The `metering` command as a person runs it (subprocess), on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
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
    """The sink is unreachable: the call's result is printed, the event stays spooled (the output says why), and the
    command waits for delivery once (30 s), not a second time on its way out (it used to take 61 s)."""
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
    # why, as the flusher last heard it (it guessed "the sink is unreachable", also of a sink refusing the events)
    assert "POST http://127.0.0.1:9/v1/events failed: ConnectError" in " ".join(done.stdout.split()), done.stdout
    assert elapsed < 50, elapsed
    assert sum(state.pending for state in slot_states(tmp_path / "spool")) == 1


def bare_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERING_", "ANTHROPIC_", "OPENAI_"))}
    return {**env, "METERING_DATA_DIR": str(tmp_path), "COLUMNS": "80", **settings}


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr  # one line, even long
    return done.stderr


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({"METERING_ENV": "prod"}, ["METERING_SECRET_KEYS is required when METERING_ENV=prod"]),
        (
            {
                "METERING_BILLING__MARKUP_PCT": "1.0000000001",
                "METERING_API__MAX_BATCH_EVENTS": "6000",
                "METERING_SPOOL__FLUSHER": "bogus",
            },
            ["METERING_BILLING__MARKUP_PCT: ", "METERING_API__MAX_BATCH_EVENTS: ", "METERING_SPOOL__FLUSHER: "],
        ),
    ],
)
def test_invalid_settings_are_one_error_line_listing_them(tmp_path, settings, names) -> None:
    for command in (["usage"], ["migrate"], ["budget", "set", "x", "--max-calls", "1"]):
        error = one_error_line(metering(command, bare_env(tmp_path, **settings)))
        assert error.startswith("error: invalid settings: ") and all(name in error for name in names), error
        assert "1.0000000001" not in error and "bogus" not in error  # names, never values


@pytest.mark.parametrize(
    ("url", "shown", "cause"),
    [
        (
            "postgresql+psycopg://postgres:hunter2@127.0.0.1:5499/x",
            "postgresql+psycopg://postgres:***@127.0.0.1:5499/x",
            "Connection refused",
        ),
        ("foo://bar", "foo://bar", "Can't load plugin: sqlalchemy.dialects:foo"),
        ("not a url", "not a url", "Could not parse SQLAlchemy URL"),
    ],
)
def test_an_unusable_database_is_one_error_line_naming_it_without_its_password(tmp_path, url, shown, cause) -> None:
    for command in (["migrate"], ["serve", "--port", "8799"], ["usage"]):
        error = one_error_line(metering(command, bare_env(tmp_path, METERING_DATABASE_URL=url)))
        assert f"error: cannot use the database at {shown}" in error and cause in error, error
        assert "hunter2" not in error


def test_invoke_that_fails_after_metered_calls_shows_them_then_one_error_line(cli_env, session_factory) -> None:
    """An enforced budget refuses chatty's third call: the two made before are metered and billed. The API answers
    them with the problem (invocation_id, event_ids); the CLI printed only the error, as if nothing had been spent."""
    budget = metering(["budget", "set", "chatty", "--max-calls", "2", "--mode", "enforce"], cli_env)
    assert budget.returncode == 0, budget.stderr
    params = '{"messages": ["one", "two", "three"], "polish_rounds": 0}'
    done = metering(["invoke", "chatty", "summarize_thread", "-p", params, "-u", "u1", "-t", "t1"], cli_env)
    assert "budget_exceeded" in one_error_line(done)
    with session_factory() as session:
        rows = session.scalars(select(UsageEventRow)).all()
    assert len(rows) == 2 and {r.billing_status for r in rows} == {"billed"}
    invocation_id = str(rows[0].invocation_id)
    assert f"Metered usage of failed invocation {invocation_id}" in done.stdout, done.stdout
    assert "chatty.summarize_thread#0" in done.stdout and "chatty.summarize_thread#1" in done.stdout


def test_demo_counts_the_calls_of_invocations_that_failed_after_metered_calls(cli_env, session_factory) -> None:
    """With chatty's budget enforced at 3 calls, each chatty invocation makes 3 metered (billed) calls, then fails:
    the summary said `chatty: 3 invocations, 0 calls`, and a total that left those calls out."""
    budget = metering(["budget", "set", "chatty", "--max-calls", "3", "--mode", "enforce"], cli_env)
    assert budget.returncode == 0, budget.stderr
    done = metering(["demo"], cli_env)
    assert done.returncode == 0, done.stderr
    with session_factory() as session:
        rows = session.scalars(select(UsageEventRow)).all()
    chatty = [r for r in rows if r.extension_id == "chatty"]
    assert len(chatty) == 9
    summary = " ".join(done.stdout.split())  # rich wraps the line
    assert f"3 failed, {len(rows)} metered LLM calls" in summary, summary
    assert "chatty: 3 invocations, 9 calls" in summary, summary


def test_tokens_list_piped_prints_each_token_on_one_line(cli_env, session_factory) -> None:
    """`metering tokens list | grep …` (or `> file`, from cron): with no terminal rich took 80 columns and squeezed
    the table into them, the dates wrapped one character per line. Piped, and no COLUMNS given, a table now takes
    the width it needs; a terminal's width (COLUMNS) still wraps it as documented."""
    env = {k: v for k, v in cli_env.items() if k not in ("COLUMNS", "LINES")}
    name = "spool-sink for the eu-west-1 production cluster"
    created = metering(["tokens", "create", "--name", name, "--scope", "ingest", "--scope", "read", "-t", "tenant-1"],
                       env)  # fmt: skip
    assert created.returncode == 0, created.stderr
    listed = metering(["tokens", "list"], env, stdin="")  # stdin, stdout and stderr pipes: no terminal anywhere
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if created.stdout.strip()[:8] in line]
    assert name in row and "ingest,read" in row and "tenant-1" in row, listed.stdout
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", row), listed.stdout  # the creation date whole, on the row
    narrow = metering(["tokens", "list"], {**env, "COLUMNS": "80"}, stdin="")
    assert max(map(len, narrow.stdout.splitlines())) <= 80, narrow.stdout
