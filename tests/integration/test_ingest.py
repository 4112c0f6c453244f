"""Ingest on SQLite and PostgreSQL: priced, Policy A, double-entry postings, rollups, exactly once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select, update

from metering.billing.checks import run_checks
from metering.billing.ingest import ingest
from metering.billing.ledger import usage_postings
from metering.billing.rates import RateCards
from metering.billing.store import load_price_book
from metering.config import BillingSettings
from metering.db.models import (
    AccountRow,
    FinalizedPeriodRow,
    PlatformUsageDailyRow,
    PlatformUsageHourlyRow,
    TransferRow,
    UsageEventRow,
    UsageRollupRow,
)
from metering.events import MAX_TOKENS, UsageEvent, event_from_record
from tests.fakes.events import record

NOW = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)
MARKUP = Decimal(20)


def event(i: int = 0, **overrides) -> UsageEvent:
    overrides.setdefault("occurred_at", NOW - timedelta(minutes=5))
    return event_from_record(record(i, **overrides))


def run(session_factory, items, now=NOW):
    with session_factory() as session:
        result = ingest(session, items, markup_pct=MARKUP, now=now)
        session.commit()
    return result


def row(session_factory, e: UsageEvent) -> UsageEventRow:
    with session_factory() as session:
        return session.get(UsageEventRow, e.event_id)


def transfers(session_factory, e: UsageEvent) -> list[TransferRow]:
    with session_factory() as session:
        return list(session.scalars(select(TransferRow).where(TransferRow.event_id == e.event_id)))


def expected_quote(session_factory, e: UsageEvent):
    with session_factory() as session:
        cards = RateCards(load_price_book(session, MARKUP))
    return cards.quote(e.provider, e.model, e.occurred_at, e.input_tokens, e.output_tokens,
                       e.cache_read_tokens, e.cache_write_tokens, e.cache_write_1h_tokens, e.web_searches)  # fmt: skip


def test_a_platform_call_is_priced_charged_and_costed(session_factory) -> None:
    e = event(input_tokens=12_000, cache_read_tokens=2_000, cache_write_tokens=1_000, output_tokens=800)
    result = run(session_factory, [e])
    assert (result.inserted, result.duplicates, result.rejected) == (1, 0, [])
    stored = row(session_factory, e)
    quote = expected_quote(session_factory, e)
    assert quote is not None and quote.price_nanos > quote.cost_nanos > 0
    assert stored.billing_status == "billed"
    assert (stored.charge_nanos, stored.cost_nanos) == (quote.price_nanos, quote.cost_nanos)
    assert stored.price_source == "genai-prices" and stored.price_version.startswith("genai-prices==")
    assert stored.invoice_period == "2026-11" and stored.is_late is False
    kinds = {t.kind: t for t in transfers(session_factory, e)}
    assert set(kinds) == {"usage_charge", "provider_cost"}
    charge = kinds["usage_charge"]
    assert (charge.debit_account_id, charge.credit_account_id) == ("user:tenant-1:user-1", "platform:revenue")
    assert charge.amount_nanos == quote.price_nanos and kinds["provider_cost"].amount_nanos == quote.cost_nanos
    assert run_checks_ok(session_factory)


def test_a_provider_name_in_another_case_is_billed_like_its_lowercase(session_factory) -> None:
    """'OpenAI' was held unpriced (genai-prices' provider ids are lowercase), with a cost account of its own."""
    upper, lower = event(0, provider="OpenAI", model="gpt-4o"), event(1, provider="openai", model="gpt-4o")
    assert run(session_factory, [upper, lower]).inserted == 2
    a, b = row(session_factory, upper), row(session_factory, lower)
    assert (a.provider, a.billing_status) == ("openai", "billed") and a.charge_nanos == b.charge_nanos > 0
    (cost,) = [t for t in transfers(session_factory, upper) if t.kind == "provider_cost"]
    assert {cost.debit_account_id, cost.credit_account_id} == {"provider:openai:cost", "provider:openai:payable"}
    assert run_checks_ok(session_factory)


def test_usage_transfers_and_accounts_are_those_the_ledger_rules_derive(session_factory) -> None:
    """PostgreSQL derives transfers and accounts in SQL, SQLite in Python: both equal ``ledger``'s rules."""
    events = [event(i, user_id=f"user-{i % 3}", provider=p, model=m) for i, (p, m) in
              enumerate([("anthropic", "claude-sonnet-4-6"), ("openai", "gpt-4o")] * 4)]  # fmt: skip
    run(session_factory, events)
    with session_factory() as session:
        stored = {t.id: t for t in session.scalars(select(TransferRow))}
        accounts = {a.id: a for a in session.scalars(select(AccountRow))}
    expected = []
    for e in events:
        quote = expected_quote(session_factory, e)
        assert quote is not None
        expected += usage_postings(event_id=e.event_id, tenant_id=e.tenant_id, user_id=e.user_id,
                                   provider=e.provider, period="2026-11", charge_nanos=quote.price_nanos,
                                   cost_nanos=quote.cost_nanos)  # fmt: skip
    assert len(expected) == 16 and set(stored) == {p.id for p in expected}
    for p in expected:
        t = stored[p.id]
        assert (t.debit_account_id, t.credit_account_id, t.amount_nanos, t.kind, t.event_id, t.period) == (
            p.debit.id, p.credit.id, p.amount_nanos, p.kind.value, p.event_id, p.period)  # fmt: skip
        for account in (p.debit, p.credit):
            row_ = accounts[account.id]
            assert (row_.kind, row_.tenant_id, row_.user_id) == (account.kind.value, account.tenant_id, account.user_id)
    assert run_checks_ok(session_factory)


def run_checks_ok(session_factory) -> bool:
    with session_factory() as session:
        report = run_checks(session)
    assert report.problems == []
    return True


def test_policy_a_byollm_has_a_shadow_cost_and_no_charge(session_factory) -> None:
    byollm = event(1, is_byollm=True)
    failover = event(2, is_byollm=False, is_failover=True)
    run(session_factory, [byollm, failover])
    stored = row(session_factory, byollm)
    assert stored.billing_status == "excluded_byollm" and stored.charge_nanos == 0 and stored.shadow_nanos > 0
    assert stored.shadow_nanos == expected_quote(session_factory, byollm).price_nanos
    assert transfers(session_factory, byollm) == []
    assert row(session_factory, failover).billing_status == "billed"  # the platform served it: billable
    assert {t.kind for t in transfers(session_factory, failover)} == {"usage_charge", "provider_cost"}
    assert run_checks_ok(session_factory)


def test_failed_calls_without_usage_and_unknown_models_are_never_billed(session_factory) -> None:
    failed = event(1, status="error", error_type="server_error", input_tokens=0, output_tokens=0,
                   cache_read_tokens=0, usage_completeness="missing")  # fmt: skip
    unknown = event(2, provider="ollama", model="llama3.1")
    run(session_factory, [failed, unknown])
    assert row(session_factory, failed).billing_status == "not_billable"
    held = row(session_factory, unknown)
    assert held.billing_status == "unpriced" and held.charge_nanos == 0 and held.price_source is None
    assert transfers(session_factory, failed) == transfers(session_factory, unknown) == []
    with session_factory() as session:
        rollup = session.scalars(select(UsageRollupRow).where(UsageRollupRow.model == "llama3.1")).one()
        errors = session.scalars(select(UsageRollupRow).where(UsageRollupRow.status == "error")).one()
    assert (rollup.unpriced_count, rollup.billed_nanos) == (1, 0) and errors.error_count == 1
    assert run_checks_ok(session_factory)


def ledger_state(session_factory):
    with session_factory() as session:
        balances = {a: b for a, b in session.execute(select(AccountRow.id, AccountRow.balance_nanos))}
        posted = {(t.id, t.kind, t.amount_nanos) for t in session.scalars(select(TransferRow))}
        rollups = {
            (r.hour, r.user_id, r.model, r.status): (r.calls, r.billed_nanos, r.cost_nanos)
            for r in session.scalars(select(UsageRollupRow))
        }
    return balances, posted, rollups


def test_replays_in_any_batching_change_nothing(session_factory) -> None:
    events = [event(i, user_id=f"u{i % 7}") for i in range(60)]
    run(session_factory, events)
    once = ledger_state(session_factory)
    again = run(session_factory, events[20:40] + events[:20])
    assert (again.inserted, again.duplicates) == (0, 40)
    overlap = run(session_factory, events[30:] + events[30:35])
    assert (overlap.inserted, overlap.duplicates) == (0, 35)
    assert ledger_state(session_factory) == once
    charges = {t for t in once[1] if t[1] == "usage_charge"}
    assert len(charges) == 60  # one charge per billed event, whatever the batching
    assert run_checks_ok(session_factory)


def test_the_checks_catch_a_corrupted_ledger_or_rollup(session_factory) -> None:
    from sqlalchemy import text

    e, byollm = event(1), event(2, is_byollm=True)
    run(session_factory, [e, byollm])
    with session_factory() as session:
        session.execute(text("UPDATE usage_rollups SET calls = calls + 1 WHERE is_byollm = :t"), {"t": True})
        session.execute(text("UPDATE accounts SET balance_nanos = balance_nanos + 5 WHERE id = 'platform:revenue'"))
        report = run_checks(session)
        session.rollback()
    assert any("rollup" in p for p in report.problems)
    assert any("sum to 5" in p for p in report.problems) and any("platform:revenue" in p for p in report.problems)
    with session_factory() as session:
        session.execute(
            text("UPDATE transfers SET event_id = :b WHERE kind = 'usage_charge'"),
            {"b": byollm.event_id.hex if session.get_bind().dialect.name == "sqlite" else byollm.event_id},
        )
        report = run_checks(session)
        session.rollback()
    assert any("excluded_byollm" in p for p in report.problems)
    for table in ("platform_usage_hourly", "platform_usage_daily", "user_usage_daily"):
        with session_factory() as session:
            session.execute(text(f"UPDATE {table} SET input_tokens = input_tokens - 1"))
            report = run_checks(session)
            session.rollback()
        assert report.problems and all(p.startswith(table) for p in report.problems), report.problems


def test_platform_rollups_sum_the_hourly_ones_per_hour_and_per_day(session_factory) -> None:
    days = [NOW - timedelta(days=d, hours=h) for d in (0, 1, 3) for h in (1, 2)]
    events = [event(i, occurred_at=at, user_id=f"user-{i % 3}", tenant_id=f"tenant-{i % 2}",
                    is_byollm=i % 4 == 0) for i, at in enumerate(days * 3)]  # fmt: skip
    run(session_factory, events)
    with session_factory() as session:
        fine = session.execute(select(func.sum(UsageRollupRow.calls), func.sum(UsageRollupRow.billed_nanos))).one()
        for row in (PlatformUsageHourlyRow, PlatformUsageDailyRow):
            assert session.execute(select(func.sum(row.calls), func.sum(row.billed_nanos))).one() == fine
        assert session.scalar(select(func.count()).select_from(PlatformUsageDailyRow)) < session.scalar(
            select(func.count()).select_from(PlatformUsageHourlyRow)
        )
        assert {d.isoformat() for d in session.scalars(select(PlatformUsageDailyRow.day))} == {
            at.date().isoformat() for at in days
        }
    assert run_checks_ok(session_factory)


def test_one_malformed_event_in_500_is_rejected_and_499_are_ingested(session_factory) -> None:
    items: list = [record(i, occurred_at=NOW - timedelta(minutes=1)) for i in range(500)]
    items[137] = {**items[137], "cache_read_tokens": 10**9}
    items[400] = event(400, occurred_at=NOW + timedelta(hours=2))  # from the future
    items[401] = "not an event"
    result = run(session_factory, items)
    assert result.inserted == 497
    by_index = {r.index: r for r in result.rejected}
    assert set(by_index) == {137, 400, 401}
    assert "cache_read_tokens" in by_index[137].reason and by_index[137].event_id == str(items[137]["event_id"])
    assert "future" in by_index[400].reason
    assert "JSON object" in by_index[401].reason
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(UsageEventRow)) == 497


