"""Parameters of the rewrite extension's functions."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Tone = Literal["formal", "casual", "concise", "friendly", "apologetic"]
# What one reply of max_tokens=1500 (the recipe's) can hold, with margin: ~1,000 tokens of English at ~4 characters
# a token, and a rewrite may be longer than its text (a formal tone expands contractions, a friendly one adds a
# greeting). Chat messages are short. The rewrites used to accept 20,000 characters, and a long text's rewrite was
# cut off at 1,500 tokens and returned as a success; a reply still cut off (a script with more tokens per character)
# is flagged `truncated` in the result.
MAX_REWRITE_CHARS = 4_000
# extract_action_items sizes its max_tokens from the text (see handlers.action_items_max_tokens); the worst case is
# many tiny tasks ("Al z." is 5 characters and ~20 tokens of JSON), so the text is bounded such that it fits 16,384.
MAX_ACTION_ITEMS_CHARS = 3_200
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})  # controls, format (U+200B, U+FEFF, ...), separators
# Blank characters Unicode files as letters or symbols: the Hangul fillers and the braille blank.
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_blank(text: str) -> bool:
    """Only whitespace or invisible characters (or nothing at all); stops at the first visible character."""
    return all(char.isspace() or char in _BLANK_GLYPHS or unicodedata.category(char) in _INVISIBLE for char in text)


def _not_blank(text: str) -> str:
    """Refuse a text with nothing to rewrite: only whitespace or invisible characters (it made a billed call)."""
    if is_blank(text):
        raise ValueError("the text is blank (only whitespace or invisible characters)")
    return text


def _text(max_length: int, description: str) -> Any:
    return Field(min_length=1, max_length=max_length, description=f"{description} 1 to {max_length:,} characters.")


VisibleText = Annotated[str, AfterValidator(_not_blank)]


class RewriteParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not 3, "no" is not false

    text: VisibleText = _text(MAX_REWRITE_CHARS, "The text to rewrite.")
    tone: Tone = Field(description="Target tone.")
    keep_meaning: bool = Field(
        True,
        description="Preserve the original meaning. Set false if the user wants the AI to also restructure ideas.",
    )


class RewriteMultipleParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not 3, "no" is not false

    text: VisibleText = _text(MAX_REWRITE_CHARS, "Text to rewrite.")
    tone: Literal["formal", "casual"] = Field(description="Tone.")
    n_variations: int = Field(3, ge=1, le=5, description="Number of rewrites to generate (1 to 5).")


class ExtractActionItemsParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "3" is not 3, "no" is not false

    text: VisibleText = _text(MAX_ACTION_ITEMS_CHARS, "Text to extract action items from.")


def _task_not_blank(task: str) -> str:
    """A task with nothing visible in it says nothing to do: the item is as malformed as one without a task."""
    if is_blank(task):
        raise ValueError("the task is blank (only whitespace or invisible characters)")
    return task


def _blank_is_null(value: str | None) -> str | None:
    """An owner or deadline with nothing visible in it is none (a model's ``""`` for "no owner"): ``None``, as the
    model's own ``null`` or no field, so a caller tells "none" one way."""
    return None if value is None or is_blank(value) else value


OptionalText = Annotated[str | None, AfterValidator(_blank_is_null)]


class ActionItem(BaseModel):
    owner: OptionalText = None
    deadline: OptionalText = None
    task: Annotated[str, AfterValidator(_task_not_blank)]
