"""Property test of the billing lifecycle on SQLite and PostgreSQL: random sequences of ingest (late events,
BYOLLM calls, unknown models, replays), finalization (any month, in any order), price overrides, reprice,
re-rate and credits, each step followed by every promise the lifecycle makes.

After each step: ``billing check`` passes; a finalized invoice never changes; every invoice (draft or finalized)
equals the net usage charge the ledger posted to its user in its period, in the ledger CSV too, and no such
charge is on no invoice; the invoice CSV's total is the invoice's; a billed event is late exactly when it is
billed after its own month, and every month it skipped is finalized; the net provider cost posted per event is
its cost; an event that is not billed has no charge, no cost and no invoice period (so no BYOLLM call is billed).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from metering.billing import invoice_store
from metering.billing.checks import run_checks
from metering.billing.credits import add_credit
from metering.billing.export import invoice_csv, ledger_csv
from metering.billing.ingest import ingest
from metering.billing.invoices import Invoice
from metering.billing.ledger import wallet_id
from metering.billing.periods import next_period, period_of
from metering.billing.reprice import reprice_held
from metering.billing.rerate import apply_rerate
from metering.billing.store import finalized_periods
from metering.db.models import TransferRow, UsageEventRow
from metering.events import UsageEvent, event_from_record
from tests.conftest import _clean
from tests.fakes.events import record
from tests.integration.lifecycle_steps import finalize_step, override_step

NOW = datetime(2026, 3, 10, tzinfo=UTC)
PERIODS = ("2025-11", "2025-12", "2026-01", "2026-02")  # across a year's end
MODELS = (("anthropic", "claude-sonnet-4-6"), ("ollama", "llama3.1"), ("Ollama", "Llama3.2"), ("openai", "gpt-4o-mini"))
USERS = (("tenant-1", "ann"), ("tenant-1", "bob"), ("acme:x", "y"), ("acme", "x:y"))
MARKUPS = (Decimal(0), Decimal(20))


@st.composite
def usage_event(draw: st.DrawFn, index: int) -> UsageEvent:
    provider, model = draw(st.sampled_from(MODELS))
    tenant, user = draw(st.sampled_from(USERS))
    year, month = map(int, draw(st.sampled_from(PERIODS)).split("-"))
    at = datetime(year, month, 1, tzinfo=UTC) + timedelta(minutes=draw(st.sampled_from([0, 1, 60 * 24 * 28 - 1])))
    if draw(st.booleans()):
        at -= timedelta(minutes=1)  # the last minute of the month before
    offset = timezone(timedelta(hours=draw(st.sampled_from([-8, 0, 9]))))
    failed = draw(st.integers(0, 5)) == 0
    return event_from_record(
        record(
            index,
            tenant_id=tenant,
            user_id=user,
            provider=provider,
            model=model,
            is_byollm=draw(st.integers(0, 3)) == 0,
            occurred_at=at.astimezone(offset),
            input_tokens=draw(st.integers(1, 400_000)),
            cache_read_tokens=0,
            output_tokens=draw(st.integers(0, 40_000)),
            **({"status": "error", "error_type": "server_error", "stop_reason": None} if failed else {}),
        )
    )


@st.composite
def steps(draw: st.DrawFn) -> list[tuple]:
    found: list[tuple] = []
    index = 0
    for _ in range(draw(st.integers(4, 16))):
        kind = draw(st.sampled_from(["ingest", "ingest", "finalize", "override", "reprice", "rerate", "credit"]))
        if kind == "ingest":
            count = draw(st.integers(1, 5))
            found.append((kind, [draw(usage_event(index + i)) for i in range(count)], draw(st.booleans())))
            index += count
        elif kind == "finalize":
            found.append((kind, draw(st.sampled_from(PERIODS))))
        elif kind == "override":
            found.append((kind, draw(st.sampled_from(["ollama", "anthropic"])),
                          draw(st.sampled_from(["0", "0.3", "2.500000001"])),
                          draw(st.sampled_from([None, Decimal(-100), Decimal(35)]))))  # fmt: skip
        elif kind == "reprice":
            found.append((kind, draw(st.sampled_from(MARKUPS))))
        elif kind == "rerate":
            start = datetime(2025, 11, 1, tzinfo=UTC) + timedelta(days=draw(st.integers(-2, 100)))
            end = start + timedelta(days=draw(st.integers(1, 130)))
            found.append((kind, start, end, draw(st.sampled_from(MARKUPS)),
                          draw(st.sampled_from(["r1", "r2"]))))  # fmt: skip
        else:
            found.append((kind, draw(st.sampled_from(USERS)), draw(st.sampled_from(["1", "-0.5"]))))
    return found


def _apply(session, step: tuple, number: int, replays: list[UsageEvent]) -> None:
    kind, *args = step
    if kind == "ingest":
        events, replay = args
        ingest(session, [*events, *(replays[-3:] if replay else [])], markup_pct=MARKUPS[1], now=NOW)
        replays.extend(events)
    elif kind == "finalize":
        finalize_step(session, args[0], NOW)
    elif kind == "override":
        override_step(session, number, *args)
    elif kind == "reprice":
        reprice_held(session, markup_pct=args[0], now=NOW)
    elif kind == "rerate":
        start, end, markup, run = args
        apply_rerate(session, start=start, end=end, markup_pct=markup, run_id=run, now=NOW)
    else:
        (tenant, user), amount = args
        add_credit(session, tenant_id=tenant, user_id=user, amount=Decimal(amount), idempotency_key=f"k{number}",
                   kind="adjustment", now=NOW)  # fmt: skip


def _net_posted(session) -> tuple[dict[tuple[str, str, str], int], dict, dict]:
    """Net usage charge per (tenant, user of its event, period); net provider cost per event; the events by id."""
    transfers = {t.id: t for t in session.scalars(select(TransferRow))}
    events = {e.event_id: e for e in session.scalars(select(UsageEventRow))}
    charged: dict[tuple[str, str, str], int] = defaultdict(int)
    costs: dict = defaultdict(int)
    for t in transfers.values():
        kind, sign = t.kind, 1
        if kind == "reversal":
            kind, sign = transfers[t.reverses_id].kind, -1
        if kind == "usage_charge":
            e = events[t.event_id]
            charged[(e.tenant_id, e.user_id, t.period)] += sign * t.amount_nanos
        elif kind == "provider_cost":
            costs[t.event_id] += sign * t.amount_nanos
    return charged, costs, events


def _check_promises(session, issued: dict[tuple[str, str, str], Invoice]) -> None:
    assert run_checks(session).problems == []
    closed = finalized_periods(session)
    charged, costs, events = _net_posted(session)
    invoices = {(i.tenant_id, i.user_id, i.period): i for i in invoice_store.list_invoices(session)}
    for key, invoice in invoices.items():
        if key[2] in closed:
            assert invoice.is_finalized, key  # a closed month has no drafts
        if invoice.is_finalized:
            assert issued.setdefault(key, invoice) == invoice, key  # never changes
        assert invoice.total_nanos == charged.get(key, 0), key
        rows = list(csv.DictReader(io.StringIO(invoice_csv(invoice))))
        assert int(next(r["amount_nanos"] for r in rows if r["row"] == "total")) == invoice.total_nanos
    assert {key for key, net in charged.items() if net} <= set(invoices)
    for period in {key[2] for key in charged}:
        wallets: dict[str, int] = defaultdict(int)
        for r in csv.DictReader(io.StringIO(ledger_csv(session, period))):
            if r["kind"] == "usage_charge":
                wallets[r["debit_account_id"]] += int(r["amount_nanos"])
            elif r["kind"] == "reversal" and r["credit_account_id"].startswith("user:"):
                wallets[r["credit_account_id"]] -= int(r["amount_nanos"])
        for (tenant, user, of), net in charged.items():
            if of == period:
                assert wallets[wallet_id(tenant, user)] == net
    for e in events.values():
        if e.billing_status != "billed":
            assert (e.charge_nanos, e.cost_nanos, e.invoice_period) == (0, 0, None), e.event_id
            assert costs.get(e.event_id, 0) == 0
            continue
        assert not e.is_byollm
        assert costs.get(e.event_id, 0) == e.cost_nanos
        own = period_of(e.occurred_at)
        assert e.is_late == (e.invoice_period != own)
        skipped = own
        while skipped != e.invoice_period:  # late: every month before the one that billed it was closed
            assert skipped in closed and skipped < e.invoice_period
            skipped = next_period(skipped)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=steps())
def test_random_billing_lifecycles_keep_every_promise(engine, session_factory, sequence) -> None:
    _clean(engine)
    issued: dict[tuple[str, str, str], Invoice] = {}
    replays: list[UsageEvent] = []
    for number, step in enumerate(sequence):
        with session_factory() as session:
            _apply(session, step, number, replays)
            session.commit()
        with session_factory() as session:
            _check_promises(session, issued)
