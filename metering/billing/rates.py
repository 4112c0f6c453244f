"""Rate cards: prices compiled to integers, so pricing an event on the ingest path costs a microsecond.

A ``RateCard`` holds, for one (provider, model, price period), the rate of each token kind in nano-USD
per million tokens, with genai-prices' input-size tiers, and the price of web searches in nano-USD per 1,000.
For a call, ``units`` = sum(tokens * rate) + searches * rate * 1,000 is an exact integer in 1e-15 USD; cost
and marked-up price are that integer divided once, half-even, to nanos: the same exact arithmetic as
``pricing.price_usage`` (which stays the reference, and the fallback for prices a card cannot express).
Pure: no I/O, no settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from genai_prices import data_snapshot
from genai_prices.types import ConditionalPrice, TieredPrices, TimeOfDateConstraint

from metering.billing.pricing import (
    SIMULATED,
    PriceBook,
    PriceOverride,
    Quote,
    genai_provider_for,
    genai_source_version,
    price_usage,
    select_override,
)

MTOK = 1_000_000
NANO = 10**9
TOKEN_KEYS = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "cache_write_1h_mtok")
PER_SEARCH_UNITS = MTOK // 1_000  # nano-USD per 1,000 searches -> 1e-15 USD per search

# A tiered rate: ((start, rate), ...) ascending; the rate of the highest start < input tokens applies
# (start -1 is the base rate). genai-prices: "crossing a tier applies that rate to ALL tokens".
Tiered = tuple[tuple[int, int], ...]


def div_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half to even, exactly (denominator > 0)."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def decimal_ratio(value: Decimal) -> tuple[int, int]:
    numerator, denominator = value.as_integer_ratio()
    return numerator, denominator


def rate_nanos_per_mtok(usd_per_mtok: Decimal) -> int:
    """$/Mtok as integer nano-USD per Mtok; a price finer than a nano per Mtok cannot be carded."""
    nanos = usd_per_mtok * NANO
    if nanos != nanos.to_integral_value():
        raise ValueError(f"price {usd_per_mtok} $/Mtok is finer than 1e-9 $/Mtok")
    return int(nanos)


def _tiered(rate: Tiered, input_tokens: int) -> int:
    applicable = rate[0][1]
    for start, value in rate[1:]:
        if input_tokens > start:
            applicable = value
        else:
            break
    return applicable


@dataclass(frozen=True, slots=True)
class RateCard:
    input: Tiered
    output: Tiered
    cache_read: Tiered | None  # None: cache reads are priced as input
    cache_write: Tiered | None  # None: cache writes are priced as input
    cache_write_1h: Tiered | None  # None: 1-hour cache writes are priced as cache writes
    web_search: int | None  # nano-USD per 1,000 searches; None: a call with searches has no price here
    markup_num: int  # markup percent as the fraction markup_num / markup_den
    markup_den: int
    markup_pct: Decimal
    source: str
    source_version: str
    matched_model: str | None

    def quote(
        self,
        input_tokens: int,
        output_tokens: int,
        cache_read: int,
        cache_write: int,
        cache_write_1h: int = 0,
        web_searches: int = 0,
    ) -> Quote:
        """The call's exact cost in 1e-15 USD (sum(tokens * nano-USD-per-Mtok) + the searches' price), divided once,
        half-even, to nanos, before and after markup. A card without a search price (``web_search`` None) cannot
        price a call with searches: ``RateCards.quote`` holds it."""
        rate_in = _tiered(self.input, input_tokens)
        rate_read = rate_in if self.cache_read is None else _tiered(self.cache_read, input_tokens)
        rate_write = rate_in if self.cache_write is None else _tiered(self.cache_write, input_tokens)
        units = (
            (input_tokens - cache_read - cache_write) * rate_in
            + cache_read * rate_read
            + cache_write * rate_write
            + output_tokens * _tiered(self.output, input_tokens)
        )
        if cache_write_1h:  # rare: priced as the difference from a 5-minute write
            rate_1h = rate_write if self.cache_write_1h is None else _tiered(self.cache_write_1h, input_tokens)
            units += cache_write_1h * (rate_1h - rate_write)
        if web_searches:
            if self.web_search is None:
                raise ValueError("this rate card has no price for web searches")
            units += web_searches * self.web_search * PER_SEARCH_UNITS
        cost = div_half_even(units, MTOK)
        scale = 100 * self.markup_den
        price = div_half_even(units * (scale + self.markup_num), MTOK * scale)
        return Quote(cost, price, self.markup_pct, self.source, self.source_version, self.matched_model)  # type: ignore[arg-type]


def _flat(value: Decimal) -> Tiered:
    return ((-1, rate_nanos_per_mtok(value)),)


def _card_rate(value: Any) -> Tiered | None:
    if value is None:
        return None
    if isinstance(value, TieredPrices):
        tiers = tuple((tier.start, rate_nanos_per_mtok(tier.price)) for tier in value.tiers)
        return ((-1, rate_nanos_per_mtok(value.base)), *tiers)
    if isinstance(value, Decimal):
        return _flat(value)
    raise TypeError(f"unsupported price {value!r}")


def override_card(override: PriceOverride, markup_pct: Decimal) -> RateCard:
    version = override.id or f"{override.provider}/{override.model_pattern}@{override.effective_from.isoformat()}"
    num, den = decimal_ratio(markup_pct)
    return RateCard(
        input=_flat(override.input_mtok),
        output=_flat(override.output_mtok),
        cache_read=None if override.cache_read_mtok is None else _flat(override.cache_read_mtok),
        cache_write=None if override.cache_write_mtok is None else _flat(override.cache_write_mtok),
        cache_write_1h=None if override.cache_write_1h_mtok is None else _flat(override.cache_write_1h_mtok),
        web_search=None if override.web_search_per_k is None else rate_nanos_per_mtok(override.web_search_per_k),
        markup_num=num,
        markup_den=den,
        markup_pct=markup_pct,
        source="override",
        source_version=version,
        matched_model=override.model_pattern,
    )


def genai_card(provider_id: str, model: str, at: datetime, markup_pct: Decimal) -> RateCard | None:
    """The genai-prices card at ``at``; None if the model is unknown or its prices need the slow path."""
    try:
        _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider_id, None)
    except LookupError:
        return None
    prices = info.get_prices(at)
    attrs = {k: v for k, v in vars(prices).items() if not k.startswith("_") and v is not None}
    # Prices of units a UsageEvent never counts (images, audio, other tool calls) add nothing.
    # A per-request fee does, and a missing token price must never become $0: both take the slow path.
    if "requests_kusd" in attrs or "input_mtok" not in attrs or "output_mtok" not in attrs:
        return None
    try:
        rates = {key: _card_rate(attrs.get(key)) for key in TOKEN_KEYS}
        search = attrs.get("web_searches_kcount")
        web_search = None if search is None else rate_nanos_per_mtok(search)  # a Decimal: nanos per 1,000
    except (TypeError, ValueError):
        return None
    num, den = decimal_ratio(markup_pct)
    return RateCard(
        input=rates["input_mtok"],  # type: ignore[arg-type]
        output=rates["output_mtok"],  # type: ignore[arg-type]
        cache_read=rates["cache_read_mtok"],
        cache_write=rates["cache_write_mtok"],
        cache_write_1h=rates["cache_write_1h_mtok"],
        web_search=web_search,
        markup_num=num,
        markup_den=den,
        markup_pct=markup_pct,
        source="genai-prices",
        source_version=genai_source_version(),
        matched_model=info.id,
    )


def _known(provider_id: str, model: str) -> bool:
    try:
        data_snapshot.get_snapshot().find_provider_model(model, None, provider_id, None)
    except LookupError:
        return False
    return True


def _time_of_day_priced(provider_id: str, model: str) -> bool:
    try:
        _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider_id, None)
    except LookupError:
        return False
    conditional = info.prices if isinstance(info.prices, list) else []
    return any(isinstance(c, ConditionalPrice) and isinstance(c.constraint, TimeOfDateConstraint) for c in conditional)


_UNKNOWN = object()


class RateCards:
    """Cards for one price book, cached per (provider, model, price period). Not thread-safe; one per batch
    or per ingesting thread. ``None`` results are cached too (unknown models stay unpriced)."""

    def __init__(self, book: PriceBook) -> None:
        self.book = book
        self._cards: dict[tuple[str, str, date | datetime], RateCard | None] = {}
        self._time_of_day: dict[tuple[str, str], bool] = {}
        self._has_overrides = bool(book.overrides)
        self._no_card: dict[tuple[str, str, date], bool] = {}  # True: nobody prices this model
        # (provider, model, day) -> card, for models priced the same all day when there are no overrides
        self._by_day: dict[tuple[str, str, date], RateCard | None] = {}

    def quote(
        self,
        provider: str,
        model: str,
        at: datetime,
        input_tokens: int,
        output_tokens: int,
        read: int,
        write: int,
        write_1h: int,
        web_searches: int,
    ) -> Quote | None:
        """The quote for one call: from a card when possible, else exactly the slow way; None if unpriced (a card
        without a search price does not price a call with searches: neither does the slow way)."""
        card = self.card(provider, model, at)
        if card is not None:
            if not web_searches or card.web_search is not None:
                return card.quote(input_tokens, output_tokens, read, write, write_1h, web_searches)
            return None
        key = (provider, model, at.date())
        if self._no_card.get(key):
            return None
        quote = price_usage(
            provider=provider,
            model=model,
            occurred_at=at,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=read,
            cache_write_tokens=write,
            cache_write_1h_tokens=write_1h,
            web_searches=web_searches,
            book=self.book,
        )
        if quote is None:
            real = genai_provider_for(provider, model)
            self._no_card[key] = real is None or not _known(real, model)  # cache only "nobody knows it"
        return quote

    def card(self, provider: str, model: str, at: datetime) -> RateCard | None:
        if not self._has_overrides:  # the hot path: one dict lookup per call
            day_key = (provider, model, at.date())
            card = self._by_day.get(day_key, _UNKNOWN)
            if card is not _UNKNOWN:
                return card  # type: ignore[return-value]
        real = genai_provider_for(provider, model)
        if self._has_overrides:
            # "Simulated" too (a quote; an event stored before provider names were lowercased), as ingest's "simulated"
            for candidate in (provider, real) if provider.lower() == SIMULATED and real else (provider,):
                override = select_override(self.book.overrides, provider=candidate, model=model, at=at)
                if override is not None:
                    markup = self.book.markup_pct if override.markup_pct is None else override.markup_pct
                    return override_card(override, markup)
        if real is None:
            if not self._has_overrides:
                self._by_day[(provider, model, at.date())] = None
            return None
        tod = self._time_of_day.get((real, model))
        if tod is None:
            tod = self._time_of_day[(real, model)] = _time_of_day_priced(real, model)
        key = (provider, model, at.replace(second=0, microsecond=0) if tod else at.date())
        try:
            card = self._cards[key]
        except KeyError:
            card = self._cards[key] = genai_card(real, model, at, self.book.markup_pct)
        if not tod and not self._has_overrides:
            self._by_day[key] = card  # type: ignore[index]
        return card
