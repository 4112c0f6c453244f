"""Re-rate of a past window on SQLite and PostgreSQL: dry-run diff, reversals + new transfers, idempotent runs."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from metering.billing import corrections
from metering.billing.checks import run_checks
from metering.billing.credits import add_credit
from metering.billing.ingest import ingest
from metering.billing.invoice_store import finalize_period, get_invoice
from metering.billing.invoices import Invoice
from metering.billing.overrides import add_override
from metering.billing.rerate import RerateResult, apply_rerate, plan_rerate
from metering.db.models import (
    AccountRow,
    FinalizedPeriodRow,
    InvoiceLineRow,
    InvoiceRow,
    TransferRow,
    UsageEventRow,
    UsageRollupRow,
)
from metering.errors import InvalidInputError
from metering.events import UsageEvent, event_from_record
from tests.fakes.events import record
from tests.integration.page_race import SecondPageRace

NOW = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)
MARKUP = Decimal(20)
START, END = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
OLD_CHARGE, OLD_COST = 360_000_000, 300_000_000  # 1M in x $0.10 + 0.5M out x $0.40, x 1.2
NEW_CHARGE, NEW_COST = 720_000_000, 600_000_000  # at $0.20 / $0.80


def ollama(i: int = 0, **overrides) -> UsageEvent:
    overrides = {"provider": "ollama", "model": "llama3.1", "input_tokens": 1_000_000, "output_tokens": 500_000,
                 "cache_read_tokens": 0, "occurred_at": NOW - timedelta(minutes=5), **overrides}  # fmt: skip
    return event_from_record(record(i, **overrides))


def price(session_factory, input_mtok: str, output_mtok: str, since: datetime, id: str) -> None:
    with session_factory() as session:
        add_override(session, provider="ollama", model_pattern="llama3*", effective_from=since, effective_to=None,
                     input_mtok=Decimal(input_mtok), output_mtok=Decimal(output_mtok), id=id)  # fmt: skip
        session.commit()


@pytest.fixture
def billed(session_factory) -> list[UsageEvent]:
    """Three ollama events in November (two users, two extensions), one in October, one anthropic event."""
    price(session_factory, "0.10", "0.40", datetime(2026, 1, 1, tzinfo=UTC), "old")
    events = [
        ollama(0),
        ollama(1, occurred_at=datetime(2026, 11, 2, 8, tzinfo=UTC)),
        ollama(2, user_id="user-2", extension_id="summarize"),
        ollama(3, occurred_at=datetime(2026, 10, 15, 8, tzinfo=UTC)),
        event_from_record(record(4, occurred_at=NOW - timedelta(minutes=5))),
    ]
    with session_factory() as session:
        ingest(session, events, markup_pct=MARKUP, now=NOW)
        session.commit()
    return events


def plan(session_factory, **kw) -> RerateResult:
    kw = {"start": START, "end": END, "markup_pct": MARKUP, **kw}
    with session_factory() as session:
        return plan_rerate(session, **kw)


def apply(session_factory, run_id: str, **kw) -> RerateResult:
    kw = {"start": START, "end": END, "markup_pct": MARKUP, **kw}
    with session_factory() as session:
        result = apply_rerate(session, run_id=run_id, now=NOW + timedelta(hours=1), **kw)
        session.commit()
    return result


def snapshot(session_factory) -> tuple:
    with session_factory() as session:
        events = sorted((str(e.event_id), e.charge_nanos, e.cost_nanos, e.price_version, e.invoice_period)
                        for e in session.scalars(select(UsageEventRow)))  # fmt: skip
        transfers = session.scalar(select(func.count()).select_from(TransferRow))
        balances = sorted((a.id, a.balance_nanos) for a in session.scalars(select(AccountRow)))
        rollups = sorted((r.user_id, r.billed_nanos, r.cost_nanos) for r in session.scalars(select(UsageRollupRow)))
    return events, transfers, balances, rollups


def assert_ledger_consistent(session_factory) -> None:
    with session_factory() as session:
        assert run_checks(session).problems == []
        accounts = {a.id: a.balance_nanos for a in session.scalars(select(AccountRow))}
        derived = dict.fromkeys(accounts, 0)
        for t in session.scalars(select(TransferRow)):
            derived[t.debit_account_id] -= t.amount_nanos
            derived[t.credit_account_id] += t.amount_nanos
        for e in session.scalars(select(UsageEventRow).where(UsageEventRow.billing_status == "billed")):
            transfers = list(session.scalars(select(TransferRow).where(TransferRow.event_id == e.event_id)))
            charges = {t.id: t.amount_nanos for t in transfers if t.kind == "usage_charge"}
            reversed_ = sum(charges.get(t.reverses_id, 0) for t in transfers if t.kind == "reversal")
            assert sum(charges.values()) - reversed_ == e.charge_nanos
    assert sum(accounts.values()) == 0
    assert accounts == derived


def test_dry_run_shows_the_diff_per_user_and_extension_and_changes_nothing(session_factory, billed) -> None:
    price(session_factory, "0.20", "0.80", datetime(2026, 10, 1, tzinfo=UTC), "new")
    before = snapshot(session_factory)
    result = plan(session_factory)
    diff = result.diff
    assert (result.applied, diff.examined, diff.unpriceable, len(diff.changes)) == (False, 4, 0, 3)
    user1, user2 = diff.by_user[("tenant-1", "user-1")], diff.by_user[("tenant-1", "user-2")]
    assert (user1.events, user1.old_charge_nanos, user1.new_charge_nanos) == (2, 2 * OLD_CHARGE, 2 * NEW_CHARGE)
    assert (user2.events, user2.charge_delta, user2.cost_delta) == (1, NEW_CHARGE - OLD_CHARGE, NEW_COST - OLD_COST)
    assert set(diff.by_extension) == {"rewrite", "summarize"}
    assert (diff.by_extension["rewrite"].events, diff.by_extension["summarize"].events) == (2, 1)
    assert diff.total.charge_delta == 3 * (NEW_CHARGE - OLD_CHARGE)
    assert plan(session_factory, provider="anthropic").diff.changes == []  # genai-prices event: unchanged
    assert plan(session_factory, provider="ollama", model_pattern="mistral*").diff.examined == 0
    assert len(plan(session_factory, model_pattern="LLAMA3.*").diff.changes) == 3
    assert snapshot(session_factory) == before


def test_apply_posts_reversals_and_new_transfers_once_per_run(session_factory, billed, monkeypatch) -> None:
    monkeypatch.setattr(corrections, "PAGE", 2)  # several pages of events
    price(session_factory, "0.20", "0.80", datetime(2026, 10, 1, tzinfo=UTC), "new")
    result = apply(session_factory, "r1")
    assert (result.applied, len(result.diff.changes), result.skipped, result.transfers) == (True, 3, 0, 12)
    assert result.diff.total.charge_delta == 3 * (NEW_CHARGE - OLD_CHARGE)
    with session_factory() as session:
        for e in billed[:3]:
            row = session.get(UsageEventRow, e.event_id)
            assert (row.charge_nanos, row.cost_nanos, row.price_version, row.invoice_period) == (
                NEW_CHARGE, NEW_COST, "new", "2026-11",
            )  # fmt: skip
            kinds = sorted(
                t.kind for t in session.scalars(select(TransferRow).where(TransferRow.event_id == e.event_id))
            )
            assert kinds == ["provider_cost", "provider_cost", "reversal", "reversal", "usage_charge", "usage_charge"]
        october = session.get(UsageEventRow, billed[3].event_id)
        assert (october.charge_nanos, october.price_version) == (OLD_CHARGE, "old")  # outside the window
        wallet = session.get(AccountRow, "user:tenant-1:user-2").balance_nanos
    assert wallet == -NEW_CHARGE
    assert_ledger_consistent(session_factory)

    after = snapshot(session_factory)
    again = apply(session_factory, "r1")
    assert (again.diff.changes, again.transfers) == ([], 0)
    assert snapshot(session_factory) == after

    # Prices change again: the same run id still posts nothing (its corrections exist); a new run does.
    price(session_factory, "0", "0", datetime(2026, 11, 1, tzinfo=UTC), "free")
    replay = apply(session_factory, "r1")
    assert (replay.skipped, replay.transfers, replay.diff.changes) == (3, 0, [])
    assert snapshot(session_factory) == after
    free = apply(session_factory, "r2")
    assert (len(free.diff.changes), free.transfers) == (3, 6)  # reversals only: a zero price has no transfer
    with session_factory() as session:
        assert {session.get(UsageEventRow, e.event_id).charge_nanos for e in billed[:3]} == {0}
    assert_ledger_consistent(session_factory)


def test_a_correction_of_a_finalized_period_is_posted_in_the_next_open_one(session_factory, billed) -> None:
    with session_factory() as session:
        invoice_id = uuid.uuid4()
        session.add(InvoiceRow(id=invoice_id, tenant_id="tenant-1", user_id="user-1", period="2026-10",
                               status="finalized", currency="USD", total_nanos=OLD_CHARGE, rounded_nanos=OLD_CHARGE,
                               residue_nanos=0, finalized_at=NOW))  # fmt: skip
        session.add(InvoiceLineRow(invoice_id=invoice_id, line_no=1, extension_id="rewrite", model="llama3.1",
                                   is_late=False, calls=1, billed_nanos=OLD_CHARGE))  # fmt: skip
        session.add(FinalizedPeriodRow(period="2026-10", finalized_at=NOW))  # what finalize records
        session.commit()
    price(session_factory, "0.20", "0.80", datetime(2026, 10, 1, tzinfo=UTC), "new")
    october = datetime(2026, 10, 1, tzinfo=UTC)
    result = apply(session_factory, "oct", start=october, end=START)
    assert (len(result.diff.changes), result.late_corrections) == (1, 1)
    with session_factory() as session:
        row = session.get(UsageEventRow, billed[3].event_id)
        assert (row.charge_nanos, row.invoice_period, row.is_late) == (NEW_CHARGE, "2026-10", False)
        corrections = session.scalars(select(TransferRow).where(TransferRow.memo == "rerate:oct")).all()
    assert {t.period for t in corrections} == {"2026-11"} and len(corrections) == 4
    assert_ledger_consistent(session_factory)


def test_a_correction_of_a_finalized_invoice_is_a_labelled_line_of_the_next_one(session_factory, billed) -> None:
    """October is finalized with the event at the old price; the re-rate's net change shows on November's
    invoice as a correction line (kept once November is finalized too), and the user's invoices add up to
    what the ledger charged them."""
    october = datetime(2026, 10, 1, tzinfo=UTC)
    with session_factory() as session:
        assert [i.total_nanos for i in finalize_period(session, "2026-10", NOW, timedelta(hours=72))] == [OLD_CHARGE]
        session.commit()
    price(session_factory, "0.20", "0.80", october, "new")
    assert apply(session_factory, "oct", start=october, end=START).late_corrections == 1

    def invoices() -> tuple[Invoice, Invoice]:
        with session_factory() as session:
            return get_invoice(session, "tenant-1", "user-1", "2026-10"), get_invoice(
                session, "tenant-1", "user-1", "2026-11"
            )

    oct_invoice, nov_invoice = invoices()
    assert oct_invoice.total_nanos == OLD_CHARGE and oct_invoice.is_finalized  # never changes
    corrections = [line for line in nov_invoice.lines if line.correction_of is not None]
    assert [(c.correction_of, c.extension_id, c.model, c.calls, c.billed_nanos) for c in corrections] == [
        ("2026-10", billed[3].extension_id, "llama3.1", 0, NEW_CHARGE - OLD_CHARGE)
    ]
    assert nov_invoice.lines[-1] == corrections[0]  # after the usage lines
    with session_factory() as session:
        charged = -session.get(AccountRow, "user:tenant-1:user-1").balance_nanos
    assert oct_invoice.total_nanos + nov_invoice.total_nanos == charged
    with session_factory() as session:
        finalize_period(session, "2026-11", NOW + timedelta(days=40), timedelta(hours=72))
        session.commit()
    assert invoices()[1] == replace(nov_invoice, status="finalized", finalized_at=invoices()[1].finalized_at)
    assert_ledger_consistent(session_factory)


def test_the_dry_run_says_how_many_corrections_land_after_a_finalized_invoice(
    session_factory, billed, tmp_path
) -> None:
    """A window across a finalized month: the dry run counts the corrections that will be posted in the first open
    month (as correction lines of its invoice, the finalized one never changing) exactly as the run does. Before, the
    dry run always said 0, so only applying the re-rate told the operator that closed invoices were concerned."""
    from typer.testing import CliRunner

    from metering.cli.app import app

    october = datetime(2026, 10, 1, tzinfo=UTC)
    with session_factory() as session:
        finalize_period(session, "2026-10", NOW, timedelta(hours=72))
        session.commit()
    price(session_factory, "0.20", "0.80", october, "new")
    dry = plan(session_factory, start=october)
    with session_factory() as session:
        url = session.get_bind().url.render_as_string(hide_password=False)
    env = {"METERING_DATABASE_URL": url, "METERING_DATA_DIR": str(tmp_path), "METERING_BILLING__MARKUP_PCT": "20",
           "COLUMNS": "200"}  # fmt: skip
    shown = CliRunner().invoke(app, ["billing", "rerate", "--from", "2026-10-01", "--to", "2026-12-01"], env=env)
    applied = apply(session_factory, "across", start=october)
    assert (len(dry.diff.changes), dry.late_corrections) == (len(applied.diff.changes), applied.late_corrections)
    assert applied.late_corrections == 1 and len(applied.diff.changes) == 4
    assert shown.exit_code == 0, shown.output
    assert "1 correction(s) would be posted after a finalized invoice" in " ".join(shown.output.split())


def test_invalid_windows_and_run_ids_are_refused(session_factory) -> None:
    with pytest.raises(InvalidInputError, match="after start"):
        plan(session_factory, start=END, end=START)
    with pytest.raises(InvalidInputError, match="timezone"):
        plan(session_factory, start=START.replace(tzinfo=None))
    with pytest.raises(InvalidInputError, match="run id"):
        apply(session_factory, "")


def test_a_price_beyond_what_one_call_can_cost_refuses_the_whole_rerate(session_factory, billed) -> None:
    price(session_factory, "20000", "0.40", datetime(2026, 11, 1, tzinfo=UTC), "absurd")  # 1M tokens: $20,000
    with session_factory() as session:
        before = session.scalar(select(func.count()).select_from(TransferRow))
        with pytest.raises(InvalidInputError, match=r"above the limit of \$10,000.00 per call"):
            plan_rerate(session, start=START, end=END, markup_pct=MARKUP)
        with pytest.raises(InvalidInputError, match=r"ollama llama3\.1"):
            apply_rerate(session, start=START, end=END, markup_pct=MARKUP, run_id="absurd", now=NOW)
        session.rollback()
        assert session.scalar(select(func.count()).select_from(TransferRow)) == before
        assert {
            r.charge_nanos for r in session.scalars(select(UsageEventRow).where(UsageEventRow.provider == "ollama"))
        } == {OLD_CHARGE}


def test_an_event_stored_with_a_capitalised_provider_is_re_rated_into_the_lowercase_cost_account(
    session_factory,
) -> None:
    """Before provider names were lowercased at validation, an override (matched case-insensitively) billed
    'Ollama' events with their cost under provider:Ollama:*. Re-rating them reverses those transfers (it raised a
    ledger inconsistency when it looked for provider:ollama:*) and posts the new cost under the lowercase name."""
    price(session_factory, "0.10", "0.40", datetime(2026, 1, 1, tzinfo=UTC), "old")
    legacy = ollama(0).model_copy(update={"provider": "Ollama"})  # as stored by an earlier version
    with session_factory() as session:
        ingest(session, [legacy], markup_pct=MARKUP, now=NOW)
        session.commit()
        old = {t.debit_account_id for t in session.scalars(select(TransferRow)) if t.kind == "provider_cost"}
    assert old == {"provider:Ollama:cost"}
    price(session_factory, "0.20", "0.80", datetime(2026, 11, 1, tzinfo=UTC), "new")
    result = apply(session_factory, "legacy-1")
    assert result.transfers > 0
    with session_factory() as session:
        costs = [(t.debit_account_id, t.credit_account_id) for t in session.scalars(select(TransferRow))
                 if t.kind == "provider_cost"]  # fmt: skip
        assert ("provider:ollama:cost", "provider:ollama:payable") in costs
        assert run_checks(session).problems == []


def test_an_event_charged_to_a_wallet_id_of_an_earlier_version_is_re_rated(session_factory) -> None:
    """Before wallet ids escaped the tenant's ':' and '~', tenant 'acme:x' / user 'u' was charged to wallet
    'user:acme:x:u' (now 'user:acme~3Ax:u'). Re-rating such an event raised a ledger inconsistency (the charge
    'moves between unexpected accounts'), failing the whole re-rate of any window holding one. The old charge is
    now reversed into the wallet it debited, and the new one debits the event's wallet."""
    price(session_factory, "0.10", "0.40", datetime(2026, 1, 1, tzinfo=UTC), "old")
    with session_factory() as session:
        ingest(session, [ollama(0, tenant_id="acme:x", user_id="u")], markup_pct=MARKUP, now=NOW)
        session.commit()
        # as an earlier version stored it: the charge debits the unescaped wallet id
        session.add(AccountRow(id="user:acme:x:u", kind="user_wallet", tenant_id="acme:x", user_id="u",
                               currency="USD", balance_nanos=-OLD_CHARGE, created_at=NOW))  # fmt: skip
        session.get(AccountRow, "user:acme~3Ax:u").balance_nanos = 0
        session.scalars(
            select(TransferRow).where(TransferRow.kind == "usage_charge")
        ).one().debit_account_id = "user:acme:x:u"
        session.commit()
    price(session_factory, "0.20", "0.80", datetime(2026, 11, 1, tzinfo=UTC), "new")
    result = apply(session_factory, "legacy-wallet")
    assert result.transfers == 4
    with session_factory() as session:
        wallets = session.scalars(select(AccountRow).where(AccountRow.kind == "user_wallet"))
        balances = {a.id: a.balance_nanos for a in wallets}
        problems = run_checks(session).problems
    assert balances == {"user:acme:x:u": 0, "user:acme~3Ax:u": -NEW_CHARGE}
    # what is left is what the check says of the earlier version's wallet, never a charge or balance out of line
    assert all("wallet" in p for p in problems) and not any("posted" in p or "cached" in p for p in problems)