def test_late_event_for_a_finalized_period_lands_in_the_next_open_period(session_factory) -> None:
    import uuid

    from metering.db.models import InvoiceRow

    with session_factory() as session:
        session.add(InvoiceRow(id=uuid.uuid4(), tenant_id="tenant-1", user_id="user-1", period="2026-10",
                               status="finalized", currency="USD", total_nanos=0, rounded_nanos=0,
                               residue_nanos=0, finalized_at=NOW))  # fmt: skip
        session.add(FinalizedPeriodRow(period="2026-10", finalized_at=NOW))  # what finalize records
        session.commit()
    late = event(1, occurred_at=datetime(2026, 10, 31, 23, 0, tzinfo=UTC))
    other_user = event(2, user_id="user-2", occurred_at=datetime(2026, 10, 31, 23, 0, tzinfo=UTC))
    run(session_factory, [late, other_user])
    assert (row(session_factory, late).invoice_period, row(session_factory, late).is_late) == ("2026-11", True)
    # Finalizing closes the month for every user, not only those it issued an invoice to.
    assert (row(session_factory, other_user).invoice_period, row(session_factory, other_user).is_late) == (
        "2026-11",
        True,
    )


def test_a_finalized_month_stays_closed_for_users_it_issued_nothing_to(session_factory) -> None:
    from datetime import timedelta as td

    from metering.billing.invoice_store import finalize_period, get_invoice

    october = datetime(2026, 10, 15, 10, tzinfo=UTC)
    run(session_factory, [event(1, occurred_at=october)])
    with session_factory() as session:
        assert len(finalize_period(session, "2026-10", NOW, td(hours=72))) == 1
        first_minute = datetime(2026, 12, 1, 0, 0, 30, tzinfo=UTC)  # a month cannot be finalized before it begins
        assert finalize_period(session, "2026-12", first_minute, td(0), force=True) == []  # nothing billed: closed
        session.commit()
    newcomer = event(2, user_id="user-2", occurred_at=datetime(2026, 10, 20, 10, tzinfo=UTC))
    december = event(3, user_id="user-3", occurred_at=datetime(2026, 12, 1, tzinfo=UTC))
    run(session_factory, [newcomer, december], now=datetime(2026, 12, 1, 0, 1, tzinfo=UTC))
    assert (row(session_factory, newcomer).invoice_period, row(session_factory, newcomer).is_late) == ("2026-11", True)
    assert (row(session_factory, december).invoice_period, row(session_factory, december).is_late) == ("2027-01", True)
    with session_factory() as session:
        assert finalize_period(session, "2026-10", NOW, td(hours=72)) == []  # running it again changes nothing
        assert get_invoice(session, "tenant-1", "user-2", "2026-10").lines == ()
        assert [line.is_late for line in get_invoice(session, "tenant-1", "user-2", "2026-11").lines] == [True]
        assert run_checks(session).problems == []


