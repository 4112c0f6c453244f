"""Re-rate billed events of a past window under the current price book (SQL; only flushes, the edge commits).

``plan_rerate`` is the dry run: the diff per event, per user and per extension, and how many corrections would be
posted after a finalized invoice (``late_corrections``, as the run counts them); it writes nothing.
``apply_rerate(..., run_id)`` corrects each changed event, in the caller's transaction:

- The event's *current* ledger position is its un-reversed ``usage_charge`` / ``provider_cost`` transfers
  (the ingest one, or an earlier re-rate's). Their sums must equal the event row's ``charge_nanos`` /
  ``cost_nanos`` (else ``LedgerInconsistencyError``: nothing is guessed). Each component (charge, cost) that
  changes gets a reversal of its current transfer(s) (``ledger.reversal(original, cause="rerate:<run>")``)
  and, if the new amount is positive, a new transfer of the same kind with id
  ``transfer_id(f"rerate:{run_id}:{event_id}", kind)``. So after any re-rate, per event, the net posted
  charge (charges minus their reversals) equals ``event.charge_nanos`` (``checks.py`` invariant 4).
- The same ``run_id`` applied twice posts nothing the second time: an event already carrying a transfer
  whose id derives from this run is skipped (counted in ``skipped``), even if prices changed in between.
- The event row gets the new charge, cost, markup, price source and version; its hourly rollup moves by the
  deltas; cached balances are updated. An event whose charge and cost stay the same under the current price book
  is not a change (no transfer, not counted as changed), but it names the price it now comes from (markup, source
  and version; counted in ``relabelled`` when that differs from what it named, so the run is audited): else an
  event priced by an override since ended or withdrawn, re-rated at the same charge (a successor at its price),
  still named that override, which ``overrides.priced_beyond`` then counted past its end forever.
- A BYOLLM event with a known shadow cost (``excluded_byollm``, priced) in scope gets the new shadow cost, markup,
  price source and version (the same shadow cost too: the price it comes from), and its rollups' shadow cost moves:
  no transfer (it is never billed). Applying a run again finds nothing to change unless prices changed since (a
  shadow cost is reporting, not money).
- Periods: corrections are posted in the event's ``invoice_period``. If that invoice is already finalized,
  the reversal and the new transfer are posted in the first open period after it (``billing_period``), and
  the event row keeps the finalized ``invoice_period`` (the invoice that billed it, which never changes)
  and its ``is_late``. Such corrections are counted in ``late_corrections``; the open period's invoice shows
  their net change as a correction line (``InvoiceLine.correction_of``, from the transfers of that period
  with memo ``rerate:<run>``), so a user's invoices always add up to what the ledger charged them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from metering.billing import store
from metering.billing.corrections import (
    Balances,
    PagePrices,
    add_delta,
    event_pages,
    quote_event,
    transfers_by_event,
    upsert_rollup_deltas,
)
from metering.billing.invoice_store import lock_billing_periods
from metering.billing.ledger import (
    REVENUE,
    Posting,
    TransferKind,
    provider_cost,
    provider_payable,
    reversal,
    transfer_id,
    unescaped_wallet_id,
    user_wallet,
)
from metering.billing.periods import billing_period, period_of
from metering.billing.policy import BillingStatus
from metering.billing.pricing import Quote, glob_match, over_call_limit
from metering.billing.rates import RateCards
from metering.billing.rerate_diff import BilledEvent, DiffLine, EventChange, RerateDiff, rerate_diff
from metering.billing.rollup import RollupKey
from metering.db.models import TransferRow, UsageEventRow
from metering.errors import InvalidInputError, MeteringError

__all__ = ["DiffLine", "LedgerInconsistencyError", "RerateResult", "apply_rerate", "plan_rerate", "rerate_diff"]
MAX_RUN_ID = 100
_KINDS = (TransferKind.USAGE_CHARGE, TransferKind.PROVIDER_COST)


class LedgerInconsistencyError(MeteringError):
    """An event's posted transfers disagree with its billing columns: re-rating it would guess."""

    code = "ledger_inconsistent"
    status = 500


@dataclass(frozen=True, slots=True)
class RerateResult:
    start: datetime
    end: datetime
    provider: str | None
    model_pattern: str | None
    diff: RerateDiff
    run_id: str | None = None  # None: a dry run
    skipped: int = 0  # changed events this run had already corrected (re-applying a run posts nothing)
    late_corrections: int = 0  # corrections posted (a dry run: to be posted) after the event's finalized invoice
    transfers: int = 0  # transfers posted
    relabelled: int = 0  # events whose charge (or shadow cost) stayed, now naming another price (source, version)

    @property
    def applied(self) -> bool:
        return self.run_id is not None


