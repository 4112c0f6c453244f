"""Different billing operations at once, each `metering` command in its own OS process (PostgreSQL).

This test holds one operation's transaction open (its locks held); a `metering` command started meanwhile waits for
them, which the test sees in ``pg_stat_activity`` (a backend of this database waiting for a lock), then it commits.
What serialises each pair: finalization takes its month's advisory lock exclusively, ingest, reprice and re-rate
take it shared (``invoice_store.lock_billing_periods``); re-rate and reprice lock the events' rows; credits lock the
accounts they move. After each race the ledger checks hold and each amount lands once, on the right invoice.
SQLite needs no such test: every writer takes the database write lock before it reads anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from metering.billing import invoice_store, overrides
from metering.billing.checks import run_checks
from metering.billing.credits import add_credit
from metering.billing.ingest import ingest
from metering.billing.overrides import add_override
from metering.billing.rerate import apply_rerate
from metering.db.models import AccountRow, AuditLogRow, InvoiceRow, PriceOverrideRow, TransferRow
from metering.events import event_from_record
from tests.fakes.events import record

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("migrated_url", ["postgresql"], indirect=True)]

OCTOBER = datetime(2026, 10, 12, 9, tzinfo=UTC)
NOW = datetime.now(UTC)
GRACE = timedelta(hours=72)
MARKUP = Decimal(0)  # the commands' default markup
OLD_CHARGE = 300_000_000  # 1M in x $0.10 + 0.5M out x $0.40
NEW_CHARGE = 600_000_000  # at $0.20 / $0.80


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERING_", "ANTHROPIC_", "OPENAI_"))}
    env.update(METERING_DATA_DIR=str(tmp_path), METERING_DATABASE_URL=db_url, COLUMNS="200")
    return env


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "metering.cli.main", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


_WAITING = (  # a backend of this database waiting for a lock (not the migrations' lock: none is held at head)
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
    "AND query NOT LIKE '%metering:migrations%'"
)


def finish_after_it_waits(session_factory: sessionmaker[Session], holder: Session, child: subprocess.Popen[str]) -> str:
    """Once ``child`` waits for a lock ``holder`` holds, commit ``holder``; the child's output (it must succeed)."""
    with session_factory() as probe:
        while child.poll() is None:
            waiting = probe.scalar(text(_WAITING))
            probe.rollback()
            if waiting:
                break
            time.sleep(0.02)  # polling a state (the command starts, migrates, reaches the lock), not a race
    assert child.poll() is None, f"the command did not wait: {child.communicate()}"
    holder.commit()
    holder.close()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    return out


def llama(i: int, **kw) -> object:
    kw = {"provider": "ollama", "model": "llama3.1", "input_tokens": 1_000_000, "output_tokens": 500_000,
          "cache_read_tokens": 0, "occurred_at": OCTOBER, **kw}  # fmt: skip
    return event_from_record(record(i, **kw))


def price(session: Session, id: str, input_mtok: str, output_mtok: str, pattern: str) -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    add_override(session, provider="ollama", model_pattern=pattern, effective_from=since, effective_to=None,
                 input_mtok=Decimal(input_mtok), output_mtok=Decimal(output_mtok), id=id)  # fmt: skip


@pytest.fixture
def october(session_factory) -> None:
    """Two users' October calls at $0.10/$0.40, and since then a new price for llama3.1 (not yet re-rated)."""
    with session_factory() as session:
        price(session, "old", "0.10", "0.40", "llama3*")
        ingest(session, [llama(0), llama(1, user_id="user-2")], markup_pct=MARKUP, now=OCTOBER + timedelta(days=1))
        price(session, "new", "0.20", "0.80", "llama3.1")
        session.commit()


def invoice_totals(session_factory: sessionmaker[Session], period: str) -> dict[str, tuple[str, int]]:
    with session_factory() as session:
        assert run_checks(session).problems == []
        return {
            inv.user_id: (inv.status, inv.total_nanos) for inv in invoice_store.list_invoices(session, period=period)
        }


def test_a_rerate_waiting_for_a_finalization_posts_its_corrections_in_the_next_month(
    session_factory, cli_env, october
) -> None:
    holder = session_factory()
    assert len(invoice_store.finalize_period(holder, "2026-10", NOW, GRACE)) == 2  # October's lock held
    child = start(cli_env, "billing", "rerate", "--from", "2026-10-01T00:00:00Z", "--to", "2026-11-01T00:00:00Z",
                  "--apply", "--run-id", "r1")  # fmt: skip
    out = finish_after_it_waits(session_factory, holder, child)
    assert "2 correction(s) posted after a finalized invoice" in out
    finalized = ("finalized", OLD_CHARGE)
    assert invoice_totals(session_factory, "2026-10") == {"user-1": finalized, "user-2": finalized}
    delta = ("draft", NEW_CHARGE - OLD_CHARGE)
    assert invoice_totals(session_factory, "2026-11") == {"user-1": delta, "user-2": delta}


def test_a_finalization_waiting_for_a_rerate_invoices_the_new_charges(session_factory, cli_env, october) -> None:
    holder = session_factory()
    applied = apply_rerate(holder, start=datetime(2026, 10, 1, tzinfo=UTC), end=datetime(2026, 11, 1, tzinfo=UTC),
                           markup_pct=MARKUP, run_id="r1")  # fmt: skip
    assert applied.diff.total.events == 2  # the events' rows and October's shared lock held
    out = finish_after_it_waits(session_factory, holder, start(cli_env, "billing", "invoices", "finalize", "2026-10"))
    assert "finalized 2 invoice(s) of 2026-10" in out
    finalized = ("finalized", NEW_CHARGE)
    assert invoice_totals(session_factory, "2026-10") == {"user-1": finalized, "user-2": finalized}
    assert invoice_totals(session_factory, "2026-11") == {}


