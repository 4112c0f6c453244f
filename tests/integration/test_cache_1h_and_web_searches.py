"""1-hour cache writes and web searches are billed, on SQLite and PostgreSQL.

Before migration 0011, an event could not say either: Anthropic's 1-hour cache writes (2x input) were billed as
5-minute ones (1.25x) and its web searches ($10 per 1,000) not at all.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from metering.billing import store
from metering.billing.checks import run_checks
from metering.billing.corrections import rollup_key
from metering.billing.ingest import ingest
from metering.billing.overrides import add_override
from metering.billing.reprice import reprice_held
from metering.billing.rerate import apply_rerate
from metering.billing.rollup import COUNTER_COLUMNS
from metering.db.models import UsageEventRow
from metering.events import UsageEvent, event_from_record
from tests.fakes.events import record
from tests.integration.test_ingest import MARKUP, NOW, row, run, transfers

SONNET_INPUT, SONNET_WRITE_5M, SONNET_WRITE_1H, SONNET_OUTPUT = 3, Decimal("3.75"), 6, 15  # genai-prices, $/Mtok


def event(i: int = 0, **overrides) -> UsageEvent:
    overrides = {"occurred_at": NOW - timedelta(minutes=5), "input_tokens": 100_000, "output_tokens": 1_000,
                 "cache_read_tokens": 0, "cache_write_tokens": 60_000, **overrides}  # fmt: skip
    return event_from_record(record(i, **overrides))


def nanos(usd: Decimal) -> int:
    return int(usd * 10**9)


def price(session_factory, model_pattern: str, **prices) -> None:
    with session_factory() as session:
        add_override(session, provider="anthropic", model_pattern=model_pattern,
                     effective_from=NOW - timedelta(days=1), **{"effective_to": None, **prices})  # fmt: skip
        session.commit()


def checks_ok(session_factory) -> None:
    with session_factory() as session:
        assert run_checks(session).problems == []


def test_one_hour_cache_writes_and_web_searches_are_charged(session_factory) -> None:
    plain = event(0)
    hour = event(1, cache_write_1h_tokens=50_000)
    searched = event(2, web_searches=3)
    assert run(session_factory, [plain, hour, searched]).inserted == 3
    uncached = 40_000 * SONNET_INPUT + SONNET_OUTPUT * 1_000
    expected = [
        (plain, nanos(Decimal(uncached + 60_000 * SONNET_WRITE_5M) / 10**6)),
        (hour, nanos(Decimal(uncached + 10_000 * SONNET_WRITE_5M + 50_000 * SONNET_WRITE_1H) / 10**6)),
        (searched, nanos(Decimal(uncached + 60_000 * SONNET_WRITE_5M) / 10**6 + Decimal("0.03"))),
    ]
    for e, cost in expected:
        stored = row(session_factory, e)
        assert (stored.cache_write_1h_tokens, stored.web_searches) == (e.cache_write_1h_tokens, e.web_searches)
        assert (stored.billing_status, stored.cost_nanos) == ("billed", cost)
        assert stored.charge_nanos == cost * (100 + MARKUP) / 100
        charge = [t for t in transfers(session_factory, e) if t.kind == "usage_charge"]
        assert [t.amount_nanos for t in charge] == [stored.charge_nanos]
    # a replay is a duplicate; the same id without its searches is not (it is not what was billed)
    again = run(session_factory, [searched, event_from_record(searched.model_dump() | {"web_searches": 0})])
    assert (again.inserted, again.duplicates) == (0, 1)
    assert "web_searches" in again.rejected[0].reason
    checks_ok(session_factory)


def test_searches_without_a_search_price_are_held_until_an_override_prices_them(session_factory) -> None:
    """claude-3-haiku has no search price in genai-prices; an override for it without one holds them too. Never
    billed as if the searches were free; `reprice` bills them once an override has a search price."""
    old = event(0, model="claude-3-haiku-20240307", web_searches=2)
    assert run(session_factory, [old]).inserted == 1
    assert row(session_factory, old).billing_status == "unpriced"
    price(session_factory, "claude-3-haiku*", effective_to=NOW, input_mtok=Decimal("0.25"),
          output_mtok=Decimal("1.25"), id="no-search")  # fmt: skip
    with session_factory() as session:
        assert reprice_held(session, markup_pct=MARKUP, now=NOW).priced == 0
        session.commit()
    assert row(session_factory, old).billing_status == "unpriced"
    price(session_factory, "claude-3-haiku-2*", input_mtok=Decimal("0.25"), output_mtok=Decimal("1.25"),
          web_search_per_k=Decimal("10"), id="search")  # fmt: skip
    with session_factory() as session:
        assert reprice_held(session, markup_pct=MARKUP, now=NOW).priced == 1
        session.commit()
    stored = row(session_factory, old)
    tokens = Decimal(40_000 + 60_000) * Decimal("0.25") + 1_000 * Decimal("1.25")  # no cache prices: input price
    assert (stored.billing_status, stored.price_version) == ("billed", "search")
    assert stored.cost_nanos == nanos(tokens / 10**6 + Decimal("0.02"))
    checks_ok(session_factory)


def test_a_rerate_reprices_one_hour_writes_and_searches_at_the_new_prices(session_factory) -> None:
    e = event(0, cache_write_1h_tokens=20_000, web_searches=4)
    with session_factory() as session:
        ingest(session, [e], markup_pct=MARKUP, now=NOW)
        session.commit()
    before = row(session_factory, e).cost_nanos
    negotiated = {"input_mtok": Decimal(2), "output_mtok": Decimal(10), "cache_write_mtok": Decimal(3),
                  "cache_write_1h_mtok": Decimal(5), "web_search_per_k": Decimal(8)}  # fmt: skip
    price(session_factory, "claude-sonnet-4-6", id="negotiated", **negotiated)
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    with session_factory() as session:
        result = apply_rerate(session, start=start, end=end, markup_pct=MARKUP, run_id="r1", now=NOW)
        session.commit()
    assert result.transfers > 0
    cost = Decimal(40_000 * 2 + 40_000 * 3 + 20_000 * 5 + 1_000 * 10) / 10**6 + Decimal("0.032")
    stored = row(session_factory, e)
    assert stored.cost_nanos == nanos(cost) != before
    assert stored.price_version == "negotiated"
    checks_ok(session_factory)


def test_one_hour_writes_beyond_the_cache_writes_are_rejected_with_a_reason(session_factory) -> None:
    bad = record(1, occurred_at=NOW - timedelta(minutes=5), cache_write_tokens=10, cache_write_1h_tokens=11)
    searches = record(2, occurred_at=NOW - timedelta(minutes=5), web_searches=10_001)
    result = run(session_factory, [record(0, occurred_at=NOW - timedelta(minutes=5)), bad, searches])
    assert result.inserted == 1
    reasons = {r.index: r.reason for r in result.rejected}
    assert "cache_write_1h_tokens must not exceed cache_write_tokens" in reasons[1]
    assert reasons[2].startswith("web_searches: Input should be less than or equal to 10000")
    checks_ok(session_factory)


def test_events_written_before_these_fields_still_ingest_with_none_of_them(session_factory) -> None:
    line = record(0, occurred_at=NOW - timedelta(minutes=5))
    assert "cache_write_1h_tokens" not in line and "web_searches" not in line  # as a metered call writes it
    assert run(session_factory, [line]).inserted == 1
    stored = row(session_factory, event_from_record(line))
    assert (stored.cache_write_1h_tokens, stored.web_searches, stored.billing_status) == (0, 0, "billed")


def test_a_replay_differing_only_in_the_new_counts_is_rejected_in_a_batch_and_against_the_stored_event(
    session_factory,
) -> None:
    """An id sent again with other 1-hour writes or other searches is not a replay (in one batch, or of a stored
    event): it is rejected with the field that differs; the stored event, with its counts, is what is billed."""
    first = event(0, cache_write_1h_tokens=10_000, web_searches=1)
    hours = event_from_record(first.model_dump() | {"cache_write_1h_tokens": 20_000})
    searches = event_from_record(first.model_dump() | {"web_searches": 2})
    result = run(session_factory, [first, hours, searches, first])
    assert (result.inserted, result.duplicates) == (1, 1)
    reasons = {r.index: r.reason for r in result.rejected}
    assert set(reasons) == {1, 2}
    assert "(cache_write_1h_tokens)" in reasons[1] and "(web_searches)" in reasons[2]
    for variant, field in ((hours, "cache_write_1h_tokens"), (searches, "web_searches")):
        again = run(session_factory, [variant])
        assert (again.inserted, again.duplicates) == (0, 0)
        assert f"already stored with different content ({field})" in again.rejected[0].reason
    assert (run(session_factory, [first]).inserted, run(session_factory, [first]).duplicates) == (0, 1)
    stored = row(session_factory, first)
    assert (stored.cache_write_1h_tokens, stored.web_searches) == (10_000, 1)
    checks_ok(session_factory)


def test_byollm_shadow_costs_and_a_dry_run_rerate_count_one_hour_writes_and_searches(session_factory) -> None:
    """The shadow cost of a BYOLLM call is its quote with both counts; one whose searches have no price has an
    unknown shadow cost until an override prices them (reprice fills it); a dry-run re-rate's diff uses the counts."""
    from metering.billing.pricing import PriceBook, price_usage
    from metering.billing.rerate import plan_rerate

    byollm = event(0, is_byollm=True, cache_write_1h_tokens=50_000, web_searches=3)
    unknown = event(1, is_byollm=True, model="claude-3-haiku-20240307", web_searches=2)
    billed = event(2, cache_write_1h_tokens=20_000, web_searches=4)
    assert run(session_factory, [byollm, unknown, billed]).inserted == 3
    quote = price_usage(provider="anthropic", model="claude-sonnet-4-6", occurred_at=byollm.occurred_at,
                        input_tokens=100_000, output_tokens=1_000, cache_read_tokens=0, cache_write_tokens=60_000,
                        cache_write_1h_tokens=50_000, web_searches=3, book=PriceBook(markup_pct=MARKUP))  # fmt: skip
    assert quote is not None
    stored = row(session_factory, byollm)
    assert (stored.billing_status, stored.shadow_nanos, stored.charge_nanos) == (
        "excluded_byollm",
        quote.price_nanos,
        0,
    )
    held = row(session_factory, unknown)
    assert (held.billing_status, held.price_source, held.shadow_nanos) == ("excluded_byollm", None, 0)
    price(session_factory, "claude-3-haiku*", input_mtok=Decimal("0.25"), output_mtok=Decimal("1.25"),
          web_search_per_k=Decimal("10"), id="haiku")  # fmt: skip
    with session_factory() as session:
        result = reprice_held(session, markup_pct=MARKUP, now=NOW)
        session.commit()
    assert (result.priced, result.shadow_priced) == (0, 1)
    tokens = Decimal(100_000) * Decimal("0.25") + 1_000 * Decimal("1.25")
    assert row(session_factory, unknown).shadow_nanos == nanos(
        (tokens / 10**6 + Decimal("0.02")) * (100 + MARKUP) / 100
    )
    # a dry run under an override that prices searches at $8 per 1,000 instead of $10: 4 searches, $0.008 less
    price(session_factory, "claude-sonnet-4-6", input_mtok=Decimal(3), output_mtok=Decimal(15), id="s",
          cache_write_mtok=Decimal("3.75"), cache_write_1h_mtok=Decimal(6), web_search_per_k=Decimal(8))  # fmt: skip
    with session_factory() as session:
        plan = plan_rerate(session, start=datetime(2026, 11, 1, tzinfo=UTC), end=datetime(2026, 12, 1, tzinfo=UTC),
                           markup_pct=MARKUP)  # fmt: skip
    [change] = plan.diff.changes
    assert change.event.event_id == billed.event_id and change.cost_delta == -8_000_000
    checks_ok(session_factory)


