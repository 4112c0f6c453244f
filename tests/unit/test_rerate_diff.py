"""Re-rate arithmetic (pure): which events change, aggregated per user and per extension."""

from __future__ import annotations

import uuid
from decimal import Decimal

from metering.billing.pricing import Quote
from metering.billing.rerate_diff import BilledEvent, rerate_diff


def billed(user: str, extension: str, charge: int, cost: int) -> BilledEvent:
    return BilledEvent(uuid.uuid4(), "t", user, extension, "ollama", "llama3.1", charge, cost)


def quote(price: int, cost: int) -> Quote:
    return Quote(cost, price, Decimal(20), "override", "new", "llama3*")


def test_changes_are_aggregated_per_user_and_extension() -> None:
    a1, a2, b1 = billed("a", "x", 120, 100), billed("a", "y", 12, 10), billed("b", "x", 60, 50)
    same, gone = billed("b", "y", 6, 5), billed("c", "y", 6, 5)
    diff = rerate_diff([(a1, quote(240, 200)), (a2, quote(0, 0)), (b1, quote(60, 51)), (same, quote(6, 5)),
                        (gone, None)])  # fmt: skip
    assert (diff.examined, diff.unpriceable) == (5, 1)
    assert [c.event for c in diff.changes] == [a1, a2, b1]  # identical amounts and unpriceable: untouched
    user_a = diff.by_user[("t", "a")]
    assert (user_a.events, user_a.old_charge_nanos, user_a.new_charge_nanos, user_a.charge_delta) == (2, 132, 240, 108)
    assert (user_a.old_cost_nanos, user_a.new_cost_nanos, user_a.cost_delta) == (110, 200, 90)
    assert diff.by_user[("t", "b")].charge_delta == 0 and diff.by_user[("t", "b")].cost_delta == 1
    assert (diff.by_extension["x"].events, diff.by_extension["x"].charge_delta) == (2, 120)
    assert (diff.by_extension["y"].events, diff.by_extension["y"].charge_delta) == (1, -12)
    assert (diff.total.events, diff.total.charge_delta, diff.total.cost_delta) == (3, 108, 91)
    assert diff.changes[1].charge_delta == -12 and diff.changes[1].cost_delta == -10


def test_nothing_in_scope_is_an_empty_diff() -> None:
    diff = rerate_diff([])
    assert (diff.examined, diff.changes, diff.by_user, diff.total.events) == (0, [], {}, 0)
