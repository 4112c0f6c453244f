"""Property-based tests of ingest over random event streams, batchings and replays (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from metering.billing.checks import run_checks
from metering.billing.ingest import ingest
from metering.billing.periods import period_of
from metering.billing.policy import BillingStatus, decide
from metering.billing.pricing import PriceBook, price_usage
from metering.billing.store import load_price_book
from metering.db.models import AccountRow, TransferRow, UsageEventRow
from metering.events import UsageEvent, event_from_record
from tests.conftest import _clean
from tests.fakes.events import record

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
MARKUP = Decimal(15)
MODELS = [
    ("anthropic", "claude-sonnet-4-6"),
    ("anthropic", "claude-haiku-4-5"),
    ("openai", "gpt-4o-mini"),
    ("simulated", "claude-sonnet-4-6"),
    ("ollama", "llama3.1"),  # no price: held
]


@st.composite
def usage_events(draw: st.DrawFn, index: int) -> UsageEvent:
    provider, model = draw(st.sampled_from(MODELS))
    failed = draw(st.integers(0, 9)) == 0
    inp = 0 if failed else draw(st.integers(0, 300_000))
    read = draw(st.integers(0, inp))
    write = draw(st.integers(0, inp - read))
    write_1h = draw(st.one_of(st.just(0), st.integers(0, write)))
    # a failed call's usage is missing, or reports what it used before failing: maybe only web searches (billed)
    reported = not failed or draw(st.booleans())
    searches = draw(st.one_of(st.just(0), st.integers(0, 5)))
    out = 0 if failed else draw(st.integers(0, 20_000))
    return event_from_record(
        record(
            index,
            user_id=draw(st.sampled_from(["ann", "bob", "cy"])),
            provider=provider,
            model=model,
            is_byollm=draw(st.booleans()),
            input_tokens=inp,
            cache_read_tokens=read,
            cache_write_tokens=write,
            cache_write_1h_tokens=write_1h,
            web_searches=searches,
            output_tokens=out,
            reasoning_tokens=draw(st.integers(0, out)),
            status="error" if failed else "ok",
            error_type="server_error" if failed else None,
            usage_completeness="reported" if reported else "missing",
            latency_ms=draw(st.integers(0, 10**7)) / 1000,
            occurred_at=NOW - timedelta(minutes=draw(st.integers(0, 60 * 24 * 45))),
        )
    )


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[UsageEvent], list[list[int]]]:
    n = draw(st.integers(1, 40))
    events = [draw(usage_events(i)) for i in range(n)]
    batches: list[list[int]] = []
    for _ in range(draw(st.integers(1, 5))):  # random batches, each a random subset in random order: replays
        batches.append(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2 * n)))
    batches.append(draw(st.permutations(range(n))))  # everything at least once
    return events, batches


def expected_charge(e: UsageEvent) -> tuple[BillingStatus, int]:
    quote = price_usage(
        provider=e.provider, model=e.model, occurred_at=e.occurred_at, input_tokens=e.input_tokens,
        output_tokens=e.output_tokens, cache_read_tokens=e.cache_read_tokens,
        cache_write_tokens=e.cache_write_tokens, cache_write_1h_tokens=e.cache_write_1h_tokens,
        web_searches=e.web_searches, book=PriceBook(markup_pct=MARKUP),
    )  # fmt: skip
    d = decide(is_byollm=e.is_byollm, status=e.status, usage_completeness=e.usage_completeness,
               total_tokens=e.input_tokens + e.output_tokens, web_searches=e.web_searches, quote=quote)  # fmt: skip
    return d.status, d.charge_nanos


def state(session) -> tuple:
    balances = {a: b for a, b in session.execute(select(AccountRow.id, AccountRow.balance_nanos))}
    posted = {
        (t.id, t.debit_account_id, t.credit_account_id, t.amount_nanos) for t in session.scalars(select(TransferRow))
    }
    return balances, posted


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=streams())
def test_random_streams_bill_exactly_and_replays_change_nothing(engine, session_factory, stream) -> None:
    _clean(engine)
    events, batches = stream
    for batch in batches:
        with session_factory() as session:
            ingest(session, [events[i] for i in batch], markup_pct=MARKUP, now=NOW)
            session.commit()
    with session_factory() as session:
        report = run_checks(session)
        assert report.problems == []  # zero-sum, cached == derived, charges == events, rollups == raw
        before = state(session)
        assert sum(before[0].values()) == 0
        rows = {r.event_id: r for r in session.scalars(select(UsageEventRow))}
        charged_events = {
            t.event_id for t in session.scalars(select(TransferRow).where(TransferRow.kind == "usage_charge"))
        }
        ledger_by_period = dict(
            session.execute(
                text("SELECT period, sum(amount_nanos) FROM transfers WHERE kind = 'usage_charge' GROUP BY period")
            ).all()
        )
    assert set(rows) == {e.event_id for e in events}
    expected_by_period: dict[str, int] = defaultdict(int)
    for e in events:
        status, charge = expected_charge(e)
        row = rows[e.event_id]
        assert (row.billing_status, row.charge_nanos) == (status.value, charge)
        if e.is_byollm:
            assert e.event_id not in charged_events  # Policy A: never a charge
        if status is BillingStatus.BILLED and charge:
            expected_by_period[period_of(e.occurred_at)] += charge
    assert {p: v for p, v in ledger_by_period.items() if v} == dict(expected_by_period)

    for batch in batches[:2]:  # replaying any subset again changes nothing
        with session_factory() as session:
            result = ingest(session, [events[i] for i in batch], markup_pct=MARKUP, now=NOW)
            session.commit()
        assert result.inserted == 0
    with session_factory() as session:
        assert state(session) == before


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stream=streams(),
    input_price=st.sampled_from([Decimal(0), Decimal("0.5"), Decimal("2.75"), Decimal(9)]),
    output_price=st.sampled_from([Decimal(0), Decimal(4), Decimal("15.125")]),
    write_1h_price=st.sampled_from([None, Decimal("7.5")]),
    search_price=st.sampled_from([None, Decimal(0), Decimal(10)]),
    window_days=st.integers(1, 45),
)
def test_random_rerates_keep_the_ledger_balanced_and_exact(
    engine, session_factory, stream, input_price, output_price, write_1h_price, search_price, window_days
) -> None:
    from metering.billing.overrides import add_override
    from metering.billing.rerate import apply_rerate

    _clean(engine)
    events, batches = stream
    for batch in batches:
        with session_factory() as session:
            ingest(session, [events[i] for i in batch], markup_pct=MARKUP, now=NOW)
            session.commit()
    start, end = NOW - timedelta(days=window_days), NOW + timedelta(minutes=1)
    with session_factory() as session:
        add_override(session, provider="anthropic", model_pattern="claude-*", effective_from=start,
                     effective_to=end, input_mtok=input_price, output_mtok=output_price,
                     cache_write_1h_mtok=write_1h_price, web_search_per_k=search_price, now=NOW)  # fmt: skip
        session.commit()
    with session_factory() as session:
        apply_rerate(session, start=start, end=end, markup_pct=MARKUP, run_id="r1", now=NOW)
        session.commit()
    with session_factory() as session:
        report = run_checks(session)  # zero-sum, cached == derived, net charge per event == its charge
        assert report.problems == []
        after = state(session)
        rows = list(session.scalars(select(UsageEventRow)))
    with session_factory() as session:
        book = load_price_book(session, MARKUP)
    for row in rows:  # every billed Anthropic event of the window now costs the override's price
        if row.billing_status == "billed" and row.provider == "anthropic" and start <= row.occurred_at < end:
            quote = price_usage(provider=row.provider, model=row.model, occurred_at=row.occurred_at,
                                input_tokens=row.input_tokens, output_tokens=row.output_tokens,
                                cache_read_tokens=row.cache_read_tokens, cache_write_tokens=row.cache_write_tokens,
                                cache_write_1h_tokens=row.cache_write_1h_tokens, web_searches=row.web_searches,
                                book=book)  # fmt: skip
            if row.web_searches and search_price is None:
                assert quote is None  # no price for its searches now: re-rate leaves it as it was billed
                continue
            assert quote is not None and quote.source == "override"
            assert (row.charge_nanos, row.cost_nanos) == (quote.price_nanos, quote.cost_nanos)
    with session_factory() as session:  # the same run again changes nothing
        apply_rerate(session, start=start, end=end, markup_pct=MARKUP, run_id="r1", now=NOW)
        session.commit()
        assert state(session) == after