def _check_window(start: datetime, end: datetime) -> None:
    for name, value in (("start", start), ("end", end)):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInputError(f"{name} must be timezone-aware")
    if end <= start:
        raise InvalidInputError("end must be after start")


def _in_scope(
    session: Session, start: datetime, end: datetime, provider: str | None, model_pattern: str | None, lock: bool
) -> Iterator[list[UsageEventRow]]:
    e = UsageEventRow
    shadowed = and_(e.billing_status == BillingStatus.EXCLUDED_BYOLLM.value, e.price_source.is_not(None))
    stmt = select(e).where(
        or_(e.billing_status == BillingStatus.BILLED.value, shadowed), e.occurred_at >= start, e.occurred_at < end
    )
    if provider is not None:
        stmt = stmt.where(func.lower(e.provider) == provider.lower())
    for rows in event_pages(session, stmt, lock=lock):
        picked = [r for r in rows if model_pattern is None or glob_match(model_pattern, r.model)]
        if picked:
            yield picked


def _billed(row: UsageEventRow) -> BilledEvent:
    return BilledEvent(
        row.event_id, row.tenant_id, row.user_id, row.extension_id, row.provider, row.model, row.charge_nanos,
        row.cost_nanos,
    )  # fmt: skip


def plan_rerate(
    session: Session,
    *,
    start: datetime,
    end: datetime,
    provider: str | None = None,
    model_pattern: str | None = None,
    markup_pct: Decimal,
) -> RerateResult:
    """Dry run: what re-rating billed events (and BYOLLM shadow costs) with ``occurred_at`` in [start, end) would
    change. Writes nothing."""
    _check_window(start, end)
    cards = RateCards(store.load_price_book(session, markup_pct))
    finalized = store.finalized_periods(session)
    diff = RerateDiff()
    late = 0
    for rows in _in_scope(session, start, end, provider, model_pattern, lock=False):
        for row in rows:
            if not _is_billed(row):
                diff.shadow.examine(row.shadow_nanos, _shadow(cards, row))
                continue
            change = diff.examine(_billed(row), _quote_within_limit(cards, row))
            if change is not None:
                diff.record(change)
                late += billing_period(row.invoice_period or period_of(row.occurred_at), finalized)[1]
    return RerateResult(start, end, provider, model_pattern, diff, late_corrections=late)


def _is_billed(row: UsageEventRow) -> bool:
    return row.billing_status == BillingStatus.BILLED.value


def _shadow(cards: RateCards, row: UsageEventRow) -> Quote | None:
    """A BYOLLM event's new quote; none beyond what one call can cost (as ingest, which would hold the call)."""
    quote = quote_event(cards, row)
    return None if quote is None or over_call_limit(quote) is not None else quote


def _quote_within_limit(cards: RateCards, row: UsageEventRow) -> Quote | None:
    """The event's new quote; a price beyond what one call can cost refuses the whole re-rate."""
    quote = quote_event(cards, row)
    reason = None if quote is None else over_call_limit(quote)
    if reason is not None:
        raise InvalidInputError(f"re-rating event {row.event_id} ({row.provider} {row.model}): {reason}")
    return quote


def _name_price(row: UsageEventRow, quote: Quote) -> bool:
    """The event names the price it is now charged at (its markup, source and version), changed or not; whether
    that changed what it named."""
    named = (str(quote.markup_pct), quote.source, quote.source_version)
    if (row.markup_pct, row.price_source, row.price_version) == named:
        return False
    row.markup_pct, row.price_source, row.price_version = named
    return True


def _posting_of(t: TransferRow, row: UsageEventRow) -> Posting:
    kind = TransferKind(t.kind)
    if kind is TransferKind.USAGE_CHARGE:
        # an event charged before wallet ids escaped the tenant's '~' and ':' debited the unescaped id
        debit, credit = user_wallet(row.tenant_id, row.user_id), REVENUE
        if t.debit_account_id == unescaped_wallet_id(row.tenant_id, row.user_id) != debit.id:
            debit = replace(debit, id=t.debit_account_id)
    else:  # an event stored before provider names were lowercased may have its cost under its own spelling
        spelling = row.provider if t.debit_account_id == provider_cost(row.provider).id else row.provider.lower()
        debit, credit = provider_cost(spelling), provider_payable(spelling)
    if (debit.id, credit.id) != (t.debit_account_id, t.credit_account_id):
        raise LedgerInconsistencyError(f"transfer {t.id} of event {row.event_id} moves between unexpected accounts")
    return Posting(t.id, debit, credit, t.amount_nanos, kind, t.event_id, t.period, memo=t.memo)


