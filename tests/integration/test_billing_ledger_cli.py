"""The billing ledger commands (overrides, credit, balances, reprice, rerate), in-process on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import typer
from sqlalchemy import func, select
from typer.testing import CliRunner

from metering.billing.ingest import ingest
from metering.cli.billing_ledger import register
from metering.db.models import PriceOverrideRow, TransferRow, UsageEventRow
from metering.events import event_from_record
from tests.fakes.events import record

app = typer.Typer()
register(app)


@pytest.fixture
def run(db_url, tmp_path, monkeypatch):
    for name in ("METERING_DATABASE_URL", "METERING_DATA_DIR", "METERING_BILLING__MARKUP_PCT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("METERING_DATABASE_URL", db_url)
    monkeypatch.setenv("METERING_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("METERING_BILLING__MARKUP_PCT", "20")
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, (result.output, result.exception)
        return result.output

    return invoke


def test_override_reprice_rerate_credit_and_balances(run, session_factory) -> None:
    now = datetime.now(UTC)
    fields = {"provider": "ollama", "model": "llama3.1", "input_tokens": 1_000_000, "output_tokens": 500_000,
              "cache_read_tokens": 0, "occurred_at": now - timedelta(hours=1)}  # fmt: skip
    event = event_from_record(record(0, **fields))
    with session_factory() as session:
        ingest(session, [event], markup_pct=Decimal(20), now=now)
        session.commit()
    since = (now - timedelta(days=1)).date().isoformat()
    out = run("overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "0.10", "--output", "0.40",
              "--from", since, "--id", "llama-old")  # fmt: skip
    assert '"input_usd_per_mtok": "0.100000000"' in out  # 9 decimals, as the API shows them
    out = run("overrides", "add", "--provider", "elsewhere", "--model", "m", "--input", "20", "--output", "20")
    assert '"output_usd_per_mtok": "20.000000000"' in out  # not "2E+1"
    run("overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "0.0000000001", "--output", "0",
        code=1)  # fmt: skip
    # An id the API could never end (POST …/{id}:end takes one path segment) is refused by the CLI too.
    run("overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "1", "--output", "1",
        "--id", "ollama/llama3", code=1)  # fmt: skip
    assert "priced 1 held event(s) ($0.36 charged, $0.30 provider cost); 0 still unpriced" in run("reprice")
    # It priced the event (an hour ago): ended before it, the event would keep its price unsaid. Refused, naming the
    # event and the re-rate; with --keep-priced-events it is ended and says what to re-rate.
    refused = run("overrides", "end", "llama-old", "--at", (now - timedelta(hours=2)).isoformat(), code=1)
    assert "priced 1 billed event(s)" in refused and "--keep-priced-events" in refused
    assert "metering billing rerate --from" in refused
    ended = run("overrides", "end", "llama-old", "--at", (now - timedelta(hours=2)).isoformat(),
                "--keep-priced-events")  # fmt: skip
    first = (now - timedelta(hours=1)).isoformat().replace("+00:00", "Z")  # as the API writes it
    assert '"billed": 1' in ended and f'"first_occurred_at": "{first}"' in ended
    run("overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "0.20", "--output", "0.80",
        "--from", since, "--id", "llama-new")  # fmt: skip
    assert "llama-new" in run("overrides", "list", "--provider", "ollama", "--active")
    window = ("--from", since, "--to", (now + timedelta(days=1)).isoformat())
    dry = run("rerate", *window)
    assert "│ tenant-1 │ user-1 │" in dry and "rewrite" in dry and "$0.36" in dry and "dry run: nothing changed" in dry
    run("rerate", *window, "--apply", code=1)  # --apply needs --run-id
    applied = run("rerate", *window, "--apply", "--run-id", "fix-1")
    assert "run fix-1: 4 transfer(s) posted" in applied
    assert "run fix-1: 0 transfer(s) posted" in run("rerate", *window, "--apply", "--run-id", "fix-1")
    assert '"replayed": false' in run("credit", "add", "-t", "tenant-1", "-u", "user-1", "--amount", "5", "--key", "k1")
    assert '"replayed": true' in run("credit", "add", "-t", "tenant-1", "-u", "user-1", "--amount", "5", "--key", "k1")
    conflict = run("credit", "add", "-t", "tenant-1", "-u", "user-1", "--amount", "6", "--key", "k1", code=1)
    assert "idempotency key 'k1' was already used for a different request" in conflict
    balances = run("balances", "--tenant", "tenant-1")
    assert "user:tenant-1:user-1" in balances and "$4.28" in balances  # 5 - 0.72
    with session_factory() as session:
        assert session.get(UsageEventRow, event.event_id).charge_nanos == 720_000_000
        assert session.scalar(select(func.count()).select_from(TransferRow)) == 2 + 4 + 1


def test_invoice_commands_print_ids_as_they_are_and_refuse_a_missing_invoice(run, session_factory) -> None:
    """Ids that look like Rich markup ('[/x]') crashed `invoices list` for everyone; a mistyped user exported an
    empty draft with exit 0 (the API answers 404)."""
    from metering.cli.billing_cmd import billing_app

    now = datetime.now(UTC)
    event = event_from_record(
        record(0, tenant_id="[/x]", user_id="[bold red]u", occurred_at=now - timedelta(minutes=5))
    )
    with session_factory() as session:
        ingest(session, [event], markup_pct=Decimal(20), now=now)
        session.commit()
    runner = CliRunner()
    period = now.strftime("%Y-%m")

    def billing(*args: str, code: int = 0) -> str:
        result = runner.invoke(billing_app, list(args))
        assert result.exit_code == code, (result.output, result.exception)
        return result.output

    listed = billing("invoices", "list")
    assert "[/x]" in listed and "[bold red]u" in listed
    shown = billing("invoices", "show", "[/x]", "[bold red]u", period)
    assert "Invoice" in shown and "[/x] / [bold red]u" in shown
    assert "[/x],[bold red]u" in billing("invoices", "export", "[/x]", "[bold red]u", period)
    missing = billing("invoices", "export", "[/x]", "typo", period, code=1)
    assert "no invoice for tenant [/x], user typo" in missing and "[not_found]" in missing
    billing("invoices", "show", "[/x]", "typo", period, code=1)
    assert "ok: balances sum to zero" in billing("check")


def test_credit_ids_beyond_their_columns_are_refused(run, session_factory) -> None:
    """A 300-character user id gave a traceback on PostgreSQL (StringDataRightTruncation) and was stored on SQLite."""
    for who in (("-t", "acme", "-u", "u" * 201), ("-t", "t" * 201, "-u", "alice")):
        out = run("credit", "add", *who, "--amount", "1", "--key", f"k-{len(who[1])}", code=1)
        assert "tenant_id and user_id have at most 200 characters [invalid_input]" in out
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(TransferRow)) == 0


def test_moments_whose_utc_value_overflows_are_refused(run, session_factory) -> None:
    """Python cannot hold them in UTC: an OverflowError traceback (the API answers 422)."""
    out = run("rerate", "--from", "0001-01-01T00:00:00+14:00", "--to", "2026-01-01", code=1)
    assert "--from '0001-01-01T00:00:00+14:00': the time in UTC is out of range (years 1 to 9999)" in out
    late = "9999-12-31T23:59:59-14:00"
    out = run("overrides", "add", "--provider", "p", "--model", "m", "--input", "1", "--output", "1", "--from", late,
              code=1)  # fmt: skip
    assert "the time in UTC is out of range" in out
    assert "the time in UTC is out of range" in run("overrides", "end", "any", "--at", late, code=1)
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(PriceOverrideRow)) == 0
    run("overrides", "add", "--provider", "p", "--model", "m", "--input", "1", "--output", "1", "--from",
        "0001-01-01", "--to", "9999-12-31T23:59:59+00:00")  # fmt: skip
    run("rerate", "--from", "0001-01-01", "--to", "9999-12-31T23:59:59.999999Z")


def test_an_export_file_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    """Exports stream into a file beside the target, renamed once complete: a failure midway leaves nothing."""
    from metering.cli.billing_invoices import _write

    def failing():
        yield "a,b\r\n"
        raise RuntimeError("the database went away")

    out = tmp_path / "ledger.csv"
    with pytest.raises(RuntimeError):
        _write(failing(), out)
    assert list(tmp_path.iterdir()) == []  # neither the export nor its partial file

    _write(iter(["a,b\r\n", "1,2\r\n"]), out)
    assert out.read_bytes() == b"a,b\r\n1,2\r\n" and list(tmp_path.iterdir()) == [out]
    with pytest.raises(typer.Exit):
        _write(iter(["x"]), tmp_path / "missing" / "ledger.csv")


def test_an_export_to_a_pipe_or_a_symlink_is_written_through_not_replaced(tmp_path: Path) -> None:
    """``-o /dev/stdout``, ``-o >(gzip > x.gz)`` (a pipe) and a symlink are written through: renamed over, the
    pipe (and, as root, /dev/stdout itself) was replaced by a regular file and the reader got nothing; a symlink
    became a file, its target left as it was."""
    import os

    from metering.cli.billing_invoices import _write

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there: the export's open does not block
    try:
        _write(iter(["a,b\r\n", "1,2\r\n"]), fifo)
        assert os.read(reader, 1000) == b"a,b\r\n1,2\r\n"
    finally:
        os.close(reader)
    assert fifo.is_fifo()

    target, link = tmp_path / "target.csv", tmp_path / "link.csv"
    target.write_text("old")
    link.symlink_to(target.name)
    _write(iter(["a,b\r\n"]), link)
    assert link.is_symlink() and target.read_bytes() == b"a,b\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "pipe", "target.csv"]


def test_an_override_provider_is_stored_lowercase_as_by_the_api(run, session_factory) -> None:
    """`--provider Ollama` was stored as sent, where the API and the per-purpose and BYOLLM settings lowercase it."""
    out = run("overrides", "add", "--provider", "Ollama", "--model", "llama3*", "--input", "1", "--output", "1",
              "--id", "ovr_cased")  # fmt: skip
    assert '"provider": "ollama"' in out
    with session_factory() as session:
        assert session.get(PriceOverrideRow, "ovr_cased").provider == "ollama"
    assert '"ovr_cased"' in run("overrides", "list", "--provider", "OLLAMA")


def test_an_override_with_one_hour_cache_writes_and_web_searches(run, session_factory) -> None:
    out = run("overrides", "add", "--provider", "anthropic", "--model", "claude-3-haiku*", "--input", "0.25",
              "--output", "1.25", "--cache-write-1h", "0.5", "--web-search", "10", "--id", "haiku")  # fmt: skip
    assert '"cache_write_1h_usd_per_mtok": "0.500000000"' in out and '"web_search_usd_per_k": "10.000000000"' in out
    with session_factory() as session:
        row = session.get(PriceOverrideRow, "haiku")
        assert (row.cache_write_1h_nanos_per_mtok, row.web_search_nanos_per_k) == (500_000_000, 10_000_000_000)
    bad = run("overrides", "add", "--provider", "anthropic", "--model", "x", "--input", "1", "--output", "1",
              "--web-search", "0.0000000001", code=1)  # fmt: skip
    assert "$ per 1,000 searches" in bad


def test_reprice_says_why_events_stay_held_when_the_override_starts_after_them(run, session_factory) -> None:
    """`overrides add` starts a price now by default: a reprice then left the past held events held, silently."""
    now = datetime.now(UTC)
    held = record(0, provider="ollama", model="llama3.1", occurred_at=now - timedelta(hours=2))
    with session_factory() as session:
        ingest(session, [event_from_record(held)], markup_pct=Decimal(20), now=now)
        session.commit()
    run("overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "0.1", "--output", "0.4")
    out = run("reprice")
    assert "priced 0 held event(s)" in out and "1 still unpriced" in out
    assert "an override prices only the events that occurred while it is effective" in out
    since = (now - timedelta(days=1)).isoformat()
    run("overrides", "add", "--provider", "ollama", "--model", "llama3.1", "--input", "0.1", "--output", "0.4",
        "--from", since)  # fmt: skip
    out = run("reprice")
    assert "priced 1 held event(s)" in out and "effective" not in out


def test_billing_tables_in_a_narrow_terminal_wrap_ids_and_never_cut_an_amount(db_url, tmp_path, session_factory):
    """`invoices list`, `balances` and the re-rate tables cut cells to '…' in an 80-column terminal: a long tenant
    id ('tenant-xx…'), the total ('$21.6…') and a residue that is not zero ('$0.00…')."""
    from metering.billing.money import format_usd
    from metering.cli import app as cli

    now = datetime.now(UTC)
    tenant, user = "tenant-" + "x" * 60 + "-end", "user-" + "y" * 60 + "-end"
    events = [
        event_from_record(record(i, tenant_id=tenant, user_id=user, input_tokens=10**6 * (i + 1),
                                 occurred_at=now - timedelta(minutes=5)))
        for i in range(3)
    ]  # fmt: skip
    with session_factory() as session:
        ingest(session, events, markup_pct=Decimal(20), now=now)
        session.commit()
        total = sum(session.get(UsageEventRow, e.event_id).charge_nanos for e in events)
    env = {"METERING_DATA_DIR": str(tmp_path), "METERING_DATABASE_URL": db_url, "COLUMNS": "80"}
    window = ("--from", (now - timedelta(days=1)).isoformat(), "--to", (now + timedelta(days=1)).isoformat())
    for args in (["invoices", "list"], ["balances"], ["rerate", *window]):
        done = CliRunner().invoke(cli, ["billing", *args], env=env)
        assert done.exit_code == 0, done.output
        assert "…" not in done.output, done.output
        assert max(len(line) for line in done.output.splitlines()) <= 80
        assert format_usd(total) in done.output, done.output  # an amount on one line, whole
        first = done.output.split("Per extension")[0]  # of rerate's two tables, the per-user one
        body = [line.split("│")[1:-1] for line in first.splitlines() if line.startswith("│")]
        columns = ["".join(cells[i].strip() for cells in body) for i in range(len(body[0]))]
        assert any(tenant in column and user in column for column in columns) or (
            any(tenant in column for column in columns) and any(user in column for column in columns)
        ), done.output


def test_a_rerate_dry_run_tells_apart_users_whose_ids_joined_by_a_slash_read_the_same(run, session_factory) -> None:
    """The per-user table named each row 'tenant/user': tenant 'a/b' with user 'c' and tenant 'a' with user 'b/c'
    were two rows both named 'a/b/c'."""
    now = datetime.now(UTC)
    owners = [("a/b", "c"), ("a", "b/c")]
    events = [
        event_from_record(record(i, tenant_id=t, user_id=u, input_tokens=1_000_000 * (i + 1),
                                 occurred_at=now - timedelta(minutes=5)))
        for i, (t, u) in enumerate(owners)
    ]  # fmt: skip
    with session_factory() as session:
        ingest(session, events, markup_pct=Decimal(0), now=now)  # the run's markup is 20: every charge changes
        session.commit()
    dry = run("rerate", "--from", (now - timedelta(days=1)).isoformat(), "--to", (now + timedelta(days=1)).isoformat())
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in dry.split("Per extension")[0].splitlines()]
    assert sorted(row[:2] for row in rows if row) == [["a", "b/c"], ["a/b", "c"]], dry
    window = f"[{(now - timedelta(days=1)).isoformat()}, {(now + timedelta(days=1)).isoformat()})"
    assert window.replace("+00:00", "Z") in dry, dry  # the times as the rest of the CLI writes them, not "+00:00"


def test_billing_tables_show_control_characters_of_ids_as_escapes_never_send_them_to_the_terminal(
    db_url, tmp_path, session_factory
) -> None:
    """Ids come from clients (an ingest token): an ESC in one went to the operator's terminal as it was (a tenant
    '\\x1b]8;;http://x\\x1b\\\\' made a link, an extension '\\x1b[2J' cleared the screen), a newline split a
    user id over two rows."""
    from metering.cli import app as cli

    now = datetime.now(UTC)
    tenant, user, extension = "ev\x1b[31mil\x1b]8;;http://x\x1b\\", "u\u202eser\nnl", "e\x1b[2Jx"
    event = event_from_record(
        record(0, tenant_id=tenant, user_id=user, extension_id=extension, occurred_at=now - timedelta(minutes=5))
    )
    with session_factory() as session:
        ingest(session, [event], markup_pct=Decimal(0), now=now)  # the run's markup is 20: the re-rate changes it
        session.commit()
    env = {"METERING_DATA_DIR": str(tmp_path), "METERING_DATABASE_URL": db_url, "COLUMNS": "250",
           "METERING_BILLING__MARKUP_PCT": "20"}  # fmt: skip
    window = ("--from", (now - timedelta(days=1)).isoformat(), "--to", (now + timedelta(days=1)).isoformat())
    commands = (
        ["billing", "invoices", "list"],
        ["billing", "invoices", "show", tenant, user, now.strftime("%Y-%m")],
        ["billing", "balances"],
        ["billing", "rerate", *window],
        ["usage"],
    )
    for args in commands:
        done = CliRunner().invoke(cli, args, env=env)
        assert done.exit_code == 0, done.output
        assert not {"\x1b", "\u202e"} & set(done.output), repr(done.output)
        assert "ev\\x1b[31mil\\x1b]8;;http" in done.output, done.output
        assert "u\\u202eser\\nnl" in done.output, done.output
        if {"usage", "show", "rerate"} & set(args):
            assert "e\\x1b[2Jx" in done.output, done.output


def test_an_export_to_stdout_is_the_same_bytes_as_to_a_file(db_url, tmp_path, session_factory) -> None:
    """Written to stdout through click's echo, an export that was not read by a terminal (a pipe, `> file`) lost every
    ANSI sequence of its cells (a memo 'a\\x1b[31mb' exported as 'ab', an extension id the same): other bytes
    than `-o FILE` and the API's CSV, and no longer the ledger's memo or the invoice's line."""
    from metering.cli import app as cli

    now = datetime.now(UTC)
    event = event_from_record(
        record(0, tenant_id="t", user_id="u", extension_id="e\x1b[2Jx", occurred_at=now - timedelta(minutes=5))
    )
    with session_factory() as session:
        ingest(session, [event], markup_pct=Decimal(20), now=now)
        session.commit()
    env = {"METERING_DATA_DIR": str(tmp_path), "METERING_DATABASE_URL": db_url}
    runner = CliRunner()
    credit = ["billing", "credit", "add", "-t", "t", "-u", "u", "--amount", "1", "--key", "k", "--memo", "a\x1b[31mb"]
    assert runner.invoke(cli, credit, env=env).exit_code == 0
    period = now.strftime("%Y-%m")
    for args in (["billing", "ledger-export", period], ["billing", "invoices", "export", "t", "u", period]):
        piped = runner.invoke(cli, args, env=env)
        assert piped.exit_code == 0, piped.output
        path = tmp_path / "export.csv"
        written = runner.invoke(cli, [*args, "-o", str(path)], env=env)
        assert written.exit_code == 0, written.output
        assert piped.stdout_bytes == path.read_bytes()
        assert ("a\x1b[31mb" if "ledger-export" in args else "e\x1b[2Jx").encode() in piped.stdout_bytes