def failed(i: int, status: str = "error", completeness: str = "reported", **overrides) -> UsageEvent:
    """A call that failed after the provider ran web searches for it: its usage reports them and no tokens."""
    error = {"error_type": "server_error"} if status == "error" else {}
    counts = {"input_tokens": 0, "output_tokens": 0, "cache_write_tokens": 0, "web_searches": 2, **overrides}
    return event(i, status=status, **error, stop_reason=None, usage_completeness=completeness, **counts)


def test_a_failed_call_whose_usage_reports_only_searches_is_billed_for_them(session_factory) -> None:
    """Policy A rule 2 made a failed call with 0 tokens not billable, so the searches the provider charged for it were
    billed $0. It is billed for what it reports (the searches); one whose usage is missing is still not billable.
    A replay posts nothing more; a re-rate moves it to the new search price."""
    error, cancelled = failed(0), failed(1, status="cancelled")
    missing = failed(2, completeness="missing")
    nothing = failed(3, web_searches=0)
    assert run(session_factory, [error, cancelled, missing, nothing]).inserted == 4
    searches = nanos(Decimal("0.02"))  # 2 searches at $10 per 1,000
    for e in (error, cancelled):
        stored = row(session_factory, e)
        assert (stored.billing_status, stored.cost_nanos) == ("billed", searches)
        assert stored.charge_nanos == searches * (100 + MARKUP) / 100
        charged = sorted((t.kind, t.amount_nanos) for t in transfers(session_factory, e))
        assert charged == [("provider_cost", searches), ("usage_charge", stored.charge_nanos)]
    for e in (missing, nothing):
        stored = row(session_factory, e)
        assert (stored.billing_status, stored.charge_nanos, transfers(session_factory, e)) == ("not_billable", 0, [])
    checks_ok(session_factory)
    again = run(session_factory, [error, cancelled, missing, nothing])  # a replay: duplicates, nothing posted
    assert (again.inserted, again.duplicates) == (0, 4)
    assert len(transfers(session_factory, error)) == 2
    price(session_factory, "claude-sonnet-4-6", input_mtok=Decimal(3), output_mtok=Decimal(15), id="searches-8",
          web_search_per_k=Decimal(8))  # fmt: skip
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    with session_factory() as session:
        result = apply_rerate(session, start=start, end=end, markup_pct=MARKUP, run_id="r1", now=NOW)
        session.commit()
    assert result.diff.examined == 2 and len(result.diff.changes) == 2
    for e in (error, cancelled):
        stored = row(session_factory, e)
        assert (stored.billing_status, stored.cost_nanos, stored.price_version) == (
            "billed",
            nanos(Decimal("0.016")),
            "searches-8",
        )
    checks_ok(session_factory)