def test_a_rerate_of_many_pages_and_an_ingest_never_deadlock_on_rollups(session_factory, monkeypatch) -> None:
    """A re-rate moved the rollups page by page (its first page's user, u2, before its second's, u1) while an
    ingest of BYOLLM calls (nothing posted, no account taken) takes the same users' daily rollups in key order: u1,
    then u2. PostgreSQL aborted one as a deadlock. The rollups now move once, after the last page."""

    from metering.billing import rerate as rerate_module

    price(session_factory, "0.10", "0.40", datetime(2026, 1, 1, tzinfo=UTC), "old")
    for i, user in enumerate(("u2", "u1")):  # u1's event has the later id: the second page
        with session_factory() as session:
            ingest(session, [ollama(i, user_id=user)], markup_pct=MARKUP, now=NOW)
            session.commit()
    price(session_factory, "0.20", "0.80", datetime(2026, 11, 1, tzinfo=UTC), "new")
    monkeypatch.setattr(corrections, "PAGE", 1)

    def ingest_byollm_calls() -> None:
        with session_factory() as session:
            ingest(session, [ollama(2, user_id="u1", is_byollm=True), ollama(3, user_id="u2", is_byollm=True)],
                   markup_pct=MARKUP, now=NOW)  # fmt: skip
            session.commit()

    race = SecondPageRace(rerate_module, monkeypatch, ingest_byollm_calls)
    assert apply(session_factory, "paged").transfers == 8
    assert race.join() == []
    assert_ledger_consistent(session_factory)