def test_ids_that_read_like_emoji_codes_are_printed_as_they_are(db_url, tmp_path, session_factory) -> None:
    """Rich replaces ':name:' emoji codes even with markup off: a tenant ':thumbs_up:-acme' was shown as '👍-acme' by
    `usage`, `invoices list/show` and `rerate`, and in an error line."""
    from metering.cli import app as cli

    now = datetime.now(UTC)
    tenant, user = ":thumbs_up:-acme", "u:smile:"
    event = event_from_record(record(0, tenant_id=tenant, user_id=user, occurred_at=now - timedelta(minutes=5)))
    with session_factory() as session:
        ingest(session, [event], markup_pct=Decimal(0), now=now)  # the run's markup is 20: the re-rate changes it
        session.commit()
    env = {"METERING_DATA_DIR": str(tmp_path), "METERING_DATABASE_URL": db_url, "COLUMNS": "250",
           "METERING_BILLING__MARKUP_PCT": "20"}  # fmt: skip
    window = ("--from", (now - timedelta(days=1)).isoformat(), "--to", (now + timedelta(days=1)).isoformat())
    period = now.strftime("%Y-%m")
    commands = (
        ["billing", "invoices", "list"],
        ["billing", "invoices", "show", tenant, user, period],
        ["billing", "rerate", *window],
        ["usage"],
    )
    for args in commands:
        done = CliRunner().invoke(cli, args, env=env)
        assert done.exit_code == 0, done.output
        assert tenant in done.output and user in done.output and "👍" not in done.output, done.output
    missing = CliRunner().invoke(cli, ["billing", "invoices", "show", tenant, "typo:smile:", period], env=env)
    assert missing.exit_code == 1
    assert f"no invoice for tenant {tenant}, user typo:smile:" in missing.output, missing.output
