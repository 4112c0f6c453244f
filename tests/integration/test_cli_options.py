"""Options the CLI bounds or checks before it acts (in-process, on both databases)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select

from metering.billing.ingest import ingest
from metering.billing.money import format_usd
from metering.db.models import UsageEventRow
from metering.events import event_from_record
from tests.fakes.events import record


@pytest.mark.parametrize("last", ["-1", "0", "10001", "99999999999999999999"])
def test_usage_last_is_bounded(run, last) -> None:
    """-1 was a PostgreSQL traceback (LIMIT must not be negative) and every event on SQLite; 1e20 an OverflowError."""
    done = run("usage", "--last", last)
    assert done.exit_code == 2 and isinstance(done.exception, SystemExit), (done.output, done.exception)
    assert "Invalid value for '--last'" in done.output
    assert run("usage", "--last", "10000").exit_code == 0


def test_ledger_export_into_a_missing_directory_is_a_clear_error(run, tmp_path) -> None:
    out = tmp_path / "nodir" / "x.csv"
    done = run("billing", "ledger-export", "2026-11", "-o", str(out))  # was a FileNotFoundError traceback
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), (done.output, done.exception)
    assert done.stderr == f"error: cannot write {out}: No such file or directory\n"
    assert not out.parent.exists()


def test_an_export_into_a_file_says_so_on_stderr_only(run, tmp_path) -> None:
    """stdout carries nothing but the CSV: with -o /dev/stdout (or a pipe), "wrote …" was appended to the CSV."""
    out = tmp_path / "ledger.csv"
    done = run("billing", "ledger-export", "2026-11", "-o", str(out))
    assert done.exit_code == 0, done.output
    assert done.stdout == "" and done.stderr == f"wrote {out}\n"
    assert out.read_text().startswith("id,created_at,kind,")


def test_invoice_export_into_a_missing_directory_is_a_clear_error(run, tmp_path, session_factory) -> None:
    now = datetime.now(UTC)
    with session_factory() as session:
        event = event_from_record(record(0, tenant_id="acme", user_id="alice", occurred_at=now - timedelta(minutes=5)))
        ingest(session, [event], markup_pct=Decimal(20), now=now)
        session.commit()
    out = tmp_path / "nodir" / "inv.csv"
    done = run("billing", "invoices", "export", "acme", "alice", now.strftime("%Y-%m"), "-o", str(out))
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), (done.output, done.exception)
    assert done.stderr == f"error: cannot write {out}: No such file or directory\n"


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_serve_refuses_a_port_outside_1_to_65535(run, monkeypatch, port) -> None:
    import uvicorn

    served: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: served.append(kwargs))  # 99999 used to listen
    done = run("serve", "--no-migrate", "--port", port)
    assert done.exit_code == 2 and "Invalid value for '--port'" in done.output, done.output
    assert served == []
    assert run("serve", "--no-migrate", "--port", "65535").exit_code == 0 and served[0]["port"] == 65535


def test_serve_refuses_a_port_in_use_before_seeding_the_demo(run, monkeypatch, session_factory) -> None:
    """The demo's traffic was generated and an admin token printed for a server that then failed to bind (the printed
    curl reached the other process): found by a walkthrough of the README."""
    import socket

    import uvicorn
    from sqlalchemy import func, select

    from metering.db.models import UsageEventRow

    served: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: served.append(kwargs))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run("serve", "--port", str(port), "--demo")
    assert done.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in done.stderr, done.output
    assert served == []
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(UsageEventRow)) == 0


def test_serve_refuses_a_host_that_does_not_resolve_before_seeding_the_demo(run, monkeypatch, session_factory) -> None:
    """An unresolvable --host was left to uvicorn: the demo seeded and its admin token printed, then uvicorn's
    'ERROR: [Errno -2] Name or service not known' among its log lines, exit 3."""
    import uvicorn
    from sqlalchemy import func, select

    from metering.db.models import UsageEventRow

    served: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: served.append(kwargs))
    done = run("serve", "--host", "no-such-host.invalid", "--port", "8181", "--demo")
    assert done.exit_code == 1, done.output
    assert done.stderr.startswith("error: cannot listen on no-such-host.invalid:8181: "), done.stderr
    assert served == [] and "mtr_" not in done.output
    foreign = run("serve", "--host", "192.0.2.1", "--port", "8181")  # TEST-NET-1: no interface of this host has it
    assert foreign.exit_code == 1 and foreign.stderr.endswith("(check --host)\n"), foreign.stderr  # not "--port"
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(UsageEventRow)) == 0


def test_usage_shows_an_unknown_shadow_cost_as_unknown_and_counts_the_users_events(run, session_factory) -> None:
    """A BYOLLM call of a model nobody prices showed '$0.00 (shadow)', and --user showed the total of every user's
    events (a README walkthrough)."""
    priced = record(0, user_id="erin", is_byollm=True)
    unpriced = record(1, user_id="bob", is_byollm=True, provider="ollama", model="llama3.1-8b")
    with session_factory() as session:
        ingest(session, [event_from_record(priced), event_from_record(unpriced), event_from_record(record(2))])
        session.commit()
    bob = run("usage", "--user", "bob")
    assert bob.exit_code == 0 and "Last 1 of 1 events of user bob" in bob.output, bob.output
    assert "no price (shadow)" in bob.output and "$0.00" not in bob.output
    erin = run("usage", "--user", "erin")
    assert "(shadow)" in erin.output and "unknown" not in erin.output


def test_invoke_params_nested_thousands_of_levels_deep_are_one_error_line(run) -> None:
    """json.loads raises RecursionError, not ValueError, on such JSON: it was a traceback."""
    deep = '{"text": ' + "[" * 20_000 + "]" * 20_000 + "}"
    done = run("invoke", "rewrite", "rewrite", "-p", deep)
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), done.exception
    assert done.stderr.startswith("error: --params is not valid JSON"), done.stderr


def test_usage_shows_one_hour_cache_writes_and_web_searches(run, session_factory, monkeypatch) -> None:
    """A call held for its searches showed no searches at all: nothing in the table said why it was held."""
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps a narrow table
    held = record(0, user_id="dana", model="claude-3-haiku-20240307", input_tokens=500, cache_write_tokens=300,
                  cache_write_1h_tokens=200, web_searches=3)  # fmt: skip
    with session_factory() as session:
        ingest(session, [event_from_record(held)])
        session.commit()
    done = run("usage", "--user", "dana")
    assert done.exit_code == 0, done.output
    [line] = [line for line in done.output.splitlines() if "claude-3-haiku" in line]
    assert "20/300 (200 1h)" in line and " 3 " in line and "unpriced" in line


def test_usage_tells_the_tenants_and_extensions_of_a_user_id_apart(run, session_factory) -> None:
    """A user id is unique only within its tenant: ``--user ann`` showed two tenants' ann as one user, with no tenant
    nor extension in the table (whose events, which extension spent it, could not be read), and no way to ask for one
    tenant's ann."""
    records = [
        record(0, tenant_id="acme", user_id="ann", extension_id="summarize"),
        record(1, tenant_id="globex", user_id="ann", extension_id="rewrite"),
        record(2, tenant_id="globex", user_id="bob", extension_id="rewrite"),
    ]
    with session_factory() as session:
        ingest(session, [event_from_record(r) for r in records])
        session.commit()
    both = run("usage", "--user", "ann")
    assert both.exit_code == 0 and "Last 2 of 2 events of user ann" in both.output, both.output
    lines = [line for line in both.output.splitlines() if "claude-sonnet" in line]
    assert len(lines) == 2
    assert any("acme" in line and "summarize" in line for line in lines), both.output
    assert any("globex" in line and "rewrite" in line for line in lines), both.output
    one = run("usage", "--tenant", "globex", "--user", "ann")
    assert one.exit_code == 0 and "Last 1 of 1 events of user ann of tenant globex" in one.output, one.output
    assert "acme" not in one.output
    tenant = run("usage", "--tenant", "globex")
    assert tenant.exit_code == 0 and "Last 2 of 2 events of tenant globex" in tenant.output, tenant.output