def test_a_rerate_of_many_pages_and_an_ingest_never_deadlock_on_accounts(session_factory, monkeypatch) -> None:
    """A re-rate moved the account balances page by page: its first page (a model the platform gives away, markup
    -100 %: only its provider cost changes) took the provider's accounts, its second (a charged model) then wanted
    the revenue account, which an ingest of a charged call had taken (accounts in key order: the revenue, then the
    provider's) before waiting for the provider's. PostgreSQL aborted one as a deadlock. The balances of all pages
    now move once, after the last page, in key order."""

    from metering.billing import rerate as rerate_module

    def prices(input_mtok: str, output_mtok: str, since: datetime, version: str) -> None:
        with session_factory() as session:
            for pattern, markup in (("llama3-free", Decimal(-100)), ("llama3.1", None)):
                add_override(session, provider="ollama", model_pattern=pattern, effective_from=since,
                             effective_to=None, input_mtok=Decimal(input_mtok), output_mtok=Decimal(output_mtok),
                             markup_pct=markup, id=f"{version}-{pattern}")  # fmt: skip
            session.commit()

    prices("0.10", "0.40", datetime(2026, 1, 1, tzinfo=UTC), "old")
    for i, (user, model) in enumerate((("u2", "llama3-free"), ("u1", "llama3.1"))):  # the charged one: 2nd page
        with session_factory() as session:
            ingest(session, [ollama(i, user_id=user, model=model)], markup_pct=MARKUP, now=NOW)
            session.commit()
    prices("0.20", "0.80", datetime(2026, 11, 1, tzinfo=UTC), "new")
    monkeypatch.setattr(corrections, "PAGE", 1)

    def ingest_a_charged_call() -> None:
        with session_factory() as session:
            ingest(session, [ollama(2, user_id="u3")], markup_pct=MARKUP, now=NOW)
            session.commit()

    race = SecondPageRace(rerate_module, monkeypatch, ingest_a_charged_call)
    assert apply(session_factory, "paged").transfers == 6  # cost: reversal + new; charge and cost: 2 + 2
    assert race.join() == []
    assert_ledger_consistent(session_factory)


