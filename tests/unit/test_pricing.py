"""Pricing: overrides, genai-prices at the event time, markup, and never $0 for an unknown model.

Pinned genai-prices numbers come from its bundled data (0.2.x): claude-sonnet-4-6 costs $3 input / $15 output /
$0.30 cache read / $3.75 cache write per MTok from 2026-03-13, and before that had a >200k-input-token tier at
$6 / $22.50 / $0.60 / $7.50; gpt-4o costs $2.50 input / $10 output / $1.25 cache read per MTok.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import genai_prices
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.billing.pricing import (
    MAX_CALL_NANOS,
    PriceBook,
    PriceOverride,
    Quote,
    genai_provider_for,
    glob_match,
    over_call_limit,
    price_usage,
    select_override,
)

AFTER = datetime(2026, 4, 1, 12, tzinfo=UTC)  # flat claude-sonnet-4-6 prices
BEFORE = datetime(2026, 1, 15, 12, tzinfo=UTC)  # tiered claude-sonnet-4-6 prices
T0 = datetime(2026, 1, 1, tzinfo=UTC)
BOOK = PriceBook()
GENAI_VERSION = f"genai-prices=={genai_prices.__version__} (bundled data)"


def _price(provider="anthropic", model="claude-sonnet-4-6", at=AFTER, book=BOOK, i=0, o=0, cr=0, cw=0):
    return price_usage(
        provider=provider,
        model=model,
        occurred_at=at,
        input_tokens=i,
        output_tokens=o,
        cache_read_tokens=cr,
        cache_write_tokens=cw,
        book=book,
    )


def _override(pattern="llama*", provider="ollama", **kw):
    base = dict(
        id="ov-1",
        provider=provider,
        model_pattern=pattern,
        effective_from=T0,
        effective_to=None,
        input_mtok=Decimal("1"),
        output_mtok=Decimal("2"),
    )
    base.update(kw)
    return PriceOverride(**base)


# --- genai-prices -------------------------------------------------------------------------------


def test_claude_sonnet_one_million_input_tokens():
    assert _price(i=1_000_000) == Quote(
        cost_nanos=3_000_000_000,
        price_nanos=3_000_000_000,
        markup_pct=Decimal(0),
        source="genai-prices",
        source_version=GENAI_VERSION,
        matched_model="claude-sonnet-4-6",
    )


def test_genai_prices_looked_up_at_event_time_with_tiers():
    assert _price(at=BEFORE, i=1_000_000).cost_nanos == 6_000_000_000  # historical >200k tier: $6/MTok
    assert _price(at=BEFORE, i=199_999).cost_nanos == 599_997_000  # below the tier: $3/MTok
    assert _price(at=BEFORE, i=200_001).cost_nanos == 1_200_006_000  # cliff: all tokens at $6/MTok
    assert _price(at=AFTER, i=200_001).cost_nanos == 600_003_000


def test_cache_tokens_priced_at_their_own_rates():
    # 1M input of which 400k cache read and 100k cache write: 500k x $3 + 400k x $0.30 + 100k x $3.75 = $1.995
    # plus 10k output x $15 = $0.15.
    quote = _price(i=1_000_000, cr=400_000, cw=100_000, o=10_000)
    assert quote is not None
    assert quote.cost_nanos == 2_145_000_000
    assert _price(i=1_000_000, cr=1_000_000).cost_nanos == 300_000_000
    assert _price(i=1_000_000, cw=1_000_000).cost_nanos == 3_750_000_000
    assert _price(o=1_000_000).cost_nanos == 15_000_000_000


def test_markup_on_genai_prices():
    quote = _price(i=1_000_000, cr=400_000, cw=100_000, o=10_000, book=PriceBook(markup_pct=Decimal("20")))
    assert (quote.cost_nanos, quote.price_nanos, quote.markup_pct) == (2_145_000_000, 2_574_000_000, Decimal("20"))


def test_openai_gpt_4o():
    assert _price("openai", "gpt-4o", i=1_000_000).cost_nanos == 2_500_000_000
    assert _price("openai", "gpt-4o", i=1_000_000, cr=1_000_000).cost_nanos == 1_250_000_000
    # gpt-4o has no cache-write price in genai-prices: those tokens cost the input rate
    assert _price("openai", "gpt-4o", i=1_000_000, cw=1_000_000).cost_nanos == 2_500_000_000
    assert _price("openai", "gpt-4o", o=1_000_000).matched_model == "gpt-4o"


def test_simulated_prices_like_the_real_provider():
    assert _price("simulated", "claude-sonnet-4-6", i=1_000, o=500) == _price(
        "anthropic", "claude-sonnet-4-6", i=1_000, o=500
    )
    assert _price("simulated", "gpt-4o", i=1_000_000).cost_nanos == 2_500_000_000
    assert genai_provider_for("simulated", "Claude-Haiku-4-5") == "anthropic"
    assert genai_provider_for("simulated", "llama3") is None
    assert genai_provider_for("openai_compatible", "gpt-4o") is None


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "nonexistent-model-x"),
        ("anthropic", "not-a-claude"),
        ("openai_compatible", "llama3"),
        ("openai_compatible", "gpt-4o"),  # no genai-prices price for an arbitrary endpoint
        ("simulated", "mystery-model"),
        ("ollama", "llama3"),
    ],
)
def test_unknown_model_is_none_not_zero(provider, model):
    assert _price(provider, model, i=1_000, o=100) is None


def test_known_model_without_a_token_price_is_none_not_zero():
    # text-embedding-3-small has an input price only; whisper-1 is priced per audio hour.
    assert _price("openai", "text-embedding-3-small", i=1_000_000).cost_nanos == 20_000_000
    assert _price("openai", "text-embedding-3-small", i=1_000, o=10) is None
    assert _price("openai", "whisper-1", i=1_000) is None


# --- overrides ----------------------------------------------------------------------------------


def test_zero_override_is_a_real_price_not_none():
    book = PriceBook(overrides=(_override(input_mtok=Decimal(0), output_mtok=Decimal(0)),), markup_pct=Decimal("20"))
    quote = _price("ollama", "llama3.1:8b", book=book, i=5_000, o=1_000)
    assert quote == Quote(0, 0, Decimal("20"), "override", "ov-1", "llama*")


def test_override_arithmetic_and_cache_fallback_to_input_price():
    ov = _override(input_mtok=Decimal("0.80"), output_mtok=Decimal("4"))
    # cache prices None -> input price: 1M input (any split) x $0.80 + 250k output x $4 = $1.80
    for cr, cw in [(0, 0), (600_000, 0), (0, 300_000), (500_000, 500_000)]:
        assert _price("ollama", "llama3", book=PriceBook((ov,)), i=1_000_000, cr=cr, cw=cw, o=250_000).cost_nanos == (
            1_800_000_000
        )
    ov2 = _override(
        input_mtok=Decimal("1"),
        output_mtok=Decimal("2"),
        cache_read_mtok=Decimal("0.1"),
        cache_write_mtok=Decimal("1.25"),
    )
    # 400k uncached x $1 + 400k read x $0.10 + 200k write x $1.25 = $0.69
    assert (
        _price("ollama", "llama3", book=PriceBook((ov2,)), i=1_000_000, cr=400_000, cw=200_000).cost_nanos
        == 690_000_000
    )


def test_override_beats_genai_prices_and_has_its_own_markup():
    ov = _override(
        "claude-sonnet-4-6", provider="anthropic", id="promo", input_mtok=Decimal("2"), markup_pct=Decimal("0")
    )
    quote = _price(book=PriceBook((ov,), markup_pct=Decimal("50")), i=1_000_000)
    assert (quote.source, quote.source_version, quote.cost_nanos, quote.price_nanos) == (
        "override",
        "promo",
        2_000_000_000,
        2_000_000_000,
    )
    assert _price(book=PriceBook((), markup_pct=Decimal("50")), i=1_000_000).price_nanos == 4_500_000_000


def test_override_without_id_records_a_stable_version():
    quote = _price("ollama", "llama3", book=PriceBook((_override(id=None),)), i=1)
    assert quote.source_version == "ollama/llama*@2026-01-01T00:00:00+00:00"


def test_override_effective_window_is_half_open():
    start, end = datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)
    book = PriceBook((_override(effective_from=start, effective_to=end),))
    assert _price("ollama", "llama3", at=start - timedelta(microseconds=1), book=book, i=1_000_000) is None
    assert _price("ollama", "llama3", at=start, book=book, i=1_000_000).cost_nanos == 1_000_000_000
    assert _price("ollama", "llama3", at=end - timedelta(microseconds=1), book=book, i=1_000_000) is not None
    assert _price("ollama", "llama3", at=end, book=book, i=1_000_000) is None


def test_expired_override_falls_back_to_genai_prices():
    ov = _override(
        "claude-*", provider="anthropic", input_mtok=Decimal("9"), effective_to=datetime(2026, 2, 1, tzinfo=UTC)
    )
    book = PriceBook((ov,))
    assert _price(at=datetime(2026, 1, 20, tzinfo=UTC), book=book, i=100_000).source == "override"
    quote = _price(at=AFTER, book=book, i=100_000)
    assert (quote.source, quote.cost_nanos) == ("genai-prices", 300_000_000)


def test_specificity_exact_then_longest_glob_then_latest():
    star = _override("*", id="star")
    llama = _override("llama*", id="llama")
    llama3 = _override("llama3*", id="llama3")
    exact = _override("llama3.1", id="exact")
    newer_star = _override("*", id="newer-star", effective_from=T0 + timedelta(days=1))
    all_ = (star, newer_star, exact, llama, llama3)
    at = AFTER
    assert select_override(all_, provider="ollama", model="llama3.1", at=at) is exact
    assert select_override(all_, provider="ollama", model="llama3.2", at=at) is llama3
    assert select_override(all_, provider="ollama", model="llama2", at=at) is llama
    assert select_override(all_, provider="ollama", model="mistral", at=at) is newer_star
    assert select_override(all_, provider="other", model="llama3.1", at=at) is None
    # a newer, less specific override does not beat an older exact one
    newer_glob = _override("llama3.*", id="newer-glob", effective_from=T0 + timedelta(days=30))
    assert select_override((exact, newer_glob), provider="ollama", model="llama3.1", at=at) is exact
    # exact beats a longer glob
    longer_glob = _override("llama3.1*", id="longer-glob")
    assert select_override((longer_glob, exact), provider="ollama", model="llama3.1", at=at) is exact
    # matching is case-insensitive
    assert select_override(all_, provider="Ollama", model="LLAMA3.1", at=at) is exact


def test_simulated_uses_real_provider_overrides_after_its_own():
    anth = _override("claude-*", provider="anthropic", id="anth", input_mtok=Decimal("1"))
    sim = _override("claude-*", provider="simulated", id="sim", input_mtok=Decimal(0))
    assert _price("simulated", "claude-sonnet-4-6", book=PriceBook((anth,)), i=1_000_000).source_version == "anth"
    assert _price("simulated", "claude-sonnet-4-6", book=PriceBook((anth, sim)), i=1_000_000).source_version == "sim"


def test_decimal_converted_to_nanos_once():
    # each part is half a nano: rounding per part would give 0, rounding the sum gives 1
    ov = _override(input_mtok=Decimal("0.0005"), output_mtok=Decimal("0.0005"))
    assert _price("ollama", "llama3", book=PriceBook((ov,)), i=1, o=1).cost_nanos == 1
    assert _price("ollama", "llama3", book=PriceBook((ov,)), i=1).cost_nanos == 0  # 0.5 -> 0 (half-even)


def test_markup_rounds_half_even_once():
    ov = _override(input_mtok=Decimal("3"), output_mtok=Decimal("3"))
    quote = _price("ollama", "llama3", book=PriceBook((ov,), markup_pct=Decimal("33.3333")), i=1)
    assert (quote.cost_nanos, quote.price_nanos) == (3_000, 4_000)  # 3000 x 1.333333 = 3999.999
    discount = _price("ollama", "llama3", book=PriceBook((ov,), markup_pct=Decimal("-100")), i=1_000)
    assert (discount.cost_nanos, discount.price_nanos) == (3_000_000, 0)


def test_validation():
    with pytest.raises(ValueError, match="timezone"):
        _price(at=datetime(2026, 4, 1), i=1)
    with pytest.raises(ValueError, match="within input_tokens"):
        _price(i=10, cr=6, cw=5)
    with pytest.raises(ValueError):
        _price(i=-1)
    with pytest.raises(ValueError):
        _override(effective_from=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        _override(effective_to=T0)
    with pytest.raises(ValueError):
        _override(input_mtok=Decimal("-1"))
    with pytest.raises(ValueError):
        PriceBook(markup_pct=Decimal("-101"))


# --- properties ---------------------------------------------------------------------------------

COUNTS = st.integers(min_value=0, max_value=2_000_000)
MARKUPS = st.decimals(min_value=0, max_value=500, places=4)
OVERRIDE_BOOK = (
    _override(
        "*",
        input_mtok=Decimal("1.1"),
        output_mtok=Decimal("4.4"),
        cache_read_mtok=Decimal("0.55"),
        cache_write_mtok=Decimal("1.375"),
    ),
)
TARGETS = st.sampled_from(
    [
        ("anthropic", "claude-sonnet-4-6", BEFORE),  # tiered
        ("anthropic", "claude-sonnet-4-6", AFTER),
        ("openai", "gpt-4o-mini", AFTER),
        ("ollama", "llama3", AFTER),  # override
    ]
)


def _parts_price(target, markup, uncached, cr, cw, o):
    provider, model, at = target
    book = PriceBook(OVERRIDE_BOOK, markup_pct=markup)
    return _price(provider, model, at=at, book=book, i=uncached + cr + cw, cr=cr, cw=cw, o=o)


@settings(max_examples=200, deadline=None)
@given(TARGETS, MARKUPS, COUNTS, COUNTS, COUNTS, COUNTS, st.integers(0, 3), st.integers(1, 500_000))
def test_price_is_monotone_in_each_token_count(target, markup, uncached, cr, cw, o, which, extra):
    parts = [uncached, cr, cw, o]
    before = _parts_price(target, markup, *parts)
    parts[which] += extra
    after = _parts_price(target, markup, *parts)
    assert after.price_nanos >= before.price_nanos
    assert after.cost_nanos >= before.cost_nanos


@settings(max_examples=200, deadline=None)
@given(TARGETS, COUNTS, COUNTS, COUNTS, COUNTS)
def test_charge_equals_cost_without_markup(target, uncached, cr, cw, o):
    quote = _parts_price(target, Decimal(0), uncached, cr, cw, o)
    assert quote.price_nanos == quote.cost_nanos


@settings(max_examples=200, deadline=None)
@given(TARGETS, MARKUPS, COUNTS, COUNTS, COUNTS, COUNTS)
def test_markup_never_lowers_the_price(target, markup, uncached, cr, cw, o):
    quote = _parts_price(target, markup, uncached, cr, cw, o)
    assert quote.price_nanos >= quote.cost_nanos >= 0


def test_the_per_call_limit_is_inclusive_and_checks_price_and_cost() -> None:
    def quote(cost: int, price: int) -> Quote:
        return Quote(cost, price, Decimal(20), "genai-prices", "v", None)

    assert MAX_CALL_NANOS == 10_000 * 10**9
    assert over_call_limit(quote(MAX_CALL_NANOS, MAX_CALL_NANOS)) is None
    assert "$10,000.000000001 for one call" in (over_call_limit(quote(1, MAX_CALL_NANOS + 1)) or "")
    assert "$12,000.00 for one call" in (over_call_limit(quote(12 * 10**12, 0)) or "")  # the cost alone is over


def test_provider_names_are_looked_up_case_insensitively():
    assert genai_provider_for("Anthropic", "claude-sonnet-4-6") == "anthropic"
    assert genai_provider_for("SIMULATED", "gpt-4o") == "openai"
    assert _price(provider="Anthropic", i=1000) == _price(provider="anthropic", i=1000) is not None


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [("foo[1]", "foo[1]", True), ("foo[1]", "foo1", False), ("llama*", "LLAMA3.1", True), ("gpt-4?", "gpt-4o", True),
     ("gpt-4?", "gpt-4o-mini", False), ("a.b", "axb", False), ("*", "", True), ("x*", "x\ny", True)],
)  # fmt: skip
def test_model_globs_have_only_star_and_question_mark(pattern, name, expected):
    assert glob_match(pattern, name) is expected


def test_a_model_name_with_brackets_can_be_overridden_exactly():
    exact = _override("foo[1]", provider="local", id="exact")
    assert exact.is_exact and exact.matches("local", "foo[1]") and not exact.matches("local", "foo1")
    book = PriceBook(overrides=(exact,))
    assert _price(provider="local", model="foo[1]", book=book, i=1_000_000) is not None
    assert _price(provider="local", model="foo1", book=book, i=1_000_000) is None
