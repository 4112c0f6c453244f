"""The one interface every provider adapter implements.

Only modules under ``metering.llm.providers`` import provider SDKs. Adapters:
- normalise raw usage once (via ``metering.llm.usage``), returning ``TokenUsage``;
- raise ``metering.errors.ProviderError`` with a bounded ``error_type`` (see ``ErrorType``) and a
  message that never contains the api key;
- never record events: the metering wrapper (``metering.llm.client``) does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from metering.events import MAX_SHORT_TEXT
from metering.llm.types import ProviderRequest, ProviderResult, StreamItem


class ErrorType(StrEnum):
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    AUTH = "auth"
    BAD_REQUEST = "bad_request"
    STREAM_BROKEN = "stream_broken"
    INVALID_RESPONSE = "invalid_response"
    SECRET_ERROR = "secret_error"  # a BYOLLM key METERING_SECRET_KEYS cannot decrypt: the call was never made
    UNKNOWN = "unknown"


def bounded_stop_reason(value: object) -> str | None:
    """A provider's stop reason as the usage event can hold it (``ShortText``), or ``None`` if it is not text.

    An OpenAI-compatible server may send any ``finish_reason``: one too long, holding NUL or a lone surrogate
    would get the event of a call that was made dead-lettered (or its line not written), so it is cut to
    ``MAX_SHORT_TEXT`` characters, without NUL, with what is not valid Unicode replaced.
    """
    if not isinstance(value, str) or not value:
        return None
    if len(value) <= MAX_SHORT_TEXT and value.isascii() and "\x00" not in value:
        return value
    cleaned = value.replace("\x00", "").encode("utf-8", "replace").decode()[:MAX_SHORT_TEXT]
    return cleaned or None


def text_of(value: object) -> str:
    """A reply's (or a stream delta's) text as a ``str``, whatever shape an OpenAI-compatible server gives it.

    A ``str`` is itself; a list of content parts (Mistral's reasoning models answer ``[{"type": "thinking", ...},
    {"type": "text", "text": "..."}]``) is the text of its ``text`` parts; anything else (``None``, a number) is ``""``.
    Anything but a ``str`` reaching metering failed the call after it was made, without its event.
    """
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        return ""
    texts: list[str] = []
    for part in value:
        text = _field(part, "text")
        if _field(part, "type") == "text" and isinstance(text, str):
            texts.append(text)
    return "".join(texts)


def thinking_of(value: object) -> str:
    """The reasoning in a list of content parts, not the reply's text: Mistral's reasoning models send it as ``{"type":
    "thinking", "thinking": [{"type": "text", "text": "..."}]}`` parts; ``""`` for anything else."""
    if not isinstance(value, list):
        return ""
    texts: list[str] = []
    for part in value:
        if _field(part, "type") == "thinking":
            thinking = _field(part, "thinking")
            texts.append(thinking if isinstance(thinking, str) else text_of(thinking))
    return "".join(texts)


def _field(part: object, key: str) -> object:
    return part.get(key) if isinstance(part, Mapping) else getattr(part, key, None)


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """Everything an adapter needs to reach a provider. ``repr`` never shows the key."""

    provider: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 2


class Provider(Protocol):
    name: str

    async def complete(self, request: ProviderRequest) -> ProviderResult:
        """One non-streamed call."""
        ...

    def stream(self, request: ProviderRequest) -> AsyncIterator[StreamItem]:
        """Yield ``TextDelta`` items, then exactly one ``StreamEnd`` when the provider finished.

        ``UsageSoFar`` items may come in between: usage the provider reported before the end, which the caller
        keeps for the event if the stream does not end normally.

        A stream broken by the provider raises ``ProviderError(error_type="stream_broken")`` after the
        deltas already received; the caller then estimates usage from what it saw.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