def test_a_failed_call_with_only_searches_and_no_search_price_is_held_then_repriced(session_factory) -> None:
    held = failed(0, model="claude-3-haiku-20240307")
    assert run(session_factory, [held]).inserted == 1
    assert row(session_factory, held).billing_status == "unpriced"  # not not_billable: never billed $0
    price(session_factory, "claude-3-haiku*", input_mtok=Decimal("0.25"), output_mtok=Decimal("1.25"),
          web_search_per_k=Decimal("10"), id="haiku")  # fmt: skip
    with session_factory() as session:
        assert reprice_held(session, markup_pct=MARKUP, now=NOW).priced == 1
        session.commit()
    stored = row(session_factory, held)
    assert (stored.billing_status, stored.cost_nanos) == ("billed", nanos(Decimal("0.02")))
    checks_ok(session_factory)


def test_failed_calls_with_searches_stored_not_billable_are_named_by_check_and_decided_again_by_reprice(
    session_factory,
) -> None:
    """An earlier version stored a failed call whose usage reports only searches as not_billable: `metering billing
    check` names it, and reprice decides it again as ingest now does (billed, or held until its searches have a price).
    A second run changes nothing."""
    legacy, no_search_price = failed(0, web_searches=0), failed(1, web_searches=0, model="claude-3-haiku-20240307")
    assert run(session_factory, [legacy, no_search_price]).inserted == 2
    with session_factory() as session:  # as the earlier version stored them: their searches, not billable
        for e in (legacy, no_search_price):
            stored = session.get(UsageEventRow, e.event_id)
            assert stored is not None and stored.billing_status == "not_billable"
            stored.web_searches = 2
            searched = [0] * len(COUNTER_COLUMNS)  # the rollups counted them (0012)
            searched[COUNTER_COLUMNS.index("web_searches")] = 2
            store.upsert_rollups(session, {rollup_key(stored): searched})
        session.commit()
    with session_factory() as session:
        problems = run_checks(session).problems
    assert len(problems) == 2 and all("is not_billable, but Policy A bills" in p for p in problems)
    assert {str(legacy.event_id), str(no_search_price.event_id)} == {p.split()[1] for p in problems}
    with session_factory() as session:
        result = reprice_held(session, markup_pct=MARKUP, now=NOW)
        session.commit()
    assert (result.priced, result.still_unpriced, result.searches_redecided) == (1, 1, 2)
    searches = nanos(Decimal("0.02"))
    assert result.cost_nanos == searches
    stored = row(session_factory, legacy)
    assert (stored.billing_status, stored.cost_nanos, stored.invoice_period) == ("billed", searches, "2026-11")
    assert sorted(t.kind for t in transfers(session_factory, legacy)) == ["provider_cost", "usage_charge"]
    held = row(session_factory, no_search_price)
    assert (held.billing_status, held.price_source) == ("unpriced", None)
    assert transfers(session_factory, no_search_price) == []
    checks_ok(session_factory)  # the rollups' unpriced count and billed amounts moved with them
    with session_factory() as session:
        again = reprice_held(session, markup_pct=MARKUP, now=NOW)
        session.commit()
    assert (again.priced, again.still_unpriced, again.searches_redecided, again.charge_nanos) == (0, 1, 0, 0)
    price(session_factory, "claude-3-haiku*", input_mtok=Decimal("0.25"), output_mtok=Decimal("1.25"),
          web_search_per_k=Decimal("10"), id="haiku")  # fmt: skip
    with session_factory() as session:
        assert reprice_held(session, markup_pct=MARKUP, now=NOW).priced == 1
        session.commit()
    assert (row(session_factory, no_search_price).billing_status, row(session_factory, no_search_price).cost_nanos) == (
        "billed",
        searches,
    )
    checks_ok(session_factory)