def test_rollups_equal_a_recomputation_from_raw_events(session_factory) -> None:
    models = [("anthropic", "claude-sonnet-4-6"), ("openai", "gpt-4o"), ("anthropic", "claude-haiku-4-5")]
    events = [
        event(
            i,
            user_id=f"u{i % 3}",
            provider=models[i % 3][0],
            model=models[i % 3][1],
            is_byollm=i % 5 == 0,
            latency_ms=round(1.2345 * i, 3),
            occurred_at=NOW - timedelta(minutes=7 * i),
        )
        for i in range(40)
    ]
    run(session_factory, events[:25])
    run(session_factory, events[15:])
    assert run_checks_ok(session_factory)
    with session_factory() as session:
        calls = session.scalar(select(func.sum(UsageRollupRow.calls)))
    assert calls == 40


def test_a_batch_raced_by_another_ingest_takes_the_exact_path(session_factory, backend, monkeypatch) -> None:
    """PostgreSQL: between the probe for stored ids and the COPY, another ingest stores some of the events.
    The COPY fails on the primary key, the savepoint is rolled back, and the staged INSERT ... ON CONFLICT
    path stores exactly the others, each billed once."""
    if backend != "postgresql":
        return  # SQLite holds the database write lock for the whole batch: no window to race in
    from metering.billing import store

    events = [event(i, user_id=f"user-{i % 4}") for i in range(40)]
    run(session_factory, events[10:20])  # "the other ingest" got there first
    monkeypatch.setattr(store, "unstored_events", lambda _session, evs, *_: sorted(evs, key=lambda e: e.event_id))
    result = run(session_factory, events)
    assert (result.inserted, result.duplicates) == (30, 10)
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(UsageEventRow)) == 40
        charges = session.scalar(
            select(func.count()).select_from(TransferRow).where(TransferRow.kind == "usage_charge")
        )
    assert charges == 40
    assert run_checks_ok(session_factory)