def test_two_overlapping_runs_correct_each_event_once(session_factory, billed) -> None:
    """Run A has applied, not committed, when run B (another run id) starts. B must wait and then read what A
    wrote: on SQLite it read the events and transfers first (the state before A) and, once A committed, reversed
    the original charge a second time and charged the new price twice (caught on SQLite, by a reviewer)."""
    import threading
    import time

    price(session_factory, "0.20", "0.80", datetime(2026, 10, 1, tzinfo=UTC), "new")
    kw = {"start": START, "end": END, "markup_pct": MARKUP, "now": NOW + timedelta(hours=1)}
    errors: list[BaseException] = []

    def run_b() -> None:
        try:
            with session_factory() as session:
                apply_rerate(session, run_id="run-b", **kw)
                session.commit()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with session_factory() as session_a:
        first = apply_rerate(session_a, run_id="run-a", **kw)  # holds its locks until it commits
        assert first.transfers > 0
        b = threading.Thread(target=run_b)
        b.start()
        time.sleep(1.0)  # B has started and waits for A
        session_a.commit()
    b.join(30)
    assert not b.is_alive() and errors == []
    with session_factory() as session:
        row = session.scalars(select(UsageEventRow).where(UsageEventRow.user_id == "user-2")).one()
        wallet = session.get(AccountRow, "user:tenant-1:user-2").balance_nanos
        charges = session.scalars(
            select(TransferRow.kind).where(TransferRow.event_id == row.event_id, TransferRow.kind == "usage_charge")
        ).all()
    assert row.charge_nanos == NEW_CHARGE and wallet == -NEW_CHARGE
    assert len(charges) == 2  # the original and run A's; run B found nothing left to change
    assert_ledger_consistent(session_factory)


