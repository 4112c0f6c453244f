"""Held (unpriced) events priced once an override exists, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text

from metering.billing import corrections, store
from metering.billing.checks import run_checks
from metering.billing.credits import add_credit, balances
from metering.billing.ingest import ingest
from metering.billing.invoice_store import finalize_period
from metering.billing.overrides import add_override, end_override, list_overrides
from metering.billing.reprice import RepriceResult, reprice_held
from metering.db.models import (
    FinalizedPeriodRow,
    InvoiceRow,
    PriceOverrideRow,
    TransferRow,
    UsageEventRow,
    UsageRollupRow,
)
from metering.errors import ConflictError, InvalidInputError, NotFoundError
from metering.events import UsageEvent, event_from_record
from tests.fakes.events import record
from tests.integration.page_race import SecondPageRace

NOW = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)
MARKUP = Decimal(20)
SINCE = datetime(2026, 1, 1, tzinfo=UTC)


def ollama(i: int = 0, **overrides) -> UsageEvent:
    overrides.setdefault("occurred_at", NOW - timedelta(minutes=5))
    overrides = {"provider": "ollama", "model": "llama3.1", "input_tokens": 1_000_000, "output_tokens": 500_000,
                 "cache_read_tokens": 0, **overrides}  # fmt: skip
    return event_from_record(record(i, **overrides))


def run_ingest(session_factory, events) -> None:
    with session_factory() as session:
        ingest(session, events, markup_pct=MARKUP, now=NOW)
        session.commit()


def reprice(session_factory) -> RepriceResult:
    with session_factory() as session:
        result = reprice_held(session, markup_pct=MARKUP, now=NOW)
        session.commit()
    return result


def override(session_factory, **kw) -> PriceOverrideRow:
    kw = {"provider": "ollama", "model_pattern": "llama3*", "effective_from": SINCE, "effective_to": None,
          "input_mtok": Decimal("0.10"), "output_mtok": Decimal("0.40"), **kw}  # fmt: skip
    with session_factory() as session:
        row = add_override(session, **kw)
        session.commit()
    return row


def rows(session_factory, model=UsageEventRow):
    with session_factory() as session:
        return list(session.scalars(select(model)))


def assert_checks(session_factory) -> None:
    with session_factory() as session:
        assert run_checks(session).problems == []


def test_held_events_are_billed_once_an_override_exists(session_factory) -> None:
    held = [ollama(0), ollama(1, user_id="user-2")]
    byollm = ollama(2, is_byollm=True)
    run_ingest(session_factory, [*held, byollm])
    statuses = {r.event_id: r.billing_status for r in rows(session_factory)}
    assert statuses == {held[0].event_id: "unpriced", held[1].event_id: "unpriced", byollm.event_id: "excluded_byollm"}
    assert sum(r.unpriced_count for r in rows(session_factory, UsageRollupRow)) == 2

    assert reprice(session_factory) == RepriceResult(0, 2, shadow_unpriced=1)  # no price yet: held, nothing posted
    (unknown,) = [r for r in rows(session_factory) if r.is_byollm]
    assert (unknown.shadow_nanos, unknown.price_source) == (0, None)  # a shadow cost not known, not one of $0
    assert rows(session_factory, TransferRow) == []

    stored = override(session_factory, id="ollama-negotiated", note="negotiated rate")
    assert (stored.input_nanos_per_mtok, stored.output_nanos_per_mtok) == (100_000_000, 400_000_000)
    result = reprice(session_factory)
    # 1M input x $0.10 + 0.5M output x $0.40 = $0.30 cost; x 1.2 markup = $0.36 charged, per event.
    assert result == RepriceResult(
        priced=2, still_unpriced=0, charge_nanos=720_000_000, cost_nanos=600_000_000, shadow_priced=1,
        shadow_nanos=360_000_000,
    )  # fmt: skip
    for row in rows(session_factory):
        if row.event_id == byollm.event_id:  # never billed (Policy A); its shadow cost is now known
            assert (row.billing_status, row.charge_nanos, row.cost_nanos) == ("excluded_byollm", 0, 0)
            assert (row.shadow_nanos, row.price_source, row.price_version) == (
                360_000_000,
                "override",
                "ollama-negotiated",
            )
            assert row.invoice_period is None
            continue
        assert (row.billing_status, row.charge_nanos, row.cost_nanos) == ("billed", 360_000_000, 300_000_000)
        assert (row.price_source, row.price_version, row.markup_pct) == ("override", "ollama-negotiated", "20")
        assert (row.invoice_period, row.is_late) == ("2026-11", False)
    kinds = sorted((t.kind, t.amount_nanos, t.period) for t in rows(session_factory, TransferRow))
    assert kinds == [("provider_cost", 300_000_000, "2026-11")] * 2 + [("usage_charge", 360_000_000, "2026-11")] * 2
    rollups = rows(session_factory, UsageRollupRow)
    assert sum(r.unpriced_count for r in rollups) == 0
    assert sum(r.billed_nanos for r in rollups) == 720_000_000 and sum(r.cost_nanos for r in rollups) == 600_000_000
    assert sum(r.shadow_nanos for r in rollups) == 360_000_000
    assert sum(r.calls for r in rollups) == 3
    with session_factory() as session:
        wallets = {a: b for a, k, b in balances(session, "tenant-1")}
    assert wallets == {"user:tenant-1:user-1": -360_000_000, "user:tenant-1:user-2": -360_000_000}
    assert_checks(session_factory)

    assert reprice(session_factory) == RepriceResult(0, 0)  # a second run finds nothing to do
    assert len(rows(session_factory, TransferRow)) == 4
    assert_checks(session_factory)


def test_a_zero_price_override_bills_at_zero_without_a_transfer(session_factory) -> None:
    held = ollama(0)
    run_ingest(session_factory, [held])
    override(session_factory, model_pattern="llama3.1", input_mtok=Decimal(0), output_mtok=Decimal(0), note="local")
    assert reprice(session_factory) == RepriceResult(1, 0)
    (row,) = rows(session_factory)
    assert (row.billing_status, row.charge_nanos, row.cost_nanos, row.price_source) == ("billed", 0, 0, "override")
    assert rows(session_factory, TransferRow) == []
    assert sum(r.unpriced_count for r in rows(session_factory, UsageRollupRow)) == 0
    assert_checks(session_factory)


def test_many_held_events_are_repriced_page_by_page(session_factory, monkeypatch) -> None:
    monkeypatch.setattr(corrections, "PAGE", 2)
    events = [ollama(i, model="mistral" if i % 3 == 0 else "llama3.2") for i in range(7)]
    run_ingest(session_factory, events)
    override(session_factory)
    assert reprice(session_factory) == RepriceResult(4, 3, 4 * 360_000_000, 4 * 300_000_000)
    assert reprice(session_factory) == RepriceResult(0, 3)
    assert sorted(r.billing_status for r in rows(session_factory)) == ["billed"] * 4 + ["unpriced"] * 3
    assert_checks(session_factory)


def test_an_override_outside_the_event_time_leaves_it_held(session_factory) -> None:
    held = ollama(0)
    run_ingest(session_factory, [held])
    override(session_factory, effective_from=NOW)  # starts after the event happened
    assert reprice(session_factory) == RepriceResult(0, 1)
    assert rows(session_factory)[0].billing_status == "unpriced"


def test_a_held_event_of_a_finalized_period_is_billed_late_in_the_next_open_one(session_factory) -> None:
    october = ollama(0, occurred_at=datetime(2026, 10, 30, 9, tzinfo=UTC))
    run_ingest(session_factory, [october])
    with session_factory() as session:
        session.add(InvoiceRow(id=uuid.uuid4(), tenant_id="tenant-1", user_id="user-1", period="2026-10",
                               status="finalized", currency="USD", total_nanos=0, rounded_nanos=0, residue_nanos=0,
                               finalized_at=NOW))  # fmt: skip
        session.add(FinalizedPeriodRow(period="2026-10", finalized_at=NOW))  # what finalize records
        session.commit()
    override(session_factory)
    assert reprice(session_factory).priced == 1
    (row,) = rows(session_factory)
    assert (row.invoice_period, row.is_late, row.charge_nanos) == ("2026-11", True, 360_000_000)
    assert {t.period for t in rows(session_factory, TransferRow)} == {"2026-11"}
    assert_checks(session_factory)


def test_reprice_waits_for_a_finalization_in_progress_and_then_bills_late(session_factory, backend) -> None:
    """PostgreSQL: while October is being finalized (its exclusive period lock held), a reprice that would bill
    into October waits; once the invoice is committed, it bills the event late, in November, never into the
    finalized month behind the invoice's back."""
    if backend != "postgresql":
        return  # SQLite: finalization and reprice both take the database write lock first (they never overlap)
    october = datetime(2026, 10, 20, tzinfo=UTC)
    run_ingest(session_factory, [event_from_record(record(0, occurred_at=october)), ollama(1, occurred_at=october)])
    override(session_factory)
    finalizer = session_factory()
    assert len(finalize_period(finalizer, "2026-10", NOW, timedelta(hours=72))) == 1  # lock held until commit
    done = threading.Event()
    results: list[RepriceResult] = []
    worker = threading.Thread(target=lambda: (results.append(reprice(session_factory)), done.set()))
    worker.start()
    try:
        assert not done.wait(1.0), "reprice did not wait for the finalization in progress"
    finally:
        finalizer.commit()
        finalizer.close()
    worker.join(timeout=30)
    assert results and results[0].priced == 1
    with session_factory() as session:
        held = session.scalars(select(UsageEventRow).where(UsageEventRow.model == "llama3.1")).one()
        assert (held.billing_status, held.invoice_period, held.is_late) == ("billed", "2026-11", True)
        assert session.scalar(select(func.count()).select_from(InvoiceRow)) == 1
        assert run_checks(session).ok