def test_an_event_priced_beyond_what_one_call_can_cost_is_rejected_and_the_batch_goes_on(session_factory) -> None:
    # 10^9 input and output tokens of Claude Opus (the most a count may say): $90,000 before markup, more than one
    # call can cost. Without the limit, such events (or an absurd override) could overflow the BIGINT sums.
    absurd = {"provider": "anthropic", "model": "claude-opus-4-1", "input_tokens": MAX_TOKENS,
              "output_tokens": MAX_TOKENS, "cache_read_tokens": 0, "cache_write_tokens": 0,
              "user_id": "user-garbage"}  # fmt: skip
    items: list = [record(i, occurred_at=NOW - timedelta(minutes=1)) for i in range(5)]
    items += [record(100 + i, occurred_at=NOW - timedelta(minutes=1), **absurd) for i in range(120)]
    items.insert(2, items.pop())  # one absurd event among the normal ones, as a dict with a string id
    result = run(session_factory, items)
    assert result.inserted == 5 and result.duplicates == 0
    assert [r.index for r in result.rejected] == [
        i for i, item in enumerate(items) if item.get("user_id") == "user-garbage"
    ]
    first = result.rejected[0]
    assert first.index == 2 and first.event_id == str(items[2]["event_id"])
    assert "above the limit of $10,000.00 per call" in first.reason and "token counts" in first.reason
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(UsageEventRow)) == 5
        assert session.get(AccountRow, "user:tenant-1:user-garbage") is None
    assert run(session_factory, items).rejected == result.rejected  # a replay rejects them again, stores nothing
    assert run_checks_ok(session_factory)