def test_usage_in_a_narrow_terminal_wraps_ids_and_never_cuts_an_amount(run, session_factory) -> None:
    """The table had 19 columns: below ~250 columns rich cut cells to '…', the charge included ('$0.0…')."""
    tenant, user = "tenant-with-a-long-name", "user-with-a-long-name"
    events = [
        record(0, tenant_id=tenant, user_id=user, input_tokens=123_456, output_tokens=7_890, cache_read_tokens=1_000,
               web_searches=2),
        record(1, tenant_id=tenant, user_id="user-b", is_byollm=True, provider="ollama", model="llama3.1-8b"),
    ]  # fmt: skip
    with session_factory() as session:
        ingest(session, [event_from_record(e) for e in events], markup_pct=Decimal(20))
        session.commit()
        charge = session.scalar(select(UsageEventRow.charge_nanos).where(UsageEventRow.user_id == user))
    done = run("usage", columns=100)
    assert done.exit_code == 0, done.output
    assert "…" not in done.output
    assert max(len(line) for line in done.output.splitlines()) <= 100
    assert charge and format_usd(charge) in done.output  # on one line, whole
    assert "no price (shadow)" in done.output
    # each column's cells read top to bottom: a folded id is whole again
    body = [line.split("│")[1:-1] for line in done.output.splitlines() if line.startswith("│")]
    columns = ["".join(cells[i].strip() for cells in body) for i in range(len(body[0]))]
    assert columns[:2] == [tenant * 2, f"{user}user-b"]
    for text in ("123456", "7890", "1000/0", "byollm", "2"):
        assert any(text in column for column in columns), text


def test_usage_tells_apart_owners_whose_ids_joined_by_a_slash_read_the_same(run, session_factory) -> None:
    """The owner column read 'tenant/user': tenant 'a/b' with user 'c' and tenant 'a' with user 'b/c' were both
    'a/b/c'."""
    records = [record(0, tenant_id="a/b", user_id="c"), record(1, tenant_id="a", user_id="b/c")]
    with session_factory() as session:
        ingest(session, [event_from_record(r) for r in records])
        session.commit()
    done = run("usage")
    assert done.exit_code == 0, done.output
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in done.output.splitlines()]
    assert sorted(row[:2] for row in rows if row) == [["a", "b/c"], ["a/b", "c"]], done.output