def test_a_reprice_and_an_ingest_moving_the_same_rollups_never_deadlock(session_factory, monkeypatch) -> None:
    """A reprice that posts nothing (an override at $0) only moves rollups; so does the ingest of events billed at $0
    (or BYOLLM ones). PostgreSQL's ingest statement takes the coarse rollups' rows before the hourly ones, the
    reprice took the hourly ones first: with both on one bucket, PostgreSQL aborted one as a deadlock (an ingest
    answered 503 and was retried, or the reprice failed). Here the reprice pauses after its first rollup table
    while an ingest of the same bucket starts: the ingest waits, then both commit."""
    run_ingest(session_factory, [ollama(0)])
    override(session_factory, input_mtok=Decimal(0), output_mtok=Decimal(0))
    upsert = store._upsert_counters
    errors: list[BaseException] = []

    def ingest_same_bucket() -> None:
        try:
            run_ingest(session_factory, [ollama(1)])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    concurrent = threading.Thread(target=ingest_same_bucket)

    def first_table_then_an_ingest(session, table, keys, buckets) -> None:
        upsert(session, table, keys, buckets)
        if not concurrent.is_alive() and concurrent.ident is None:
            concurrent.start()
            time.sleep(1.5)  # the ingest reaches the rows this reprice holds (deadlock_timeout is 1 s)

    monkeypatch.setattr(store, "_upsert_counters", first_table_then_an_ingest)
    assert reprice(session_factory).priced == 1
    concurrent.join(30)
    assert errors == []
    assert [r.charge_nanos for r in rows(session_factory)] == [0, 0]
    assert_checks(session_factory)


