from metering.events import BudgetLimit
from metering.llm.budgets import BudgetMode, CallBudget, limits_exceeded_after, limits_exceeded_before


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
