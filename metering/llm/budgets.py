"""Per-extension call budgets (pure): max calls and max tokens per handler invocation.

Mode ``report`` flags the event of the call that went over; mode ``enforce`` refuses, before it is made,
a call that would go over. For tokens, ``enforce`` counts the call's estimated input plus the
``max_tokens`` it asks for (the output it may produce), since the real output is not known in advance.
Calls in flight count too: each call is reserved before it is made (concurrent calls of one invocation, a
failover call), and settled once its event is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from metering.errors import BudgetExceededError
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


@dataclass(slots=True)
class BudgetTracker:
    """One invocation's calls and tokens against its budget: those made, and those reserved by calls in flight."""

    budget: CallBudget | None
    calls: int = 0  # calls made (each recorded an event)
    tokens: int = 0  # tokens those calls used
    calls_in_flight: int = 0
    tokens_in_flight: int = 0  # reserved (estimated input + max_tokens) by calls in flight under an enforced budget

    def reserve(self, estimate_input: Callable[[], int], max_tokens: int, *, failover: bool = False) -> int:
        """Count a call about to be made as in flight, or refuse it (``BudgetExceededError``) when an enforced budget
        would go over, counting the calls in flight as made. Returns the tokens reserved, for ``settle``.
        """
        budget, reserved = self.budget, 0
        if budget is not None and budget.mode is BudgetMode.ENFORCE:
            estimate = estimate_input() if budget.max_tokens is not None else 0
            calls, tokens = self.calls + self.calls_in_flight, self.tokens + self.tokens_in_flight
            exceeded = limits_exceeded_before(budget, calls, tokens, estimate, max_tokens)
            if exceeded:
                names = " and ".join(limit.value for limit in exceeded)
                call = "the failover call to the platform LLM" if failover else "the call"
                raise BudgetExceededError(
                    f"extension {budget.extension_id!r} would exceed its per-invocation {names} budget "
                    f"(max_calls={budget.max_calls}, max_tokens={budget.max_tokens}; "
                    f"{calls} calls and {tokens} tokens used or in flight); {call} was not made",
                    extension_id=budget.extension_id,
                    limit=exceeded[0].value,
                )
            if budget.max_tokens is not None:
                reserved = estimate + max_tokens
        self.calls_in_flight += 1
        self.tokens_in_flight += reserved
        return reserved

    def settle(self, reserved: int, used_tokens: int) -> list[BudgetLimit]:
        """A reserved call was made: count it with the tokens it used. Returns the limits now exceeded (the flags
        of its event)."""
        self.calls_in_flight -= 1
        self.calls += 1
        self.tokens += used_tokens
        if self.budget is None:  # the hot path: nothing reserved, nothing to flag
            return []
        self.tokens_in_flight -= reserved
        return limits_exceeded_after(self.budget, self.calls, self.tokens)
