"""What ``ctx.llm.create_message`` returns, and JSON parsing of model output (pure)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from metering.errors import InvalidJSONResponseError
from metering.llm.text import clean_json_value
from metering.llm.types import CUT_OFF_STOPS, STOP_CONTEXT_WINDOW, STOP_MAX_TOKENS, ResponseFormat, TokenUsage


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 µs on the metered hot path
class LLMResponse:
    text: str
    provider: str
    model: str
    is_byollm: bool
    stop_reason: str | None
    usage: TokenUsage
    event_id: str
    response_format: ResponseFormat = None
    parsed: Any = field(default=None, repr=False)

    @property
    def json(self) -> Any:
        """The parsed JSON value when ``response_format="json"`` was asked for, else ``None``."""
        return self.parsed

    @property
    def truncated(self) -> bool:
        """Whether the reply was cut off, by ``max_tokens`` or where the model's context window ran out (its stop
        reason says so: ``CUT_OFF_STOPS``): the text is incomplete."""
        return self.stop_reason in CUT_OFF_STOPS


_FENCE = "```"
# The info string after an opening fence (```json, ```JSON5), on the fence's line: removed when followed by a space or
# a line end. A bare JSON literal (```true```) is the answer, not an info string.
_INFO_STRING = re.compile(r"[A-Za-z][\w+.#-]*(?=\s|$)")
_JSON_LITERALS = frozenset({"true", "false", "null"})
_JSON_STARTS = frozenset('{["-0123456789')
# Stop reasons of a reply that ended as the model meant it to (or of one cut off by max_tokens, reported on its own).
_FINISHED = frozenset({None, "end_turn", "stop_sequence", STOP_MAX_TOKENS})


def _unfenced(text: str) -> str:
    """The content of a Markdown code fence around the whole (stripped) reply, on one line or several."""
    if not text.startswith(_FENCE):
        return text
    body = text[len(_FENCE) :]
    if body.endswith(_FENCE):
        body = body[: -len(_FENCE)]
    first, newline, rest = body.partition("\n")
    head = _without_info_string(first.strip())
    if newline and not _starts_json(head):  # the fence's own line: all of it goes (```json title="x", ```json:output)
        return rest
    return head + newline + rest  # the JSON starts on the fence's line (```json {...}```, ```{\n...}```)


def _without_info_string(line: str) -> str:
    info = _INFO_STRING.match(line)
    if info is None or info.group() in _JSON_LITERALS:
        return line
    return line[info.end() :].lstrip(" \t")


def _starts_json(line: str) -> bool:
    return line[:1] in _JSON_STARTS or (line.split(maxsplit=1) or [""])[0] in _JSON_LITERALS


def _fenced_block(text: str) -> str | None:
    """The one fenced block of a reply with prose around it ("Here are the items:\n```json\n{...}\n```\nHope this
    helps."); none when the reply holds no complete block, or several (which one is the answer would be a guess)."""
    if text.count(_FENCE) != 2:
        return None
    start = text.index(_FENCE)
    return text[start : text.index(_FENCE, start + len(_FENCE)) + len(_FENCE)]


def _loads(candidate: str) -> tuple[Any, str | None]:
    """The parsed value, or why it is not JSON."""
    try:
        value = json.loads(candidate)
    except ValueError as exc:
        return None, exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
    except RecursionError:  # a reply such as "[[[[…" nested deeper than the interpreter's stack
        return None, "nested too deeply"
    # "\ud83d" escaped alone in the JSON is a lone surrogate once parsed: no caller could encode it.
    return (clean_json_value(value) if "\\u" in candidate else value), None


def parse_json_text(text: str, *, cut_off_at: int | None = None, stop_reason: str | None = None) -> Any:
    """Parse a model's JSON answer, tolerating a surrounding Markdown code fence.

    The fence may be on its own lines (```json, the JSON, ```) or on the answer's one line (```json {...}```,
    ```{...}```), and prose may come before or after it when the reply holds that one fenced block.
    ``cut_off_at``: the ``max_tokens`` the reply stopped at (its stop reason was ``max_tokens``), so that an error
    says the JSON was cut off rather than only where its parser gave up; so does the error of a reply cut off where
    the model's context window ran out (its ``stop_reason``). ``stop_reason``: the reply's; one other than a normal
    finish or a cut-off (a content filter, a refusal) is named in the error, the likely reason there is no JSON.
    """
    stripped = text.strip()
    candidate = _unfenced(stripped)
    value, reason = _loads(candidate)
    if reason is None:
        return value
    if not candidate.strip():  # nothing, or an empty fence: json's "Expecting value" reads as something unreadable
        reason = "the reply is empty"
    block = _fenced_block(stripped)
    if block is not None and block != stripped:
        value, block_reason = _loads(_unfenced(block))
        if block_reason is None:
            return value
    if cut_off_at is not None:
        reason = f"{reason}: the reply was cut off at max_tokens={cut_off_at}, its stop reason"
    elif stop_reason == STOP_CONTEXT_WINDOW:
        reason = f"{reason}: the reply was cut off where the model's context window ran out, its stop reason"
    elif stop_reason not in _FINISHED:
        reason = f"{reason}: the provider stopped the reply, its stop reason {stop_reason!r}"
    raise InvalidJSONResponseError(
        f"response_format='json' was requested but the model's reply is not valid JSON ({reason}); "
        f"the raw text is on the error's .text attribute",
        text=text,
    )
