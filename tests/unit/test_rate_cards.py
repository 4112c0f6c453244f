"""Rate cards price exactly like the reference ``price_usage`` (genai-prices / overrides, Decimal)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from genai_prices import data_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.billing.pricing import PriceBook, PriceOverride, price_usage
from metering.billing.rates import RateCards, div_half_even

T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def _models(provider_id: str) -> list[str]:
    snapshot = data_snapshot.get_snapshot()
    provider = next(p for p in snapshot.providers if p.id == provider_id)
    return [m.id for m in provider.models]


MODELS = [("anthropic", m) for m in _models("anthropic")] + [("openai", m) for m in _models("openai")]
MODELS += [("simulated", "claude-sonnet-4-6"), ("simulated", "gpt-4o-mini"), ("ollama", "llama3.1")]


@st.composite
def usages(draw: st.DrawFn) -> tuple[int, int, int, int, int, int]:
    """(input, output, cache read, cache write, of which 1-hour writes, web searches)."""
    inp = draw(st.integers(0, 600_000))
    read = draw(st.integers(0, inp))
    write = draw(st.integers(0, inp - read))
    write_1h = draw(st.one_of(st.just(0), st.integers(0, write)))
    searches = draw(st.one_of(st.just(0), st.integers(0, 50)))
    return inp, draw(st.integers(0, 100_000)), read, write, write_1h, searches


def _reference(provider: str, model: str, at: datetime, usage: tuple[int, ...], book: PriceBook):
    return price_usage(
        provider=provider,
        model=model,
        occurred_at=at,
        input_tokens=usage[0],
        output_tokens=usage[1],
        cache_read_tokens=usage[2],
        cache_write_tokens=usage[3],
        cache_write_1h_tokens=usage[4],
        web_searches=usage[5],
        book=book,
    )


def test_div_half_even() -> None:
    assert [div_half_even(n, 10) for n in (14, 15, 16, 25, 35, -15)] == [1, 2, 2, 2, 4, -2]


@settings(max_examples=400, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    usage=usages(),
    days=st.integers(-400, 400),
    minutes=st.integers(0, 1439),
    markup=st.sampled_from([Decimal(0), Decimal(20), Decimal("33.3333"), Decimal("-10")]),
)
def test_cards_agree_with_the_reference_pricing(model, usage, days, minutes, markup) -> None:
    provider, name = model
    at = T0 + timedelta(days=days, minutes=minutes)
    book = PriceBook(markup_pct=markup)
    reference = _reference(provider, name, at, usage, book)
    cards = RateCards(book)
    assert cards.quote(provider, name, at, *usage) == reference  # a card's, or the slow way's
    card = cards.card(provider, name, at)
    if card is None:
        return  # the ingest path falls back to price_usage itself for these
    if usage[5] and card.web_search is None:
        assert reference is None  # searches without a search price: held, never billed $0 for them
        return
    assert reference is not None
    assert card.quote(*usage) == reference


def test_most_catalogue_models_get_a_card() -> None:
    cards = RateCards(PriceBook())
    carded = [m for m in MODELS if cards.card(m[0], m[1], T0) is not None]
    assert len(carded) >= 0.6 * len(MODELS)
    assert cards.card("anthropic", "claude-sonnet-4-6", T0) is not None
    assert cards.card("ollama", "llama3.1", T0) is None  # unknown: held as unpriced, never $0


@settings(max_examples=200, deadline=None)
@given(
    usage=usages(),
    markup=st.sampled_from([None, Decimal(0), Decimal("12.5")]),
    write_1h=st.sampled_from([None, Decimal(0), Decimal("5.000000001")]),
    search=st.sampled_from([None, Decimal(0), Decimal("9.5")]),
)
def test_override_cards_agree_with_the_reference(usage, markup, write_1h, search) -> None:
    override = PriceOverride(
        id="neg-1",
        provider="anthropic",
        model_pattern="claude-*",
        effective_from=T0 - timedelta(days=1),
        effective_to=T0 + timedelta(days=1),
        input_mtok=Decimal("2.5"),
        output_mtok=Decimal("12.125"),
        cache_read_mtok=Decimal("0.25"),
        cache_write_mtok=None,
        markup_pct=markup,
        cache_write_1h_mtok=write_1h,
        web_search_per_k=search,
    )
    book = PriceBook(overrides=(override,), markup_pct=Decimal(20))
    reference = _reference("anthropic", "claude-sonnet-4-6", T0, usage, book)
    cards = RateCards(book)
    assert cards.quote("anthropic", "claude-sonnet-4-6", T0, *usage) == reference
    card = cards.card("anthropic", "claude-sonnet-4-6", T0)
    assert card is not None and card.source == "override"
    if usage[5] and search is None:
        assert reference is None  # the override has no search price: held, never billed $0 for them
    else:
        assert card.quote(*usage) == reference


def test_one_hour_cache_writes_and_web_searches_are_priced() -> None:
    """Anthropic (genai-prices): a 1-hour cache write costs $6/Mtok, a 5-minute one $3.75, input $3, and a web
    search $10 per 1,000; before, 1-hour writes were priced as 5-minute ones and searches as nothing."""
    cards = RateCards(PriceBook())
    base = cards.quote("anthropic", "claude-sonnet-4-6", T0, 100_000, 0, 0, 100_000, 0, 0)
    one_hour = cards.quote("anthropic", "claude-sonnet-4-6", T0, 100_000, 0, 0, 100_000, 100_000, 0)
    searches = cards.quote("anthropic", "claude-sonnet-4-6", T0, 0, 0, 0, 0, 0, 3)
    assert base is not None and one_hour is not None and searches is not None
    assert (base.cost_nanos, one_hour.cost_nanos, searches.cost_nanos) == (375_000_000, 600_000_000, 30_000_000)
    # a model genai-prices knows without a search price: a call with searches is held (None), not billed $0 for them
    assert cards.quote("anthropic", "claude-3-haiku-20240307", T0, 1_000, 10, 0, 0, 0, 2) is None
    assert cards.quote("anthropic", "claude-3-haiku-20240307", T0, 1_000, 10, 0, 0, 0, 0) is not None