def test_a_repeat_of_a_rejected_event_is_rejected_too_not_counted_as_stored(session_factory) -> None:
    """The second item repeats the first's event_id; the first is rejected (over the per-call limit). The second was
    counted as a duplicate, which says the id is stored: it is not."""
    absurd = event(0, provider="anthropic", model="claude-opus-4-1", input_tokens=MAX_TOKENS, output_tokens=MAX_TOKENS,
                   cache_read_tokens=0, cache_write_tokens=0)  # fmt: skip
    normal = event(1)
    result = run(session_factory, [absurd, normal, absurd])
    assert (result.inserted, result.duplicates) == (1, 0)
    assert [(r.index, r.event_id) for r in result.rejected] == [(0, str(absurd.event_id)), (2, str(absurd.event_id))]
    assert result.rejected[1].reason.startswith("repeats the event_id of item 0, which is rejected: ")
    assert "above the limit" in result.rejected[1].reason
    assert row(session_factory, absurd) is None


def test_a_stored_event_priced_beyond_the_limit_now_is_a_duplicate_not_a_rejection(session_factory) -> None:
    from metering.billing.overrides import add_override

    e = event(1, provider="ollama", model="llama3.1", input_tokens=10**9, output_tokens=0, cache_read_tokens=0)
    assert run(session_factory, [e]).inserted == 1  # unpriced: held
    with session_factory() as session:  # now $20/Mtok: 10^9 tokens cost $20,000
        add_override(session, provider="ollama", model_pattern="llama3*", effective_from=NOW - timedelta(days=1),
                     effective_to=None, input_mtok=Decimal(20), output_mtok=Decimal(20))  # fmt: skip
        session.commit()
    replay = run(session_factory, [e, event(2)])
    assert (replay.inserted, replay.duplicates, replay.rejected) == (1, 1, [])
    assert row(session_factory, e).billing_status == "unpriced"


def test_token_counts_and_latencies_past_their_bounds_are_rejected_one_by_one(session_factory) -> None:
    # A unit bug (nanoseconds sent as milliseconds) used to pass up to 10^12 ms; ~2 million 5-second calls sent so
    # overflowed a BIGINT rollup sum, failing every later batch with an event of that bucket.
    from metering.events import MAX_LATENCY_MS

    items: list = [record(i, occurred_at=NOW - timedelta(minutes=1)) for i in range(4)]
    items[1] = {**items[1], "latency_ms": 5_000_000_000.0}  # a 5 s call in nanoseconds
    items[2] = {**items[2], "output_tokens": MAX_TOKENS + 1}
    items[3] = {**items[3], "latency_ms": MAX_LATENCY_MS, "input_tokens": MAX_TOKENS, "cache_read_tokens": 0}
    result = run(session_factory, items)
    assert result.inserted == 2  # item 3 sits at both bounds: stored ($3,000 of Sonnet input, within the limit)
    by_index = {r.index: r.reason for r in result.rejected}
    assert set(by_index) == {1, 2}
    assert "latency_ms" in by_index[1] and "86400000" in by_index[1]
    assert "output_tokens" in by_index[2] and "1000000000" in by_index[2]
    assert row(session_factory, event_from_record(items[3])).latency_ms == MAX_LATENCY_MS