def test_a_finalization_waiting_for_a_late_ingest_invoices_its_events(session_factory, cli_env, october) -> None:
    """The ingest of an October event holds October's shared lock: the finalization waits, then invoices it."""
    holder = session_factory()
    ingest(holder, [llama(2, user_id="user-3")], markup_pct=MARKUP, now=NOW)
    out = finish_after_it_waits(session_factory, holder, start(cli_env, "billing", "invoices", "finalize", "2026-10"))
    assert "finalized 3 invoice(s) of 2026-10" in out
    assert invoice_totals(session_factory, "2026-10")["user-3"] == ("finalized", NEW_CHARGE)  # priced now: new price


def test_two_finalizations_at_once_issue_each_invoice_once(session_factory, cli_env, october) -> None:
    holder = session_factory()
    assert len(invoice_store.finalize_period(holder, "2026-10", NOW, GRACE)) == 2
    out = finish_after_it_waits(session_factory, holder, start(cli_env, "billing", "invoices", "finalize", "2026-10"))
    assert "finalized 0 invoice(s) of 2026-10" in out
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(InvoiceRow)) == 2
        assert session.scalar(select(func.count()).select_from(AuditLogRow)) == 0  # the second changed nothing
    finalized = ("finalized", OLD_CHARGE)
    assert invoice_totals(session_factory, "2026-10") == {"user-1": finalized, "user-2": finalized}


@pytest.mark.parametrize("key", ["same", "other"])
def test_credits_to_one_wallet_at_once(session_factory, cli_env, key) -> None:
    """The same key from two processes posts once (the second replays it); two keys both land on the balance."""
    holder = session_factory()
    add_credit(holder, tenant_id="t1", user_id="u1", amount=Decimal(5), idempotency_key="same")
    child = start(cli_env, "billing", "credit", "add", "-t", "t1", "-u", "u1", "--amount", "5", "--key", key)
    out = finish_after_it_waits(session_factory, holder, child)
    assert ('"replayed": true' in out) is (key == "same")
    with session_factory() as session:
        assert session.get(AccountRow, "user:t1:u1").balance_nanos == (5 if key == "same" else 10) * 10**9
        assert session.scalar(select(func.count()).select_from(TransferRow)) == (1 if key == "same" else 2)
        assert run_checks(session).problems == []


def test_the_same_rerate_run_twice_at_once_corrects_each_event_once(session_factory, cli_env, october) -> None:
    holder = session_factory()
    applied = apply_rerate(holder, start=datetime(2026, 10, 1, tzinfo=UTC), end=datetime(2026, 11, 1, tzinfo=UTC),
                           markup_pct=MARKUP, run_id="r1")  # fmt: skip
    assert applied.transfers == 8  # per event: charge and cost, each reversed and posted anew
    child = start(cli_env, "billing", "rerate", "--from", "2026-10-01T00:00:00Z", "--to", "2026-11-01T00:00:00Z",
                  "--apply", "--run-id", "r1")  # fmt: skip
    assert "run r1: 0 transfer(s) posted" in finish_after_it_waits(session_factory, holder, child)
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(TransferRow)) == 4 + 8
    draft = ("draft", NEW_CHARGE)
    assert invoice_totals(session_factory, "2026-10") == {"user-1": draft, "user-2": draft}


def test_two_reprices_at_once_bill_each_held_event_once(session_factory, cli_env) -> None:
    from metering.billing.reprice import reprice_held

    with session_factory() as session:  # held: no price for llama3.1 yet
        ingest(session, [llama(0), llama(1, user_id="user-2")], markup_pct=MARKUP, now=OCTOBER + timedelta(days=1))
        price(session, "old", "0.10", "0.40", "llama3*")
        session.commit()
    holder = session_factory()
    assert reprice_held(holder, markup_pct=MARKUP).priced == 2  # the events' rows locked
    out = finish_after_it_waits(session_factory, holder, start(cli_env, "billing", "reprice"))
    assert "priced 0 held event(s)" in out
    draft = ("draft", OLD_CHARGE)
    assert invoice_totals(session_factory, "2026-10") == {"user-1": draft, "user-2": draft}


@pytest.mark.parametrize("key", ["same", "other"])
def test_one_override_key_from_two_connections_at_once_adds_one_override(session_factory, cli_env, key) -> None:
    """The same `--idempotency-key` from two connections at once: the second waits for the first's commit, then
    answers its override (replayed, not audited); two keys add two overrides."""
    holder = session_factory()
    since = datetime(2026, 1, 1, tzinfo=UTC)
    overrides.add(holder, provider="ollama", model_pattern="llama3*", effective_from=since, effective_to=None,
                  input_mtok=Decimal("0.10"), output_mtok=Decimal("0.40"), idempotency_key="same")  # fmt: skip
    child = start(cli_env, "billing", "overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input",
                  "0.10", "--output", "0.40", "--from", since.isoformat(), "--idempotency-key", key)  # fmt: skip
    printed = json.loads(finish_after_it_waits(session_factory, holder, child))
    assert printed["replayed"] is (key == "same")
    with session_factory() as session:
        ids = set(session.scalars(select(PriceOverrideRow.id)))
        assert printed["id"] in ids and len(ids) == (1 if key == "same" else 2)
        assert session.scalar(select(func.count()).select_from(AuditLogRow)) == (0 if key == "same" else 1)