def _shadows(session_factory) -> tuple[dict[str, tuple[int, str | None]], int, int]:
    """Each BYOLLM event's shadow cost and price version; the rollups' shadow sum; /v1/usage's (from rollups)."""
    from metering.billing.usage_queries import total, usage

    with session_factory() as session:
        events = {str(e.event_id): (e.shadow_nanos, e.price_version)
                  for e in session.scalars(select(UsageEventRow).where(UsageEventRow.is_byollm.is_(True)))}  # fmt: skip
        rollups = int(session.scalar(select(func.sum(UsageRollupRow.shadow_nanos))) or 0)
        served = total(usage(session, START, END)).shadow_nanos
    return events, rollups, served


def test_a_rerate_moves_byollm_shadow_costs_to_the_new_prices_without_billing_them(
    session_factory, monkeypatch
) -> None:
    """Re-rate left a BYOLLM event's shadow cost (what the platform would have charged) at the old price: after a
    negotiated rate for a past window, usage reported billed calls at the new price and BYOLLM ones at the old."""
    monkeypatch.setattr(corrections, "PAGE", 2)  # several pages, billed and BYOLLM events interleaved
    price(session_factory, "0.10", "0.40", datetime(2026, 1, 1, tzinfo=UTC), "old")
    events = [ollama(i, is_byollm=i % 2 == 0, user_id=f"user-{i % 3}") for i in range(7)]
    events.append(ollama(7, is_byollm=True, model="mistral"))  # no price ever: its shadow stays unknown
    with session_factory() as session:
        ingest(session, events, markup_pct=MARKUP, now=NOW)
        session.commit()
    shadows, rollups, served = _shadows(session_factory)
    priced = {k: v for k, v in shadows.items() if v[1] is not None}
    assert len(priced) == 4 and all(v[0] == OLD_CHARGE for v in priced.values())
    assert rollups == served == 4 * OLD_CHARGE
    price(session_factory, "0.20", "0.80", datetime(2026, 10, 1, tzinfo=UTC), "new")

    dry = plan(session_factory)
    shadow = dry.diff.shadow
    assert (shadow.examined, shadow.events, shadow.unpriceable) == (4, 4, 0)
    assert (shadow.old_nanos, shadow.new_nanos) == (4 * OLD_CHARGE, 4 * NEW_CHARGE)
    assert (dry.diff.examined, len(dry.diff.changes)) == (3, 3)  # the billed ones, as before
    assert _shadows(session_factory) == (shadows, rollups, served)  # a dry run changes nothing

    with session_factory() as session:
        transfers = session.scalar(select(func.count()).select_from(TransferRow))
    result = apply(session_factory, "r1")
    assert (result.diff.shadow.events, result.transfers) == (4, 3 * 4)  # charges and costs only: reversal + new each
    after, rollups, served = _shadows(session_factory)
    assert {k: v[0] for k, v in after.items() if v[1] is not None} == dict.fromkeys(priced, NEW_CHARGE)
    assert all(after[k] == shadows[k] for k in shadows if k not in priced)  # the unknown one: still unknown
    assert rollups == served == 4 * NEW_CHARGE
    with session_factory() as session:
        joined = (
            select(func.count())
            .select_from(TransferRow)
            .join(UsageEventRow, UsageEventRow.event_id == TransferRow.event_id)
        )
        byollm_transfers = session.scalar(joined.where(UsageEventRow.is_byollm.is_(True)))
        assert session.scalar(select(func.count()).select_from(TransferRow)) == transfers + 12
    assert byollm_transfers == 0
    assert_ledger_consistent(session_factory)

    again = apply(session_factory, "r2")
    assert (again.diff.shadow.events, again.transfers) == (0, 0)
    assert _shadows(session_factory) == (after, rollups, served)


