import pytest

from metering.errors import BudgetExceededError
from metering.events import BudgetLimit
from metering.llm.budgets import BudgetMode, BudgetTracker, CallBudget, limits_exceeded_after, limits_exceeded_before


def test_enforce_counts_the_call_about_to_be_made() -> None:
    budget = CallBudget("ext", max_calls=2, mode=BudgetMode.ENFORCE)
    assert limits_exceeded_before(budget, 0, 0, 10, 100) == []
    assert limits_exceeded_before(budget, 1, 0, 10, 100) == []
    assert limits_exceeded_before(budget, 2, 0, 10, 100) == [BudgetLimit.CALLS]


def test_enforce_reserves_max_tokens_for_the_output() -> None:
    budget = CallBudget("ext", max_tokens=1000, mode=BudgetMode.ENFORCE)
    assert limits_exceeded_before(budget, 0, 0, 100, 900) == []
    assert limits_exceeded_before(budget, 0, 0, 101, 900) == [BudgetLimit.TOKENS]
    assert limits_exceeded_before(budget, 3, 600, 100, 500) == [BudgetLimit.TOKENS]


def test_report_flags_after_the_call() -> None:
    budget = CallBudget("ext", max_calls=1, max_tokens=50)
    assert limits_exceeded_after(budget, 1, 50) == []
    assert limits_exceeded_after(budget, 2, 51) == [BudgetLimit.CALLS, BudgetLimit.TOKENS]


def test_tracker_counts_reserved_calls_until_they_settle() -> None:
    tracker = BudgetTracker(CallBudget("ext", max_calls=2, max_tokens=1000, mode=BudgetMode.ENFORCE))
    first = tracker.reserve(lambda: 100, 300)
    second = tracker.reserve(lambda: 100, 300)
    assert (first, second, tracker.calls_in_flight, tracker.tokens_in_flight) == (400, 400, 2, 800)
    with pytest.raises(BudgetExceededError, match="calls and tokens") as info:
        tracker.reserve(lambda: 100, 300)  # two in flight: a third would go over both limits
    assert info.value.limit == "calls" and tracker.calls_in_flight == 2
    assert tracker.settle(first, 50) == []
    assert (tracker.calls, tracker.tokens, tracker.calls_in_flight, tracker.tokens_in_flight) == (1, 50, 1, 400)


def test_tracker_without_an_enforced_budget_refuses_nothing_and_flags_in_report_mode() -> None:
    tracker = BudgetTracker(CallBudget("ext", max_calls=1))
    reserved = [tracker.reserve(lambda: 1 / 0, 10) for _ in range(3)]  # the estimate is not even computed
    assert reserved == [0, 0, 0]
    assert [tracker.settle(0, 5) for _ in reserved] == [[], [BudgetLimit.CALLS], [BudgetLimit.CALLS]]
    assert BudgetTracker(None).reserve(lambda: 1, 10) == 0