def test_a_reprice_of_many_pages_and_an_ingest_never_deadlock_on_rollups(session_factory, monkeypatch) -> None:
    """A reprice moved the rollups page by page: its first page's user (u2) before its second's (u1), while an ingest
    takes the same rows in key order (u1, then u2). With nothing posted to serialise them on the accounts (an
    override at $0), PostgreSQL aborted one as a deadlock. The rollups now move once, after the last page."""
    from metering.billing import reprice as reprice_module

    run_ingest(session_factory, [ollama(0, user_id="u2")])
    run_ingest(session_factory, [ollama(1, user_id="u1")])  # a later event id: the second page
    override(session_factory, input_mtok=Decimal(0), output_mtok=Decimal(0))
    monkeypatch.setattr(corrections, "PAGE", 1)
    race = SecondPageRace(
        reprice_module,
        monkeypatch,
        lambda: run_ingest(session_factory, [ollama(2, user_id="u1"), ollama(3, user_id="u2")]),
    )
    assert reprice(session_factory).priced == 2
    assert race.join() == []
    assert len(rows(session_factory)) == 4
    assert_checks(session_factory)


def test_a_reprice_of_many_pages_and_an_ingest_never_deadlock_on_accounts(session_factory, monkeypatch) -> None:
    """A reprice moved the account balances page by page: its first page (a model the platform gives away, markup
    -100 %: a provider cost and no charge) took the provider's accounts, its second (a charged model) then wanted
    the revenue account, which an ingest of a charged call had taken (accounts in key order: the revenue, then the
    provider's) before waiting for the provider's. PostgreSQL aborted one as a deadlock. The balances of all pages
    now move once, after the last page, in key order."""
    from metering.billing import reprice as reprice_module

    run_ingest(session_factory, [ollama(0, user_id="u2", model="llama3-free")])
    run_ingest(session_factory, [ollama(1, user_id="u1")])  # a later event id: the second page
    override(session_factory, model_pattern="llama3-free", markup_pct=Decimal(-100))
    override(session_factory, model_pattern="llama3.1")
    monkeypatch.setattr(corrections, "PAGE", 1)
    race = SecondPageRace(reprice_module, monkeypatch, lambda: run_ingest(session_factory, [ollama(2, user_id="u3")]))
    result = reprice(session_factory)
    assert race.join() == []
    assert result.priced == 2 and result.charge_nanos > 0
    assert len(rows(session_factory)) == 3
    assert_checks(session_factory)


