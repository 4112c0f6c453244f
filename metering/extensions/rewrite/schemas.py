"""Parameters of the rewrite extension's functions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Tone = Literal["formal", "casual", "concise", "friendly", "apologetic"]
MAX_TEXT_CHARS = 20_000


class RewriteParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not 3, "no" is not false

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="The text to rewrite.")
    tone: Tone = Field(description="Target tone.")
    keep_meaning: bool = Field(
        True,
        description="Preserve the original meaning. Set false if the user wants the AI to also restructure ideas.",
    )


class RewriteMultipleParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not 3, "no" is not false

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="Text to rewrite.")
    tone: Literal["formal", "casual"] = Field(description="Tone.")
    n_variations: int = Field(3, ge=1, le=5, description="Number of rewrites to generate (1 to 5).")


class ExtractActionItemsParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not 3, "no" is not false

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="Text to extract action items from.")


class ActionItem(BaseModel):
    owner: str | None = None
    deadline: str | None = None
    task: str
