"""Reprice held events (SQL; only flushes, the edge commits): ``metering billing reprice``.

An event whose model had no price was stored ``unpriced``: held, visible, never billed at $0. Once a price
exists (typically an admin override, possibly at zero for a local model), ``reprice_held`` prices every held
event with the *current* price book exactly as ingest would (rate cards, then Policy A), assigns its invoice
period like ingest (a finalized period sends it to the next open one, as a late line), writes its billing
columns, posts its charge and provider cost (ids derived from the event id, as at ingest: a held event never
had a charge, so nothing can collide), updates cached balances and moves its rollup bucket (billed / cost up,
``unpriced_count`` down by one). Events still without a price stay held, and so do events the current prices
put above the per-call limit (``pricing.MAX_CALL_NANOS``: counted apart). A second run finds nothing to do.

A BYOLLM event of a model with no price is never billed (Policy A), but its shadow cost is unknown: it is stored
``excluded_byollm`` with ``price_source`` NULL and a shadow of 0. ``reprice_held`` fills that shadow cost too
(the event stays ``excluded_byollm``; its rollup bucket's shadow cost goes up); nothing is posted for it.

A failed call whose usage reports web searches and no tokens was stored ``not_billable`` before Policy A billed such
a call for its searches (``metering billing check`` names such events). ``reprice_held`` decides it again with the
current rule, as ingest now would: billed like a held event that found a price (its rollup's ``unpriced_count``
unchanged), or, without a search price, held ``unpriced`` (``unpriced_count`` up by one) until one exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from metering.billing import store
from metering.billing.corrections import (
    Balances,
    PagePrices,
    add_delta,
    decide_event,
    event_pages,
    quote_event,
    set_billing,
    upsert_rollup_deltas,
)
from metering.billing.invoice_store import lock_billing_periods
from metering.billing.ledger import Posting, usage_postings
from metering.billing.periods import billing_period, period_of
from metering.billing.policy import BillingStatus
from metering.billing.pricing import over_call_limit
from metering.billing.rollup import RollupKey
from metering.db.models import UsageEventRow
from metering.events import UsageCompleteness


@dataclass(frozen=True, slots=True)
class RepriceResult:
    priced: int  # held events that left ``unpriced`` (normally: now billed), and failed calls with searches billed
    still_unpriced: int  # held events that still have no price
    charge_nanos: int = 0  # charged to users by this run
    cost_nanos: int = 0  # provider cost recorded by this run
    over_limit: int = 0  # held events the current prices put above pricing.MAX_CALL_NANOS: kept held
    shadow_priced: int = 0  # BYOLLM events whose unknown shadow cost this run filled in
    shadow_nanos: int = 0  # the shadow cost they now have
    shadow_unpriced: int = 0  # BYOLLM events whose model still has no price (shadow cost unknown)
    searches_redecided: int = 0  # not_billable failed calls with searches (stored before they were billable) decided


def reprice_held(session: Session, *, markup_pct: Decimal, now: datetime | None = None) -> RepriceResult:
    """Price every ``unpriced`` event with the current price book; returns what changed."""
    now = now or datetime.now(UTC)
    prices = PagePrices(markup_pct)
    e = UsageEventRow
    held = select(e).where(
        or_(
            e.billing_status == BillingStatus.UNPRICED.value,
            and_(e.billing_status == BillingStatus.EXCLUDED_BYOLLM.value, e.price_source.is_(None)),
            and_(
                e.billing_status == BillingStatus.NOT_BILLABLE.value,
                e.web_searches > 0,
                e.usage_completeness != UsageCompleteness.MISSING.value,
            ),
        )
    )
    priced = still = charged = cost = over = redecided = 0
    shadows = shadow_nanos = shadow_still = 0
    buckets: dict[RollupKey, list[int]] = {}  # moved once, after the last page (see corrections.event_pages)
    balances = Balances()  # so are the accounts, before the rollups (ingest's order)
    for rows in event_pages(session, held, lock=True):
        finalized = lock_billing_periods(session, {period_of(r.occurred_at) for r in rows})
        cards = prices.cards(session)  # read at the first page, once locked: see corrections.PagePrices
        postings: list[Posting] = []
        for row in rows:
            was_held = row.billing_status == BillingStatus.UNPRICED.value  # else BYOLLM, or a failed call with searches
            quote = quote_event(cards, row)
            absurd = quote is not None and over_call_limit(quote) is not None
            if row.is_byollm:  # never billed: only its shadow cost may become known (an absurd one does not)
                if quote is None or absurd:
                    shadow_still += 1
                    continue
            elif absurd:
                over += 1  # impossible token counts or an absurd price: never billed, stays visible as held
                continue
            decision = decide_event(row, quote)
            if decision.status is BillingStatus.NOT_BILLABLE:
                continue  # not selected: kept as a guard
            if decision.status is BillingStatus.EXCLUDED_BYOLLM:
                assert quote is not None
                set_billing(row, decision, quote, row.invoice_period)
                add_delta(buckets, row, billed=0, shadow=decision.shadow_nanos, cost=0, unpriced=0)
                shadows += 1
                shadow_nanos += decision.shadow_nanos
                continue
            if decision.status is BillingStatus.UNPRICED:
                still += 1
                if not was_held:  # a failed call's searches without a price: held, as ingest now holds it
                    set_billing(row, decision, None, None)
                    row.markup_pct = row.price_source = row.price_version = None
                    add_delta(buckets, row, unpriced=1)
                    redecided += 1
                continue
            period, late = None, False
            if decision.status is BillingStatus.BILLED:
                period, late = billing_period(period_of(row.occurred_at), finalized)
                postings += usage_postings(
                    event_id=row.event_id,
                    tenant_id=row.tenant_id,
                    user_id=row.user_id,
                    provider=row.provider.lower(),  # stored before provider names were lowercased at validation
                    period=period,
                    charge_nanos=decision.charge_nanos,
                    cost_nanos=decision.cost_nanos,
                )
            set_billing(row, decision, quote, period, late)
            add_delta(
                buckets,
                row,
                billed=decision.charge_nanos,
                shadow=decision.shadow_nanos,
                cost=decision.cost_nanos,
                unpriced=-1 if was_held else 0,
            )
            redecided += not was_held
            priced += 1
            charged += decision.charge_nanos
            cost += decision.cost_nanos
        session.flush()
        store.post_transfers(session, postings, now)
        balances.add(postings)
    balances.apply(session, now)
    upsert_rollup_deltas(session, buckets)
    return RepriceResult(priced, still, charged, cost, over, shadows, shadow_nanos, shadow_still, redecided)