def test_tenants_and_users_with_colons_never_share_a_wallet(session_factory) -> None:
    """'acme:x'/'y' and 'acme'/'x:y' once mapped to one wallet, 'user:acme:x:y': a cross-tenant money mix-up."""
    from metering.billing.credits import add_credit, balances
    from metering.billing.ledger import wallet_id

    a, b = event(1, tenant_id="acme:x", user_id="y"), event(2, tenant_id="acme", user_id="x:y")
    assert run(session_factory, [a, b]).inserted == 2
    with session_factory() as session:
        add_credit(session, tenant_id="acme:x", user_id="y", amount=Decimal(1), idempotency_key="k1", now=NOW)
        add_credit(session, tenant_id="acme", user_id="x:y", amount=Decimal(7), idempotency_key="k2", now=NOW)
        session.commit()
        wallets = {
            (r.tenant_id, r.user_id): (r.id, r.balance_nanos)
            for r in session.scalars(select(AccountRow).where(AccountRow.kind == "user_wallet"))
        }
        acme = balances(session, "acme")
        report = run_checks(session)
    charge_a, charge_b = (row(session_factory, e).charge_nanos for e in (a, b))
    assert wallets == {
        ("acme:x", "y"): ("user:acme~3Ax:y", 1_000_000_000 - charge_a),
        ("acme", "x:y"): ("user:acme:x:y", 7_000_000_000 - charge_b),
    }
    assert [account for account, _, _ in acme] == ["user:acme:x:y"]
    assert wallet_id("a~3Ab", "c") != wallet_id("a:b", "c")  # the escape character is escaped too
    assert report.problems == []
    (debit_a,) = [t.debit_account_id for t in transfers(session_factory, a) if t.kind == "usage_charge"]
    assert debit_a == "user:acme~3Ax:y"


def test_the_checks_catch_a_wallet_that_is_not_its_owners(session_factory) -> None:
    from sqlalchemy import text

    e = event(1, tenant_id="acme:x", user_id="y")
    run(session_factory, [e])
    with session_factory() as session:  # the id an older version gave this wallet, shared with 'acme'/'x:y'
        session.execute(text("UPDATE transfers SET debit_account_id = 'user:acme:x:y' WHERE kind = 'usage_charge'"))
        session.execute(text("UPDATE accounts SET id = 'user:acme:x:y' WHERE kind = 'user_wallet'"))
        report = run_checks(session)
        session.rollback()
    assert any("is not the wallet id of tenant 'acme:x'" in p for p in report.problems), report.problems
    assert any("not the wallet of 'acme:x'/'y'" in p for p in report.problems), report.problems


def test_a_batch_that_waited_for_a_lock_posts_after_it_was_released(session_factory) -> None:
    """The posting time (transfers' created_at, which orders GET /v1/transfers) is taken once the locks are held. It
    was taken before: a batch that waited for a finalization (PostgreSQL) or another writer (SQLite) committed
    after rows with a later created_at, and a transfers walk between the two commits skipped it for good."""
    import threading
    import time

    from metering.billing import invoice_store

    e = event(0, occurred_at=datetime.now(UTC) - timedelta(minutes=1))
    holder = session_factory()
    invoice_store._lock_period_exclusive(holder, e.occurred_at.strftime("%Y-%m"))  # as finalize does
    done = threading.Event()

    def ingest_in_thread() -> None:
        with session_factory() as session:
            ingest(session, [e], markup_pct=MARKUP)  # the clock's now, not a fixed one
            session.commit()
        done.set()

    worker = threading.Thread(target=ingest_in_thread)
    worker.start()
    time.sleep(0.5)
    assert not done.is_set()  # it waits for the lock
    released = datetime.now(UTC)
    holder.commit()
    holder.close()
    worker.join(timeout=30)
    assert done.is_set()
    posted = transfers(session_factory, e)
    assert posted and all(t.created_at >= released for t in posted)


