"""Per-extension call budgets (pure): max calls and max tokens per handler invocation.

Mode ``report`` flags the event of the call that went over; mode ``enforce`` refuses, before it is made,
a call that would go over. For tokens, ``enforce`` counts the call's estimated input plus the
``max_tokens`` it asks for (the output it may produce), since the real output is not known in advance.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from metering.events import BudgetLimit


class BudgetMode(StrEnum):
    REPORT = "report"
    ENFORCE = "enforce"


@dataclass(frozen=True, slots=True)
class CallBudget:
    extension_id: str
    max_calls: int | None = None
    max_tokens: int | None = None
    mode: BudgetMode = BudgetMode.REPORT


def limits_exceeded_before(
    budget: CallBudget, calls_done: int, tokens_used: int, estimated_input: int, max_tokens: int
) -> list[BudgetLimit]:
    """Limits a call would exceed, judged before it is made (used by ``enforce``)."""
    exceeded: list[BudgetLimit] = []
    if budget.max_calls is not None and calls_done + 1 > budget.max_calls:
        exceeded.append(BudgetLimit.CALLS)
    if budget.max_tokens is not None and tokens_used + estimated_input + max_tokens > budget.max_tokens:
        exceeded.append(BudgetLimit.TOKENS)
    return exceeded


def limits_exceeded_after(budget: CallBudget, calls_done: int, tokens_used: int) -> list[BudgetLimit]:
    """Limits exceeded once a call is counted (``calls_done`` and ``tokens_used`` include it)."""
    exceeded: list[BudgetLimit] = []
    if budget.max_calls is not None and calls_done > budget.max_calls:
        exceeded.append(BudgetLimit.CALLS)
    if budget.max_tokens is not None and tokens_used > budget.max_tokens:
        exceeded.append(BudgetLimit.TOKENS)
    return exceeded
