"""Plain data passed between the ctx.llm surface and the provider adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from metering.events import UsageCompleteness

ResponseFormat = Literal["json"] | None
STOP_MAX_TOKENS = "max_tokens"  # the stop reason of a reply cut off by max_tokens (OpenAI's "length" is mapped to it)
# the stop reason of a reply cut off because the model's context window ran out (the prompt and the reply filled it,
# before max_tokens): Anthropic's; Mistral's "model_length" is mapped to it
STOP_CONTEXT_WINDOW = "model_context_window_exceeded"
CUT_OFF_STOPS = frozenset({STOP_MAX_TOKENS, STOP_CONTEXT_WINDOW})  # a reply so stopped is incomplete: truncated
STOP_REFUSAL = "refusal"  # the model refused (Anthropic's; an OpenAI refusal, in message.refusal, is given it)


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Normalised token counts (OpenTelemetry GenAI semantics, see metering.events)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    completeness: UsageCompleteness = UsageCompleteness.REPORTED
    cache_write_1h_tokens: int = 0  # part of cache_write_tokens
    web_searches: int = 0  # server-side searches the provider charges per search

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


MISSING_USAGE = TokenUsage(completeness=UsageCompleteness.MISSING)


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 µs on the metered hot path
class ProviderRequest:
    model: str
    system: str | None
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float | None = None
    response_format: ResponseFormat = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """What a finished (non-streamed) provider call returned."""

    text: str
    usage: TokenUsage
    stop_reason: str | None
    model: str  # the model the provider says served the call
    # An OpenAI refusal's message (``message.refusal``; the stop reason is then STOP_REFUSAL): not the reply's text,
    # but output the provider charges, so an estimate of usage the provider did not report counts it.
    refusal: str = ""


@dataclass(frozen=True, slots=True)
class TextDelta:
    """One chunk of a streamed response."""

    text: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """Last item of a provider stream: what the provider reported (usage may be MISSING_USAGE)."""

    usage: TokenUsage
    stop_reason: str | None
    model: str


@dataclass(frozen=True, slots=True)
class UsageSoFar:
    """Usage a provider reported before its stream ended (Anthropic's ``message_start``: the input and cache counts,
    the output so far; an OpenAI usage chunk before the end of the body). Kept for the event of a stream that does not
    end normally: the provider counted (and charges) that input whether or not the stream ends. ``output_final``: the
    output count is the provider's last word (Anthropic's ``message_delta``, OpenAI's usage chunk, both sent after the
    last text), not a count so far (``message_start``'s placeholder)."""

    usage: TokenUsage
    output_final: bool = False


NO_USAGE_SO_FAR = UsageSoFar(MISSING_USAGE)


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Reasoning text a provider streams beside the reply (an OpenAI-compatible server's ``reasoning_content`` or
    ``reasoning``): never handed to the consumer, but output the provider charges, so it counts in the estimate of a
    stream whose usage the provider did not report (abandoned, broken, or a server that ignores ``include_usage``)."""

    text: str


@dataclass(frozen=True, slots=True)
class RefusalDelta:
    """A chunk of an OpenAI refusal's message (``delta.refusal``; the stream ends with the stop reason STOP_REFUSAL):
    not the reply's text, never handed to the consumer, but output the provider charges, counted like reasoning in
    the estimate of a stream whose usage the provider did not report."""

    text: str


StreamItem = TextDelta | UsageSoFar | ReasoningDelta | RefusalDelta | StreamEnd