def _already_applied(cause: str, event_id: uuid.UUID, transfers: list[TransferRow]) -> bool:
    ids = {t.id for t in transfers}
    own = {transfer_id(f"{cause}:{event_id}", kind) for kind in _KINDS}
    own |= {transfer_id(f"{cause}/{t.id}", TransferKind.REVERSAL) for t in transfers}  # ledger.reversal's ids
    return bool(ids & own)


def _corrections(
    change: EventChange, row: UsageEventRow, transfers: list[TransferRow], cause: str, period: str
) -> list[Posting]:
    reversed_ids = {t.reverses_id for t in transfers if t.kind == TransferKind.REVERSAL}
    postings: list[Posting] = []
    for kind, old, new in (
        (TransferKind.USAGE_CHARGE, row.charge_nanos, change.new_charge_nanos),
        (TransferKind.PROVIDER_COST, row.cost_nanos, change.new_cost_nanos),
    ):
        current = [t for t in transfers if t.kind == kind and t.id not in reversed_ids]
        if sum(t.amount_nanos for t in current) != old:
            raise LedgerInconsistencyError(f"event {row.event_id}: posted {kind} does not equal its {old} nanos")
        if old == new:
            continue
        postings += [replace(reversal(_posting_of(t, row), cause, memo=cause), period=period) for t in current]
        if new > 0:
            debit, credit = (
                (user_wallet(row.tenant_id, row.user_id), REVENUE)
                if kind is TransferKind.USAGE_CHARGE
                else (provider_cost(row.provider.lower()), provider_payable(row.provider.lower()))
            )
            ident = transfer_id(f"{cause}:{row.event_id}", kind)
            postings.append(Posting(ident, debit, credit, new, kind, row.event_id, period, memo=cause))
    return postings


def apply_rerate(
    session: Session,
    *,
    start: datetime,
    end: datetime,
    provider: str | None = None,
    model_pattern: str | None = None,
    markup_pct: Decimal,
    run_id: str,
    now: datetime | None = None,
) -> RerateResult:
    """Re-rate changed events with reversals plus new transfers (idempotent per ``run_id``); see the module."""
    _check_window(start, end)
    if not run_id or len(run_id) > MAX_RUN_ID:
        raise InvalidInputError(f"a run id is required, at most {MAX_RUN_ID} characters")
    now = now or datetime.now(UTC)
    cause = f"rerate:{run_id}"
    prices = PagePrices(markup_pct)
    diff = RerateDiff()
    skipped = late = posted = relabelled = 0
    buckets: dict[RollupKey, list[int]] = {}  # moved once, after the last page (see corrections.event_pages)
    balances = Balances()  # so are the accounts, before the rollups (ingest's order)
    for rows in _in_scope(session, start, end, provider, model_pattern, lock=True):
        transfers = transfers_by_event(session, [row.event_id for row in rows])
        finalized = lock_billing_periods(session, {row.invoice_period or period_of(row.occurred_at) for row in rows})
        cards = prices.cards(session)  # read at the first page, once locked: see corrections.PagePrices
        postings: list[Posting] = []
        for row in rows:
            if not _is_billed(row):
                quote = _shadow(cards, row)
                moved = diff.shadow.examine(row.shadow_nanos, quote) and quote is not None
                if moved and quote is not None:
                    add_delta(buckets, row, shadow=quote.price_nanos - row.shadow_nanos)
                    row.shadow_nanos = quote.price_nanos
                if quote is not None and _name_price(row, quote) and not moved:
                    relabelled += 1
                continue
            quote = _quote_within_limit(cards, row)
            change = diff.examine(_billed(row), quote)
            if change is None:
                if quote is not None and _name_price(row, quote):  # the same charge, from the price now in effect
                    relabelled += 1  # no transfer, but the event names another price
                continue
            if _already_applied(cause, row.event_id, transfers[row.event_id]):
                skipped += 1
                continue
            period, is_late = billing_period(row.invoice_period or period_of(row.occurred_at), finalized)
            late += is_late
            postings += _corrections(change, row, transfers[row.event_id], cause, period)
            add_delta(buckets, row, billed=change.charge_delta, cost=change.cost_delta)
            diff.record(change)
            row.charge_nanos, row.cost_nanos = change.new_charge_nanos, change.new_cost_nanos
            _name_price(row, change.quote)
        session.flush()
        store.post_transfers(session, postings, now)
        balances.add(postings)
        posted += len(postings)
    balances.apply(session, now)
    upsert_rollup_deltas(session, buckets)
    return RerateResult(start, end, provider, model_pattern, diff, run_id, skipped, late, posted, relabelled)
