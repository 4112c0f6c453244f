"""Pricing: a pure function of (usage, provider, model, event time, price book) -> Quote | None.

Admin overrides (effective-dated, per provider / model glob) win; otherwise genai-prices' bundled data at
the event time. ``None`` means no price is known: the caller holds the event as ``unpriced`` (an unknown model
is never priced at $0 silently). An explicit override at zero is a real price, and is returned as a Quote.

Token counts follow OpenTelemetry GenAI: ``input_tokens`` includes ``cache_read_tokens`` and
``cache_write_tokens``, and ``cache_write_tokens`` includes ``cache_write_1h_tokens``, which is also what
genai-prices' ``Usage`` expects (cache units are descendants of ``input_tokens``, 1-hour writes of cache writes,
each subtracted from its parent before the parent's rate applies), so counts are passed through as-is.
``web_searches`` are priced per 1,000. A call with web searches whose price source has no search price is
held as ``unpriced``, like a call whose model has no token price: its searches are never billed at $0.

Provider mapping to genai-prices: ``anthropic`` and ``openai`` map to themselves; ``openai_compatible`` (and any
other provider) has no genai-prices price, only overrides. ``simulated`` (the offline demo backend, serving the
platform's real model names) prices like the real provider behind the model name (``claude*`` -> anthropic,
``gpt-*`` / ``chatgpt*`` / ``o1``/``o3``/``o4`` -> openai): overrides for ``simulated`` are tried first, then
overrides for that real provider, then genai-prices.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Context, Decimal, localcontext
from typing import Literal

import genai_prices
from genai_prices.types import PriceCalculation

from metering.billing.money import format_usd, to_nanos

Source = Literal["override", "genai-prices"]

GENAI_PROVIDERS: dict[str, str] = {"anthropic": "anthropic", "openai": "openai"}
SIMULATED = "simulated"
SIMULATED_MODEL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("claude", "anthropic"),
    ("gpt-", "openai"),
    ("chatgpt", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
)
_MTOK = Decimal(1_000_000)
_THOUSAND = Decimal(1_000)
PRICE_FIELDS = (
    "input_mtok",
    "output_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
    "cache_write_1h_mtok",
    "web_search_per_k",
)
_HUNDRED = Decimal(100)
_CTX = Context(prec=60)
_GLOB_CHARS = frozenset("*?")
_NEVER = datetime.min.replace(tzinfo=UTC)  # the created_at of an override built in code, not read from a row


@functools.lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.compile("".join(parts), re.DOTALL)


def glob_match(pattern: str, name: str) -> bool:
    """Case-insensitive: ``*`` is any run of characters, ``?`` one; every other character (``[`` too) is itself."""
    return _glob_regex(pattern).fullmatch(name.lower()) is not None


def _check_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


def _check_markup(value: Decimal | None) -> None:
    if value is not None and not (isinstance(value, Decimal) and value.is_finite() and value >= -100):
        raise ValueError(f"markup_pct must be a finite Decimal >= -100 (got {value!r})")


def _check_price(name: str, value: Decimal | None) -> None:
    if value is not None and (not isinstance(value, Decimal) or not value.is_finite() or value < 0):
        raise ValueError(f"{name} must be a finite, non-negative Decimal (got {value!r})")


@dataclass(frozen=True)
class PriceOverride:
    """An admin price for (provider, model glob), valid in [effective_from, effective_to). USD per 1M tokens."""

    id: str | None
    provider: str
    model_pattern: str
    effective_from: datetime
    effective_to: datetime | None
    input_mtok: Decimal
    output_mtok: Decimal
    cache_read_mtok: Decimal | None = None  # None: cache reads cost the input price
    cache_write_mtok: Decimal | None = None  # None: cache writes cost the input price
    markup_pct: Decimal | None = None  # None: the price book's platform markup
    cache_write_1h_mtok: Decimal | None = None  # None: 1-hour cache writes cost the cache-write price
    web_search_per_k: Decimal | None = None  # USD per 1,000 web searches; None: a call with searches is unpriced
    created_at: datetime | None = None  # when it was added: of two alike from the same moment, the later one wins

    def __post_init__(self) -> None:
        if not self.provider or not self.model_pattern:
            raise ValueError("provider and model_pattern must be non-empty")
        _check_aware("effective_from", self.effective_from)
        if self.effective_to is not None:
            _check_aware("effective_to", self.effective_to)
            if self.effective_to <= self.effective_from:
                raise ValueError("effective_to must be after effective_from")
        for name in PRICE_FIELDS:
            _check_price(name, getattr(self, name))
        _check_markup(self.markup_pct)

    @property
    def is_exact(self) -> bool:
        return not _GLOB_CHARS & set(self.model_pattern)

    def active_at(self, at: datetime) -> bool:
        return self.effective_from <= at and (self.effective_to is None or at < self.effective_to)

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int,
        cache_write_tokens: int,
        cache_write_1h_tokens: int = 0,
        web_searches: int = 0,
    ) -> Decimal | None:
        """Exact USD cost (OTel counts: input includes both cache kinds, cache writes the 1-hour ones), not yet
        rounded to nanos; None when the call had web searches and this override has no price for them."""
        if web_searches and self.web_search_per_k is None:
            return None
        read_rate = self.input_mtok if self.cache_read_mtok is None else self.cache_read_mtok
        write_rate = self.input_mtok if self.cache_write_mtok is None else self.cache_write_mtok
        write_1h_rate = write_rate if self.cache_write_1h_mtok is None else self.cache_write_1h_mtok
        uncached = input_tokens - cache_read_tokens - cache_write_tokens
        with localcontext(_CTX):
            return (
                uncached * self.input_mtok
                + cache_read_tokens * read_rate
                + (cache_write_tokens - cache_write_1h_tokens) * write_rate
                + cache_write_1h_tokens * write_1h_rate
                + output_tokens * self.output_mtok
            ) / _MTOK + web_searches * (self.web_search_per_k or 0) / _THOUSAND

    def matches(self, provider: str, model: str) -> bool:
        return self.provider.lower() == provider.lower() and glob_match(self.model_pattern, model)


@dataclass(frozen=True)
class PriceBook:
    """Admin overrides plus the platform markup (percent: ``Decimal("20")`` charges cost x 1.2)."""

    overrides: tuple[PriceOverride, ...] = ()
    markup_pct: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        _check_markup(self.markup_pct)


@dataclass(frozen=True)
class Quote:
    cost_nanos: int  # provider cost, before markup
    price_nanos: int  # what the user is charged: cost x (1 + markup_pct / 100)
    markup_pct: Decimal
    source: Source
    source_version: str  # override id, or "genai-prices==<version> (<data snapshot>)"
    matched_model: str | None  # the override's model_pattern, or genai-prices' model id

    @property
    def markup_text(self) -> str:
        return str(self.markup_pct)


# No single LLM call costs this much; a quote above it comes from impossible token counts (or an absurd price).
# Ingest rejects such an event, re-rate refuses such a price, reprice keeps such an event held. Bounding each
# call keeps every sum of money (balances, rollups, invoices) far inside BIGINT: ~922,000 calls at the limit.
MAX_CALL_NANOS = 10_000 * 10**9  # $10,000


def over_call_limit(quote: Quote) -> str | None:
    """Why ``quote`` is beyond what one call can cost, or None when it is within ``MAX_CALL_NANOS``."""
    if quote.price_nanos <= MAX_CALL_NANOS and quote.cost_nanos <= MAX_CALL_NANOS:
        return None
    amount = max(quote.price_nanos, quote.cost_nanos)
    return (
        f"priced at {format_usd(amount)} for one call, above the limit of {format_usd(MAX_CALL_NANOS)} per call: "
        "check the event's token counts (and the price)"
    )


def select_override(
    overrides: Iterable[PriceOverride], *, provider: str, model: str, at: datetime
) -> PriceOverride | None:
    """The most specific override active at ``at``: exact pattern > longest glob > latest effective_from > added
    last (a price posted again to correct it; the larger id decided, a random one when generated) > larger id."""
    candidates = [o for o in overrides if o.active_at(at) and o.matches(provider, model)]
    if not candidates:
        return None
    return max(
        candidates,
        key=lambda o: (o.is_exact, len(o.model_pattern), o.effective_from, o.created_at or _NEVER, o.id or ""),
    )


def genai_provider_for(provider: str, model: str) -> str | None:
    """The genai-prices provider id for our provider name, or None when genai-prices must not be used."""
    provider = provider.lower()
    if provider == SIMULATED:
        name = model.lower()
        return next((real for prefix, real in SIMULATED_MODEL_PREFIXES if name.startswith(prefix)), None)
    return GENAI_PROVIDERS.get(provider)


def genai_source_version(calc: PriceCalculation | None = None) -> str:
    snapshot = "bundled data"
    if calc is not None and calc.auto_update_timestamp is not None:
        snapshot = f"data fetched {calc.auto_update_timestamp.isoformat()}"
    return f"genai-prices=={genai_prices.__version__} ({snapshot})"


def price_usage(
    *,
    provider: str,
    model: str,
    occurred_at: datetime,
    input_tokens: int,
    output_tokens: int,
    cache_read_tokens: int,
    cache_write_tokens: int,
    book: PriceBook,
    cache_write_1h_tokens: int = 0,
    web_searches: int = 0,
) -> Quote | None:
    """Price one call; None when no price is known (hold the event as ``unpriced``)."""
    _check_aware("occurred_at", occurred_at)
    if min(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, web_searches) < 0:
        raise ValueError("token counts must be >= 0")
    if cache_read_tokens + cache_write_tokens > input_tokens:
        raise ValueError("cache_read_tokens + cache_write_tokens must be within input_tokens (OTel semantics)")
    if cache_write_1h_tokens > cache_write_tokens:
        raise ValueError("cache_write_1h_tokens must be within cache_write_tokens")

    real = genai_provider_for(provider, model)
    providers = [provider] + ([real] if provider.lower() == SIMULATED and real else [])  # names are case-insensitive
    for candidate in providers:
        override = select_override(book.overrides, provider=candidate, model=model, at=occurred_at)
        if override is not None:
            cost = override.cost(
                input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, web_searches
            )
            if cost is None:
                return None  # the override has no price for the call's web searches
            markup = book.markup_pct if override.markup_pct is None else override.markup_pct
            version = (
                override.id or f"{override.provider}/{override.model_pattern}@{override.effective_from.isoformat()}"
            )
            return _quote(cost, markup, "override", version, override.model_pattern)

    if real is None:
        return None
    usage = genai_prices.Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read_tokens,
        cache_write_tokens=cache_write_tokens,
        cache_write_1h_tokens=cache_write_1h_tokens or None,
        web_searches=web_searches or None,
    )
    with localcontext(_CTX):
        try:
            calc = genai_prices.calc_price(usage, model, provider_id=real, genai_request_timestamp=occurred_at)
        except LookupError:
            return None
    prices = calc.model_price
    if (input_tokens and prices.input_mtok is None) or (output_tokens and prices.output_mtok is None):
        return None  # genai-prices knows the model but not a token price we used: never price it at $0
    if web_searches and prices.web_searches_kcount is None:
        return None  # nor its web searches
    return _quote(calc.total_price, book.markup_pct, "genai-prices", genai_source_version(calc), calc.model.id)


def _quote(cost: Decimal, markup_pct: Decimal, source: Source, version: str, matched: str | None) -> Quote:
    with localcontext(_CTX):
        price = cost * (1 + markup_pct / _HUNDRED)
    return Quote(
        cost_nanos=to_nanos(cost),
        price_nanos=to_nanos(price),
        markup_pct=markup_pct,
        source=source,
        source_version=version,
        matched_model=matched,
    )