def test_the_longest_valid_ids_are_billed(session_factory) -> None:
    """A wallet id is 'user:' + the escaped tenant (':' is '~3A') + ':' + the user: up to 806 characters. Accounts
    held 300: on PostgreSQL such a valid event failed its whole batch (and blocked the spool slot behind it)."""
    long = event(0, tenant_id="T" * 200, user_id="U" * 200)
    colons = event(1, tenant_id=":" * 200, user_id="ü" * 200)
    assert run(session_factory, [long, colons]).inserted == 2
    for e in (long, colons):
        assert row(session_factory, e).billing_status == "billed"
        (charge,) = [t for t in transfers(session_factory, e) if t.kind == "usage_charge"]
        assert charge.debit_account_id.startswith("user:") and len(charge.debit_account_id) in (406, 806)
    assert run_checks_ok(session_factory)


def test_a_rejection_quotes_little_of_the_input_and_no_control_characters(session_factory) -> None:
    bad = {**record(0, occurred_at=NOW - timedelta(minutes=1)), "a\x00b": 1, **{f"extra{i}": i for i in range(30)}}
    bad["event_id"] = "x\x00" + "y" * 10_000
    result = run(session_factory, [bad, record(1, occurred_at=NOW - timedelta(minutes=1))])
    assert result.inserted == 1
    (rejection,) = result.rejected
    assert "\x00" not in rejection.reason and "a\\x00b" in rejection.reason and "(and 22 more)" in rejection.reason
    assert rejection.event_id is not None and len(rejection.event_id) <= 64 and "\x00" not in rejection.event_id


def test_the_checks_catch_a_provider_cost_posted_wrong_and_a_billed_byollm_event(session_factory) -> None:
    """The checks proved each event's net charge, but not its provider cost, and not Policy A by itself: a cost
    transfer of the wrong amount, and a BYOLLM event marked billed with its charge posted, both passed."""
    from sqlalchemy import text

    e, byollm = event(1), event(2, is_byollm=True)
    run(session_factory, [e, byollm])
    assert run_checks_ok(session_factory)
    with session_factory() as session:  # the cost transfer and both accounts moved alike: balances still agree
        cost = session.scalar(select(TransferRow.amount_nanos).where(TransferRow.kind == "provider_cost"))
        session.execute(text("UPDATE transfers SET amount_nanos = amount_nanos + 7 WHERE kind = 'provider_cost'"))
        session.execute(text("UPDATE accounts SET balance_nanos = balance_nanos - 7 WHERE kind = 'provider_cost'"))
        session.execute(text("UPDATE accounts SET balance_nanos = balance_nanos + 7 WHERE kind = 'provider_payable'"))
        report = run_checks(session)
        session.rollback()
    [problem] = [p for p in report.problems if "posted" in p]
    assert problem.endswith(f" (billed): cost {cost} but {cost + 7} posted"), report.problems
    with session_factory() as session:  # Policy A broken in the event row alone
        session.execute(text("UPDATE usage_events SET billing_status = 'unpriced' WHERE is_byollm = :t"), {"t": True})
        report = run_checks(session)
        session.rollback()
    assert any("is a BYOLLM call but unpriced, not excluded_byollm (Policy A)" in p for p in report.problems)


def test_a_platform_markup_with_zeros_past_its_ninth_decimal_fits_the_events_column(session_factory) -> None:
    """METERING_BILLING__MARKUP_PCT=12.5 and 40 zeros is 12.5 % (9 decimals at most: the zeros do not count), but its
    text, 43 characters, went on every priced event (VARCHAR(32)): on PostgreSQL every ingest failed (value too long),
    on SQLite it was stored over the column's width. The zeros past the 9th decimal are dropped when it is read."""
    markup = BillingSettings(markup_pct="12.5" + "0" * 40).markup_pct
    assert markup == Decimal("12.5")
    assert BillingSettings(markup_pct="12.50").markup_pct.as_tuple() == Decimal("12.50").as_tuple()  # kept as set
    e = event(0)
    with session_factory() as session:
        result = ingest(session, [e], markup_pct=markup, now=NOW)
        session.commit()
    assert result.inserted == 1
    assert row(session_factory, e).markup_pct == "12.500000000"


