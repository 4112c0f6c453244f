"""Response bodies of the read side (usage, ledger, invoices, held events, quotes).

Money is given twice: integer nano-USD (``*_nanos``, exact) and an exact decimal USD string with 9
decimals (``*_usd``, e.g. ``"0.001620000"``); never a float.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime

from pydantic import BaseModel, ConfigDict, Field

from metering.billing.export import usd
from metering.billing.invoices import Invoice, InvoiceLine
from metering.billing.ledger_queries import Page
from metering.billing.pricing import Quote
from metering.billing.usage_queries import UsageGroup, UsageTotals
from metering.db.models import AccountRow, TransferRow, UsageEventRow

USD = "Exact decimal USD, 9 decimals (a string, never a float)."

# -- usage ----------------------------------------------------------------------------------------


class UsageCounters(BaseModel):
    calls: int = Field(description="Provider calls.")
    input_tokens: int = Field(description="Input tokens (including cache reads and writes).")
    output_tokens: int = Field(description="Output tokens (including reasoning).")
    cache_read_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int = Field(description="Of the cache writes, those kept for an hour.")
    reasoning_tokens: int
    web_searches: int = Field(description="Web searches the provider ran (charged per search, on top of tokens).")
    billed_nanos: int = Field(description="Charged to users (marked-up price), nano-USD. BYOLLM calls add nothing.")
    billed_usd: str = Field(description=USD)
    shadow_nanos: int = Field(description="What BYOLLM calls would have been charged (never billed), nano-USD.")
    shadow_usd: str = Field(description=USD)
    cost_nanos: int = Field(description="Provider cost before markup, nano-USD.")
    cost_usd: str = Field(description=USD)
    errors: int = Field(description="Calls that ended in an error.")
    unpriced: int = Field(description="Calls held without a price.")
    avg_latency_ms: float | None = Field(description="Mean call latency, ms (null without calls).")

    @classmethod
    def counters(cls, t: UsageTotals) -> dict[str, object]:
        return {
            "calls": t.calls,
            "input_tokens": t.input_tokens,
            "output_tokens": t.output_tokens,
            "cache_read_tokens": t.cache_read_tokens,
            "cache_write_tokens": t.cache_write_tokens,
            "cache_write_1h_tokens": t.cache_write_1h_tokens,
            "reasoning_tokens": t.reasoning_tokens,
            "web_searches": t.web_searches,
            "billed_nanos": t.billed_nanos,
            "billed_usd": usd(t.billed_nanos),
            "shadow_nanos": t.shadow_nanos,
            "shadow_usd": usd(t.shadow_nanos),
            "cost_nanos": t.cost_nanos,
            "cost_usd": usd(t.cost_nanos),
            "errors": t.errors,
            "unpriced": t.unpriced,
            "avg_latency_ms": t.avg_latency_ms,
        }

    @classmethod
    def of(cls, t: UsageTotals) -> UsageCounters:
        return cls.model_validate(cls.counters(t))


class UsageRow(UsageCounters):
    """One group: the values of the `group_by` dimensions (the others are null) and its sums."""

    tenant_id: str | None = None
    user_id: str | None = None
    extension_id: str | None = None
    function: str | None = None
    purpose: str | None = None
    provider: str | None = None
    model: str | None = None
    byollm: bool | None = None
    status: str | None = None
    hour: datetime | None = Field(None, description="The UTC hour (group `hour`).")
    day: date | None = Field(None, description="The UTC date (group `day`).")

    @classmethod
    def of_group(cls, group: UsageGroup) -> UsageRow:
        return cls.model_validate(group.key | cls.counters(group.totals))


class UsageResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    start: datetime = Field(alias="from", description="Start of the window (inclusive), UTC.")
    end: datetime = Field(alias="to", description="End of the window (exclusive), UTC.")
    group_by: list[str] = Field(description="The dimensions grouped by, in request order.")
    rows: list[UsageRow] = Field(description="One row per group with usage, ordered by the group values.")
    totals: UsageCounters = Field(description="The sums over every row.")


# -- ledger ---------------------------------------------------------------------------------------


class TransferOut(BaseModel):
    id: uuid.UUID
    created_at: datetime
    kind: str = Field(description="usage_charge | provider_cost | credit | adjustment | reversal")
    debit_account_id: str
    credit_account_id: str
    amount_nanos: int = Field(description="Always > 0, nano-USD.")
    amount_usd: str = Field(description=USD)
    currency: str
    event_id: uuid.UUID | None = Field(description="The usage event that caused it, if any.")
    reverses_id: uuid.UUID | None = Field(description="The transfer it reverses, for a reversal.")
    idempotency_key: str | None
    period: str | None = Field(description="The billing period (YYYY-MM) of a usage transfer.")
    memo: str | None

    @classmethod
    def of(cls, t: TransferRow) -> TransferOut:
        return cls(
            id=t.id,
            created_at=t.created_at,
            kind=t.kind,
            debit_account_id=t.debit_account_id,
            credit_account_id=t.credit_account_id,
            amount_nanos=t.amount_nanos,
            amount_usd=usd(t.amount_nanos),
            currency=t.currency,
            event_id=t.event_id,
            reverses_id=t.reverses_id,
            idempotency_key=t.idempotency_key,
            period=t.period,
            memo=t.memo,
        )


class TransferPage(BaseModel):
    items: list[TransferOut] = Field(description="Transfers in posting order (created_at, id).")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")

    @classmethod
    def of(cls, page: Page[TransferRow]) -> TransferPage:
        return cls(items=[TransferOut.of(t) for t in page.items], next_cursor=page.next_cursor)


class Balance(BaseModel):
    account_id: str
    kind: str = Field(description="user_wallet | platform_revenue | provider_cost | provider_payable | ...")
    tenant_id: str | None
    user_id: str | None
    currency: str
    balance_nanos: int = Field(description="Credits minus debits, nano-USD (a user's usage makes it negative).")
    balance_usd: str = Field(description=USD)

    @classmethod
    def of(cls, a: AccountRow) -> Balance:
        return cls(
            account_id=a.id,
            kind=a.kind,
            tenant_id=a.tenant_id,
            user_id=a.user_id,
            currency=a.currency,
            balance_nanos=a.balance_nanos,
            balance_usd=usd(a.balance_nanos),
        )


class Balances(BaseModel):
    accounts: list[Balance] = Field(description="By account id.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


# -- invoices -------------------------------------------------------------------------------------


class InvoiceLineOut(BaseModel):
    extension_id: str
    model: str
    is_late: bool = Field(description="An event of an already finalized month, billed in this one.")
    correction_of: str | None = Field(
        description="A re-rate correction of calls billed on this earlier (finalized) month's invoice: calls 0, "
        "the net change (may be negative). Null for usage lines."
    )
    calls: int
    billed_nanos: int
    billed_usd: str = Field(description=USD)

    @classmethod
    def of(cls, line: InvoiceLine) -> InvoiceLineOut:
        return cls(
            extension_id=line.extension_id,
            model=line.model,
            is_late=line.is_late,
            correction_of=line.correction_of,
            calls=line.calls,
            billed_nanos=line.billed_nanos,
            billed_usd=usd(line.billed_nanos),
        )


class InvoiceSummary(BaseModel):
    tenant_id: str
    user_id: str
    period: str = Field(description="The calendar month, UTC: YYYY-MM.")
    status: str = Field(description="draft (computed now from billed events) | finalized (never changes)")
    currency: str = "USD"
    calls: int
    total_nanos: int = Field(description="The exact sum of the lines.")
    total_usd: str = Field(description=USD)
    rounded_nanos: int = Field(description="The total rounded once, half-even, to cents.")
    rounded_usd: str = Field(description=USD)
    residue_nanos: int = Field(description="total - rounded: the rounding residue.")
    residue_usd: str = Field(description=USD)
    finalized_at: datetime | None

    @classmethod
    def fields_of(cls, invoice: Invoice) -> dict[str, object]:
        return {
            "tenant_id": invoice.tenant_id,
            "user_id": invoice.user_id,
            "period": invoice.period,
            "status": invoice.status,
            "calls": invoice.calls,
            "total_nanos": invoice.total_nanos,
            "total_usd": usd(invoice.total_nanos),
            "rounded_nanos": invoice.rounded_nanos,
            "rounded_usd": usd(invoice.rounded_nanos),
            "residue_nanos": invoice.residue_nanos,
            "residue_usd": usd(invoice.residue_nanos),
            "finalized_at": invoice.finalized_at,
        }

    @classmethod
    def of(cls, invoice: Invoice) -> InvoiceSummary:
        return cls.model_validate(cls.fields_of(invoice))


class InvoiceDetail(InvoiceSummary):
    lines: list[InvoiceLineOut] = Field(description="Per (extension, model, late): regular lines first.")

    @classmethod
    def of(cls, invoice: Invoice) -> InvoiceDetail:
        lines = [InvoiceLineOut.of(line) for line in invoice.lines]
        return cls.model_validate(cls.fields_of(invoice) | {"lines": lines})


class Invoices(BaseModel):
    invoices: list[InvoiceSummary] = Field(description="By period, tenant, user (ids by code point).")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


# -- held events ----------------------------------------------------------------------------------


class UnpricedEvent(BaseModel):
    event_id: uuid.UUID
    occurred_at: datetime
    tenant_id: str
    user_id: str
    extension_id: str
    function: str
    purpose: str
    provider: str
    model: str
    status: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int = Field(description="Of the cache writes, those kept for an hour.")
    reasoning_tokens: int
    web_searches: int = Field(
        description="Web searches the provider ran: an event with searches is held while its price has none for them."
    )
    latency_ms: float

    @classmethod
    def of(cls, e: UsageEventRow) -> UnpricedEvent:
        return cls.model_validate({name: getattr(e, name) for name in cls.model_fields})


class UnpricedPage(BaseModel):
    items: list[UnpricedEvent] = Field(description="Held events, by (occurred_at, event_id).")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")

    @classmethod
    def of(cls, page: Page[UsageEventRow]) -> UnpricedPage:
        return cls(items=[UnpricedEvent.of(e) for e in page.items], next_cursor=page.next_cursor)


# -- quotes ---------------------------------------------------------------------------------------


class QuoteOut(BaseModel):
    provider: str
    model: str
    at: datetime = Field(description="The moment priced (prices are effective-dated).")
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int = Field(description="Of the cache writes, those kept for an hour.")
    web_searches: int = Field(description="Web searches the provider ran for the call.")
    cost_nanos: int = Field(description="Provider cost, before markup.")
    cost_usd: str = Field(description=USD)
    price_nanos: int = Field(description="What the user would be charged: cost x (1 + markup_pct / 100).")
    price_usd: str = Field(description=USD)
    markup_pct: str = Field(description="The markup applied, percent (a decimal string).")
    source: str = Field(description="genai-prices | override")
    source_version: str = Field(description="The genai-prices version, or the override id.")
    matched_model: str | None = Field(description="genai-prices' model id, or the override's model pattern.")

    @classmethod
    def of(
        cls, quote: Quote, *, provider: str, model: str, at: datetime, tokens: tuple[int, int, int, int, int, int]
    ) -> QuoteOut:
        return cls(
            provider=provider,
            model=model,
            at=at,
            input_tokens=tokens[0],
            output_tokens=tokens[1],
            cache_read_tokens=tokens[2],
            cache_write_tokens=tokens[3],
            cache_write_1h_tokens=tokens[4],
            web_searches=tokens[5],
            cost_nanos=quote.cost_nanos,
            cost_usd=usd(quote.cost_nanos),
            price_nanos=quote.price_nanos,
            price_usd=usd(quote.price_nanos),
            markup_pct=format(quote.markup_pct, "f"),  # plain: str() writes Decimal("1e1") as "1E+1"
            source=quote.source,
            source_version=quote.source_version,
            matched_model=quote.matched_model,
        )
