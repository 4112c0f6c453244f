"""What ``ctx.llm.create_message`` returns, and JSON parsing of model output (pure)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from metering.errors import InvalidJSONResponseError
from metering.llm.types import ResponseFormat, TokenUsage


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


def parse_json_text(text: str) -> Any:
    """Parse a model's JSON answer, tolerating a surrounding Markdown code fence."""
    candidate = text.strip()
    if candidate.startswith("```"):
        first_newline = candidate.find("\n")
        candidate = candidate[first_newline + 1 :] if first_newline != -1 else ""
        if candidate.rstrip().endswith("```"):
            candidate = candidate.rstrip()[:-3]
    try:
        return json.loads(candidate)
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
    except RecursionError:  # a reply such as "[[[[…" nested deeper than the interpreter's stack
        reason = "nested too deeply"
    raise InvalidJSONResponseError(
        f"response_format='json' was requested but the model's reply is not valid JSON ({reason}); "
        f"the raw text is on the error's .text attribute",
        text=text,
    )