def test_the_checks_name_transfers_between_accounts_their_kind_does_not_name(session_factory) -> None:
    """A usage charge goes from its event's wallet to platform revenue, a provider cost from its event's provider's
    cost account to its payable one, a credit from top-ups to a wallet, an adjustment between adjustments and a
    wallet. Only the wallet debited by a usage charge was checked: a charge paid into another user's wallet, a cost
    booked to another provider, or a credit drawn on revenue passed `billing check` (each event's net amounts and
    every balance still agreeing with the transfers)."""
    from metering.billing.credits import add_credit

    run(session_factory, [event(1), event(2, user_id="user-2")])
    with session_factory() as session:
        add_credit(session, tenant_id="tenant-1", user_id="user-1", amount=Decimal(5), idempotency_key="c", now=NOW)
        add_credit(session, tenant_id="tenant-1", user_id="user-1", amount=Decimal(-2), idempotency_key="a",
                   kind="adjustment", now=NOW)  # fmt: skip
        session.commit()
        assert run_checks(session).problems == []
    wallet_2 = "user:tenant-1:user-2"

    def moved(kind: str, *, debit: str | None = None, credit: str | None = None) -> list[str]:
        """The checks' problems once the first transfer of ``kind`` (of user-1) moves between other accounts."""
        with session_factory() as session:
            t = session.scalars(
                select(TransferRow).where(TransferRow.kind == kind).order_by(TransferRow.debit_account_id)
            ).first()
            for side, account in (("debit_account_id", debit), ("credit_account_id", credit)):
                if account is None:
                    continue
                sign = -1 if side == "debit_account_id" else 1
                for ident, delta in ((getattr(t, side), -sign * t.amount_nanos), (account, sign * t.amount_nanos)):
                    if session.get(AccountRow, ident) is None:
                        session.add(AccountRow(id=ident, kind="provider_payable", tenant_id=None, user_id=None,
                                               currency="USD", balance_nanos=0, created_at=NOW))  # fmt: skip
                        session.flush()
                    session.get(AccountRow, ident).balance_nanos += delta
                setattr(t, side, account)
            session.flush()
            problems = run_checks(session).problems
            session.rollback()
        assert problems, kind
        return problems

    charge = moved("usage_charge", credit=wallet_2)
    assert any("usage_charge" in p and f"credits {wallet_2}, not platform:revenue" in p for p in charge), charge
    cost = moved("provider_cost", credit="provider:openai:payable")
    assert any("provider:openai:payable" in p and "provider:anthropic:payable" in p for p in cost), cost
    credit = moved("credit", debit="platform:revenue")
    assert any("credit" in p and "debits platform:revenue, not platform:topups" in p for p in credit), credit
    adjustment = moved("adjustment", credit="platform:revenue")
    assert any("adjustment" in p and "platform:revenue" in p for p in adjustment), adjustment


def test_a_misbooked_provider_cost_is_named_behind_any_number_of_legacy_spellings(session_factory) -> None:
    """A provider cost of an event stored under a legacy spelling with a non-ASCII capital ('İLLAMA', booked to
    Python's lowercase 'i̇llama') is a candidate in SQL (whose lower() differs) that Python then clears. The check
    read at most 200 candidates: with more legacy rows than that ahead of it, a real misbooking was never seen."""
    from metering.billing.checks import CheckReport, check_transfer_accounts

    legacy = "İLLAMA"
    run(session_factory, [event(i) for i in range(205)])
    with session_factory() as session:
        session.execute(update(UsageEventRow).values(provider=legacy))
        costs = TransferRow.kind == "provider_cost"
        session.execute(
            update(TransferRow)
            .where(costs)
            .values(
                debit_account_id=f"provider:{legacy.lower()}:cost",
                credit_account_id=f"provider:{legacy.lower()}:payable",
            )
        )
        last = session.scalars(select(TransferRow).where(costs).order_by(TransferRow.id.desc()).limit(1)).one()
        last.credit_account_id = "provider:openai:payable"
        session.flush()
        ident, event_id = last.id, last.event_id
        report = CheckReport()
        check_transfer_accounts(session, report)
        session.rollback()
    assert [p for p in report.problems if "provider_cost" in p] == [
        f"transfer {ident} (provider_cost) of event {event_id} moves provider:{legacy.lower()}:cost -> "
        f"provider:openai:payable, not provider:{legacy.lower()}:cost -> provider:{legacy.lower()}:payable"
    ]
