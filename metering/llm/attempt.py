"""One provider call in progress (shared by create_message and stream_message)."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from metering.llm.resolution import Target


class Attempt(NamedTuple):
    """One provider call in progress: what its usage event needs besides the outcome."""

    target: Target
    attempt: int  # 0 for the first target, 1 for the platform fallback of a BYOLLM call
    purpose: str
    occurred_at: datetime
    started: float  # perf_counter at the start of the call
    max_tokens: int
    fingerprint: str
    is_stream: bool = False
    reserved_tokens: int = 0  # reserved against an enforced token budget (see BudgetTracker)
