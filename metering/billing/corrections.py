"""Shared by reprice and re-rate (SQL; only flushes): price a stored event again, page through events with
row locks, set an event's billing columns, and move its hourly rollup by deltas.

The price book is read once the first page's events are locked (``PagePrices``), never when the run starts: a run
that waited for the events (held by another reprice or re-rate) would otherwise price them with overrides changed
before it read them, and bill an ended override or re-rate them back to replaced prices.

Rollup deltas go through ``store.upsert_rollups``, which adds every counter (``col = col + excluded.col``),
so a bucket with ``calls = 0`` and negative counters moves an existing row without counting a call twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from metering.billing import store
from metering.billing.ledger import Account, Posting, accounts_of, balance_deltas
from metering.billing.policy import Decision, decide
from metering.billing.pricing import Quote
from metering.billing.rates import RateCards
from metering.billing.rollup import COUNTER_COLUMNS, RollupKey, hour_of
from metering.db.models import TransferRow, UsageEventRow
from metering.db.row_lock import lock_sqlite_for_write

PAGE = 500
_BILLED, _SHADOW, _COST, _UNPRICED = (
    COUNTER_COLUMNS.index(name) for name in ("billed_nanos", "shadow_nanos", "cost_nanos", "unpriced_count")
)


def quote_event(cards: RateCards, row: UsageEventRow) -> Quote | None:
    """The price of a stored event under ``cards``' price book: exactly what ingest would compute."""
    return cards.quote(
        row.provider, row.model, row.occurred_at, row.input_tokens, row.output_tokens, row.cache_read_tokens,
        row.cache_write_tokens, row.cache_write_1h_tokens, row.web_searches,
    )  # fmt: skip


def decide_event(row: UsageEventRow, quote: Quote | None) -> Decision:
    return decide(
        is_byollm=row.is_byollm,
        status=row.status,
        usage_completeness=row.usage_completeness,
        total_tokens=row.input_tokens + row.output_tokens,
        web_searches=row.web_searches,
        quote=quote,
    )


def set_billing(
    row: UsageEventRow, decision: Decision, quote: Quote | None, period: str | None, late: bool | None = None
) -> None:
    """Write an event's billing columns (the raw quantities never change)."""
    row.billing_status = decision.status.value
    row.charge_nanos = decision.charge_nanos
    row.cost_nanos = decision.cost_nanos
    row.shadow_nanos = decision.shadow_nanos
    if quote is not None:
        row.markup_pct = str(quote.markup_pct)
        row.price_source = quote.source
        row.price_version = quote.source_version
    row.invoice_period = period
    if late is not None:
        row.is_late = late


def event_pages(session: Session, stmt: Select[Any], *, lock: bool) -> Iterator[list[UsageEventRow]]:
    """Rows of ``stmt`` (a select of UsageEventRow) in event-id order, a page at a time (keyset paging).

    With ``lock``, on PostgreSQL each page is ``SELECT ... FOR UPDATE``: a concurrent run waits, then re-checks
    its WHERE clause against the committed rows, so two runs never correct the same event twice. On SQLite the
    database write lock is taken before the first page is read: a second run waits for the first to commit and
    then reads what it wrote (reading first, it would correct from a stale view and post everything twice).

    Callers sum their balance and rollup deltas over all pages and move them once, after the last page
    (``Balances``, then ``upsert_rollup_deltas``): every account, then every rollup row, is then taken in key
    order, as ingest takes them. Moved page by page, a later page's rows came after an earlier page's whatever
    their keys, and PostgreSQL aborted a reprice or an ingest moving the same rows as a deadlock (rollups: events
    at $0 or BYOLLM calls; accounts: a page with a provider cost and no charge, markup -100 %, then one with a
    charge, while an ingest held the revenue account and waited for the provider's).
    """
    if lock:
        lock_sqlite_for_write(session)
    page = PAGE
    after: uuid.UUID | None = None
    while True:
        query = stmt.order_by(UsageEventRow.event_id).limit(page)
        if after is not None:
            query = query.where(UsageEventRow.event_id > after)
        if lock and store.dialect(session) == "postgresql":
            query = query.with_for_update(of=UsageEventRow)
        rows = list(session.scalars(query))
        if not rows:
            return
        yield rows
        if len(rows) < page:
            return
        after = rows[-1].event_id


def transfers_by_event(session: Session, event_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[TransferRow]]:
    found: dict[uuid.UUID, list[TransferRow]] = {event_id: [] for event_id in event_ids}
    if not event_ids:
        return found
    stmt = select(TransferRow).where(TransferRow.event_id.in_(list(event_ids))).order_by(TransferRow.created_at)
    for transfer in session.scalars(stmt):
        found[transfer.event_id].append(transfer)  # type: ignore[index]
    return found


def rollup_key(row: UsageEventRow) -> RollupKey:
    return (
        hour_of(row.occurred_at),
        row.tenant_id,
        row.user_id,
        row.extension_id,
        row.function,
        row.purpose,
        row.provider,
        row.model,
        row.is_byollm,
        row.status,
    )


def add_delta(
    buckets: dict[RollupKey, list[int]],
    row: UsageEventRow,
    *,
    billed: int = 0,
    shadow: int = 0,
    cost: int = 0,
    unpriced: int = 0,
) -> None:
    """Accumulate a money / unpriced-count correction of ``row``'s rollup bucket (calls and tokens unchanged)."""
    counters = buckets.setdefault(rollup_key(row), [0] * len(COUNTER_COLUMNS))
    counters[_BILLED] += billed
    counters[_SHADOW] += shadow
    counters[_COST] += cost
    counters[_UNPRICED] += unpriced


def upsert_rollup_deltas(session: Session, buckets: dict[RollupKey, list[int]]) -> None:
    """Add the deltas to the rollup rows (which ingest created); all-zero buckets are skipped."""
    store.upsert_rollups(session, {key: counters for key, counters in buckets.items() if any(counters)})


class PagePrices:
    """The current price book, read once the run's first page of events is locked (and its billing periods): every
    change of the overrides committed before those events were read is in it. The price book's shared lock is taken
    then and held to the commit (as an ingest holds it; SQLite: the database write lock, taken with the periods): no
    change commits during the run, so the book read then prices every page, and a re-rate or reprice run once a
    change is committed finds the events this run billed without it."""

    def __init__(self, markup_pct: Decimal) -> None:
        self.markup_pct = markup_pct
        self._cards: RateCards | None = None

    def cards(self, session: Session) -> RateCards:
        if self._cards is None:
            store.lock_price_book(session, change=False)
            self._cards = RateCards(store.load_price_book(session, self.markup_pct))
        return self._cards


@dataclass
class Balances:
    """The balance moves of every page's postings, applied once after the last page (see ``event_pages``)."""

    accounts: dict[str, Account] = field(default_factory=dict)
    deltas: dict[str, int] = field(default_factory=dict)

    def add(self, postings: Sequence[Posting]) -> None:
        for ident, account in accounts_of(postings).items():
            self.accounts.setdefault(ident, account)
        for ident, delta in balance_deltas(postings).items():
            self.deltas[ident] = self.deltas.get(ident, 0) + delta

    def apply(self, session: Session, now: datetime) -> None:
        """Create the missing accounts and move the cached balances, in account-id order (``store.apply_balances``)."""
        store.apply_balances(session, self.accounts, self.deltas, now)
