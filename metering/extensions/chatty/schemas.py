"""Parameters of the chatty extension's functions."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_MESSAGE_CHARS = 4_000


class SummarizeThreadParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # No max_length: one LLM call per message, so the number of calls grows with the thread (unbounded).
    messages: list[str] = Field(min_length=1, description="The thread's messages, oldest first.")
    polish_rounds: int = Field(
        8, ge=0, le=50, description="How many times to ask the LLM to improve the summary until it stops changing."
    )
