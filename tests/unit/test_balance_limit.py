"""The ledger's balance limit (pure): a cached balance must stay inside a BIGINT."""

from __future__ import annotations

from metering.billing.ledger import MAX_BALANCE_NANOS, past_balance_limit


def test_balances_up_to_the_limit_either_way_pass() -> None:
    assert MAX_BALANCE_NANOS == 2**63 - 1
    balances = {"a": MAX_BALANCE_NANOS - 5, "b": -MAX_BALANCE_NANOS + 5}
    assert past_balance_limit(balances, {"a": 5, "b": -5, "c": MAX_BALANCE_NANOS}) == []
    assert past_balance_limit(balances, {"a": -(2 * MAX_BALANCE_NANOS) + 5}) == []  # from +max to -max


def test_the_accounts_that_would_pass_it_are_named_in_order() -> None:
    balances = {"z": MAX_BALANCE_NANOS, "a": -MAX_BALANCE_NANOS}
    assert past_balance_limit(balances, {"z": 1, "a": -1, "m": 0}) == ["a", "z"]
    assert past_balance_limit({}, {"new": MAX_BALANCE_NANOS + 1}) == ["new"]  # an account not yet stored is at 0