def waiting_on_locks(session_factory) -> int:
    """How many sessions of this test's database wait for a lock (PostgreSQL)."""
    with session_factory() as probe:
        return probe.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )


def wait_until_waiting(session_factory, count: int, *threads: threading.Thread) -> None:
    while all(t.is_alive() for t in threads) and waiting_on_locks(session_factory) < count:
        time.sleep(0.01)  # polling a state, not waiting for a race


def test_a_reprice_creating_a_wallet_and_an_ingest_of_its_user_never_deadlock_on_accounts(
    session_factory, backend
) -> None:
    """A reprice that bills a user's first events creates the user's wallet. Its balances created the missing
    accounts first (the new wallet, ``user:...``), then locked the existing ones (the revenue, ``platform:revenue``):
    not account-id order. An ingest of that user's next call takes them in id order (the revenue, then the wallet):
    with the reprice holding the new wallet and the ingest the revenue, each waited for the other and PostgreSQL
    failed one as a deadlock. Forced here: the reprice's second new wallet is being created by a credit not yet
    committed, so the reprice waits between the two; the ingest starts then; the credit commits."""
    if backend != "postgresql":
        return
    override(session_factory, id="o0", model_pattern="llama3.2")
    run_ingest(session_factory, [ollama(0, user_id="u0", model="llama3.2")])  # the revenue and provider accounts
    run_ingest(session_factory, [ollama(1, user_id="u1"), ollama(2, user_id="u2")])  # held: no wallets yet
    override(session_factory, id="o1", model_pattern="llama3.1")
    errors: list[BaseException] = []

    def catching(work) -> threading.Thread:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        return threading.Thread(target=run)

    repricing = catching(lambda: reprice(session_factory))
    ingesting = catching(lambda: run_ingest(session_factory, [ollama(3, user_id="u1")]))
    with session_factory() as crediting:  # creates u2's wallet, not committed yet
        add_credit(crediting, tenant_id="tenant-1", user_id="u2", amount=Decimal(5), idempotency_key="k1", now=NOW)
        repricing.start()
        wait_until_waiting(session_factory, 1, repricing)  # the reprice waits for u2's wallet
        ingesting.start()
        wait_until_waiting(session_factory, 2, repricing, ingesting)  # the ingest waits for the reprice
        crediting.commit()
    repricing.join(30)
    ingesting.join(30)
    assert not repricing.is_alive() and not ingesting.is_alive()
    assert errors == []
    assert {r.user_id: r.billing_status for r in rows(session_factory)} == {
        "u0": "billed",
        "u1": "billed",
        "u2": "billed",
    } and len(rows(session_factory)) == 4
    assert_checks(session_factory)