def _post_by_hand(session, **fields) -> TransferRow:
    """A transfer written straight into the ledger, its accounts' cached balances moved with it (so the balances
    still agree with the transfers: only what the transfer names can give it away)."""
    transfer = TransferRow(id=uuid.uuid4(), currency="USD", period="2026-11", created_at=NOW, **fields)
    session.add(transfer)
    session.get(AccountRow, transfer.debit_account_id).balance_nanos -= transfer.amount_nanos
    session.get(AccountRow, transfer.credit_account_id).balance_nanos += transfer.amount_nanos
    session.flush()
    return transfer


def test_the_checks_name_transfers_of_no_stored_event_and_reversals_of_nothing(session_factory, billed) -> None:
    """Every usage charge and provider cost is for a stored event, and every reversal mirrors the one transfer it
    reverses. Before, the per-event check started from the events and the reversals it met: a charge naming no
    stored event, a reversal of a transfer that does not exist, or a reversal paying back another wallet than the one
    charged passed every check (the balances still summed to zero and agreed with the transfers)."""
    price(session_factory, "0.20", "0.80", datetime(2026, 10, 1, tzinfo=UTC), "new")
    apply(session_factory, "r1")  # real reversals
    assert_ledger_consistent(session_factory)
    wallet_1, wallet_2, revenue = "user:tenant-1:user-1", "user:tenant-1:user-2", "platform:revenue"
    ghost = uuid.uuid4()

    def problems(tamper) -> tuple[list[str], str]:
        with session_factory() as session:
            expected = tamper(session)
            found = run_checks(session).problems
            session.rollback()
        return found, expected

    def charge_of_nothing(session) -> str:
        t = _post_by_hand(session, debit_account_id=wallet_1, credit_account_id=revenue, amount_nanos=5,
                          kind="usage_charge", event_id=ghost)  # fmt: skip
        return f"transfer {t.id} (usage_charge) names event {ghost}, which is not stored"

    def charge_of_no_event(session) -> str:
        t = _post_by_hand(session, debit_account_id=wallet_1, credit_account_id=revenue, amount_nanos=5,
                          kind="usage_charge", event_id=None)  # fmt: skip
        return f"transfer {t.id} (usage_charge) names no event"

    def reversal_of_nothing(session) -> str:
        event_id = billed[0].event_id
        t = _post_by_hand(session, debit_account_id=revenue, credit_account_id=wallet_1, amount_nanos=5,
                          kind="reversal", event_id=event_id, reverses_id=ghost)  # fmt: skip
        return f"reversal {t.id} reverses {ghost}, which does not exist"

    def reversal_to_another_wallet(session) -> str:
        t = session.scalars(
            select(TransferRow).where(TransferRow.kind == "reversal", TransferRow.credit_account_id == wallet_1)
        ).first()
        session.get(AccountRow, wallet_1).balance_nanos -= t.amount_nanos
        session.get(AccountRow, wallet_2).balance_nanos += t.amount_nanos
        t.credit_account_id = wallet_2
        session.flush()
        return f"reversal {t.id} does not mirror transfer {t.reverses_id} (the same amount between the same accounts"

    def reversal_of_a_reversal(session) -> str:
        r = session.scalars(select(TransferRow).where(TransferRow.kind == "reversal")).first()
        mirror = {"debit_account_id": r.credit_account_id, "credit_account_id": r.debit_account_id}
        t = _post_by_hand(session, **mirror, amount_nanos=r.amount_nanos, kind="reversal", event_id=r.event_id,
                          reverses_id=r.id)  # fmt: skip
        return f"reversal {t.id} reverses another reversal, {r.id}"

    def credit_reversed_twice(session) -> str:
        add_credit(session, tenant_id="tenant-1", user_id="user-1", amount=Decimal(3), idempotency_key="k", now=NOW)
        c = session.scalars(select(TransferRow).where(TransferRow.kind == "credit")).one()
        for _ in range(2):
            _post_by_hand(session, debit_account_id=c.credit_account_id, credit_account_id=c.debit_account_id,
                          amount_nanos=c.amount_nanos, kind="reversal", reverses_id=c.id)  # fmt: skip
        return f"transfer {c.id} is reversed 2 times"

    tampering = (charge_of_nothing, charge_of_no_event, reversal_of_nothing, reversal_to_another_wallet,
                 reversal_of_a_reversal, credit_reversed_twice)  # fmt: skip
    for tamper in tampering:
        found, expected = problems(tamper)
        assert any(p.startswith(expected) for p in found), (tamper.__name__, found)
    assert_ledger_consistent(session_factory)
