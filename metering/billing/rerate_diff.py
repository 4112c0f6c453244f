"""Re-rate arithmetic (pure): old vs new price of billed events, aggregated per user and per extension.

A BYOLLM event is never billed, but its shadow cost (what the platform would have charged) follows the price
book too: it changes when its quote's price does (``ShadowChanges``), and, as a billed event, stays as it is
when it has no price now. Its ledger is untouched (it has no transfer).

A billed event under the current price book either gets a quote (its new charge is the quote's price with
markup, its new cost the quote's cost: Policy A for a billed, non-BYOLLM call) or none (the price it was
billed with is gone and nothing replaces it): such an event is counted ``unpriceable`` and left as it is;
a re-rate never un-bills. An event changes when its charge or its cost changes; an event whose amounts are
identical is not touched (its recorded price source still justifies exactly what it was charged).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from metering.billing.pricing import Quote


@dataclass(frozen=True, slots=True)
class BilledEvent:
    event_id: uuid.UUID
    tenant_id: str
    user_id: str
    extension_id: str
    provider: str
    model: str
    charge_nanos: int
    cost_nanos: int


@dataclass(frozen=True, slots=True)
class EventChange:
    event: BilledEvent
    new_charge_nanos: int
    new_cost_nanos: int
    quote: Quote

    @property
    def charge_delta(self) -> int:
        return self.new_charge_nanos - self.event.charge_nanos

    @property
    def cost_delta(self) -> int:
        return self.new_cost_nanos - self.event.cost_nanos


@dataclass(slots=True)
class DiffLine:
    """Changed events of one user / extension: how many, and their charge and cost before and after."""

    events: int = 0
    old_charge_nanos: int = 0
    new_charge_nanos: int = 0
    old_cost_nanos: int = 0
    new_cost_nanos: int = 0

    @property
    def charge_delta(self) -> int:
        return self.new_charge_nanos - self.old_charge_nanos

    @property
    def cost_delta(self) -> int:
        return self.new_cost_nanos - self.old_cost_nanos

    def add(self, change: EventChange) -> None:
        self.events += 1
        self.old_charge_nanos += change.event.charge_nanos
        self.new_charge_nanos += change.new_charge_nanos
        self.old_cost_nanos += change.event.cost_nanos
        self.new_cost_nanos += change.new_cost_nanos


@dataclass(slots=True)
class ShadowChanges:
    """BYOLLM events (never billed) whose shadow cost, what the platform would have charged, changes."""

    examined: int = 0  # priced BYOLLM events in scope
    unpriceable: int = 0  # of those, without a current price (their shadow cost is left as it is)
    events: int = 0  # changed
    old_nanos: int = 0
    new_nanos: int = 0

    def examine(self, shadow_nanos: int, quote: Quote | None) -> bool:
        """Count one priced BYOLLM event; True when its shadow cost changes to ``quote``'s price."""
        self.examined += 1
        if quote is None:
            self.unpriceable += 1
            return False
        if quote.price_nanos == shadow_nanos:
            return False
        self.events += 1
        self.old_nanos += shadow_nanos
        self.new_nanos += quote.price_nanos
        return True


@dataclass(slots=True)
class RerateDiff:
    examined: int = 0  # billed events in scope
    unpriceable: int = 0  # billed events the current price book cannot price (left unchanged)
    changes: list[EventChange] = field(default_factory=list)
    by_user: dict[tuple[str, str], DiffLine] = field(default_factory=dict)
    by_extension: dict[str, DiffLine] = field(default_factory=dict)
    total: DiffLine = field(default_factory=DiffLine)
    shadow: ShadowChanges = field(default_factory=ShadowChanges)

    def examine(self, event: BilledEvent, quote: Quote | None) -> EventChange | None:
        """Count one event in scope; its change under ``quote``, or None when it stays as it is."""
        self.examined += 1
        if quote is None:
            self.unpriceable += 1
            return None
        if (quote.price_nanos, quote.cost_nanos) == (event.charge_nanos, event.cost_nanos):
            return None
        return EventChange(event, quote.price_nanos, quote.cost_nanos, quote)

    def record(self, change: EventChange) -> None:
        """Add a change (one that is, or would be, applied) to the per-user / per-extension aggregates."""
        event = change.event
        self.changes.append(change)
        self.by_user.setdefault((event.tenant_id, event.user_id), DiffLine()).add(change)
        self.by_extension.setdefault(event.extension_id, DiffLine()).add(change)
        self.total.add(change)


def rerate_diff(items: Iterable[tuple[BilledEvent | int, Quote | None]]) -> RerateDiff:
    """The diff of billed events (and of BYOLLM events, given as their shadow cost) against their new quotes
    (None: no price now)."""
    diff = RerateDiff()
    for event, quote in items:
        if isinstance(event, int):
            diff.shadow.examine(event, quote)
            continue
        change = diff.examine(event, quote)
        if change is not None:
            diff.record(change)
    return diff
