"""Provider raw usage → TokenUsage, normalised once (pure; no I/O).

OpenTelemetry GenAI semantics: ``input_tokens`` includes cache-read and cache-write tokens;
``reasoning_tokens`` is part of ``output_tokens``.

- Anthropic reports ``input_tokens`` *excluding* cache tokens, with ``cache_read_input_tokens`` and
  ``cache_creation_input_tokens`` beside it; thinking tokens are inside ``output_tokens`` and not
  reported apart.
- OpenAI (and OpenAI-compatible servers) report ``prompt_tokens`` *including* cached tokens
  (``prompt_tokens_details.cached_tokens``; newer APIs also give ``cache_write_tokens`` there) and
  ``completion_tokens`` including
  ``completion_tokens_details.reasoning_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from metering.events import UsageCompleteness
from metering.llm.types import MISSING_USAGE, TokenUsage

CHARS_PER_TOKEN = 4


def _int(value: Any) -> int:
    if value is None or isinstance(value, bool):
        return 0
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def from_anthropic(usage: Any) -> TokenUsage:
    """Normalise an Anthropic ``usage`` object or dict (``None`` → MISSING)."""
    if usage is None:
        return MISSING_USAGE
    uncached = _int(_get(usage, "input_tokens"))
    cache_read = _int(_get(usage, "cache_read_input_tokens"))
    cache_write = _int(_get(usage, "cache_creation_input_tokens"))
    return TokenUsage(
        input_tokens=uncached + cache_read + cache_write,
        output_tokens=_int(_get(usage, "output_tokens")),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=0,
        completeness=UsageCompleteness.REPORTED,
    )


def from_openai(usage: Any) -> TokenUsage:
    """Normalise an OpenAI chat-completions ``usage`` object or dict (``None`` → MISSING)."""
    if usage is None:
        return MISSING_USAGE
    prompt = _int(_get(usage, "prompt_tokens"))
    completion = _int(_get(usage, "completion_tokens"))
    prompt_details = _get(usage, "prompt_tokens_details")
    cached = min(_int(_get(prompt_details, "cached_tokens")), prompt)
    cache_write = min(_int(_get(prompt_details, "cache_write_tokens")), prompt - cached)
    reasoning = min(_int(_get(_get(usage, "completion_tokens_details"), "reasoning_tokens")), completion)
    return TokenUsage(
        input_tokens=prompt,
        output_tokens=completion,
        cache_read_tokens=cached,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
        completeness=UsageCompleteness.REPORTED,
    )


def estimate_tokens(text: str) -> int:
    """A provider-agnostic estimate: about four characters per token, at least one for any text."""
    if not text:
        return 0
    return max(1, (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN)


def _message_text(messages: Iterable[Mapping[str, Any]]) -> str:
    parts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(block.get("text", "")) for block in content if isinstance(block, Mapping))
    return "\n".join(parts)


def estimate_input_tokens(system: str | None, messages: Iterable[Mapping[str, Any]]) -> int:
    return estimate_tokens((system or "") + _message_text(messages))


def estimated(system: str | None, messages: Iterable[Mapping[str, Any]], output_text: str) -> TokenUsage:
    """Usage estimated from what was sent and what was received, marked ``estimated``."""
    return TokenUsage(
        input_tokens=estimate_input_tokens(system, messages),
        output_tokens=estimate_tokens(output_text),
        completeness=UsageCompleteness.ESTIMATED,
    )


def fill_missing(
    usage: TokenUsage, system: str | None, messages: Iterable[Mapping[str, Any]], output_text: str
) -> TokenUsage:
    """Keep reported usage; replace MISSING usage by an estimate when anything was produced."""
    if usage.completeness is not UsageCompleteness.MISSING:
        return usage
    if not output_text:
        return usage
    return estimated(system, messages, output_text)