def test_an_override_markup_is_stored_as_plain_text(session_factory) -> None:
    assert override(session_factory, id="o2", markup_pct=Decimal("1E+1")).markup_pct == "10"
    assert override(session_factory, id="o3", markup_pct=Decimal(-100)).markup_pct == "-100"
    assert override(session_factory, id="o4", markup_pct=Decimal("999999999.999999999")).markup_pct is not None
    # zeros past the 9th decimal: the same markup, stored in its column (VARCHAR(32)); it was a 500 on PostgreSQL
    # (value too long) and 41 characters on SQLite, once the length check had given way to the bounds
    long = override(session_factory, id="o5", markup_pct=Decimal("12.5" + "0" * 40))
    assert long.markup_pct == "12.500000000"
    assert override(session_factory, id="o6", markup_pct=Decimal("12.50")).markup_pct == "12.50"


def test_overrides_are_stored_exactly_listed_and_ended_never_deleted(session_factory) -> None:
    row = override(session_factory, id="o1", input_mtok=Decimal("0.000000001"), cache_read_mtok=Decimal("0.05"),
                   markup_pct=Decimal("12.5"))  # fmt: skip
    assert (row.input_nanos_per_mtok, row.cache_read_nanos_per_mtok, row.cache_write_nanos_per_mtok) == (
        1,
        50_000_000,
        None,
    )
    with pytest.raises(InvalidInputError, match="finer than"):
        override(session_factory, input_mtok=Decimal("0.0000000001"))
    with pytest.raises(InvalidInputError, match="effective_to must be after"):
        override(session_factory, effective_to=SINCE)
    with pytest.raises(ConflictError, match="already exists"):
        override(session_factory, id="o1")
    with pytest.raises(InvalidInputError, match="Decimal"):
        override(session_factory, output_mtok=0.4)
    for markup, why in ((Decimal("1e30"), "above"), (Decimal("-100.5"), ">= -100"), (Decimal("NaN"), "finite"),
                        (Decimal("1e-10"), "finer than 9"), (12.5, "Decimal")):  # fmt: skip
        with pytest.raises(InvalidInputError, match=why):  # 1e30 priced every call past the per-call limit
            override(session_factory, id="bad", markup_pct=markup)
    end = datetime(2026, 6, 1, tzinfo=UTC)
    with session_factory() as session:
        ended = end_override(session, "o1", end)
        session.commit()
        assert ended.effective_to == end
        with pytest.raises(InvalidInputError, match="already ends"):
            end_override(session, "o1", end + timedelta(days=1))
        with pytest.raises(NotFoundError):
            end_override(session, "nope", end)
        assert [o.id for o in list_overrides(session, provider="ollama")] == ["o1"]
        assert [o.id for o in list_overrides(session, provider="Ollama")] == ["o1"]  # any case, as overrides match
        assert list_overrides(session, active_at=end) == []
        assert [o.id for o in list_overrides(session, active_at=end - timedelta(seconds=1))] == ["o1"]
        assert session.scalar(select(func.count()).select_from(PriceOverrideRow)) == 1


def test_a_held_event_an_override_prices_beyond_the_per_call_limit_stays_held(session_factory) -> None:
    run_ingest(session_factory, [ollama(0), ollama(1, input_tokens=10**9)])
    override(session_factory, input_mtok=Decimal(20), output_mtok=Decimal(1))  # 10^9 tokens: $20,000
    result = reprice(session_factory)
    assert (result.priced, result.still_unpriced, result.over_limit) == (1, 0, 1)
    held = [r for r in rows(session_factory) if r.billing_status == "unpriced"]
    assert [r.input_tokens for r in held] == [10**9] and held[0].charge_nanos == 0
    assert reprice(session_factory) == RepriceResult(0, 0, 0, 0, 1)  # still held, still counted, never billed
    assert_checks(session_factory)
