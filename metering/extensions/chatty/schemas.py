"""Parameters of the chatty extension's functions."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MAX_MESSAGE_CHARS = 4_000
Message = Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]


class SummarizeThreadParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "2" is not 2, true is not 1

    # No max_length on the list: one LLM call per message, so the number of calls grows with the thread (unbounded,
    # the point of this demo). Each message is bounded, like the rewrite functions' texts.
    messages: list[Message] = Field(
        min_length=1, description=f"The thread's messages, oldest first, each at most {MAX_MESSAGE_CHARS:,} characters."
    )
    polish_rounds: int = Field(
        8, ge=0, le=50, description="How many times to ask the LLM to improve the summary until it stops changing."
    )
