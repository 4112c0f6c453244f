"""A deterministic, offline provider: the embedded default when no platform key is set, and the
benchmark's zero-latency backend.

The answer is derived from the request (same request → same answer), labelled ``[simulated] ``, and
its usage is "reported" from the same estimates the metering wrapper would make. With zero latency no
``asyncio.sleep`` is awaited at all, so ``complete`` costs a few microseconds. A model name containing
``unavailable`` fails like a provider outage (used to demonstrate and test BYOLLM failover).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from metering.config import SimulatedSettings
from metering.errors import ProviderError
from metering.events import UsageCompleteness
from metering.llm.providers.base import ErrorType
from metering.llm.types import ProviderRequest, ProviderResult, StreamEnd, StreamItem, TextDelta, TokenUsage
from metering.llm.usage import CHARS_PER_TOKEN, estimate_input_tokens, estimate_tokens

NAME = "simulated"
LABEL = "[simulated] "
UNAVAILABLE = "unavailable"
WORDS_PER_CHUNK = 3
CONCISE_MAX_WORDS = 24
FILLER = frozenset({"please", "just", "really", "very", "actually", "basically", "kindly", "quite", "simply"})
CONTRACTIONS = (
    ("can't", "cannot"),
    ("won't", "will not"),
    ("n't", " not"),
    ("I'm", "I am"),
    ("it's", "it is"),
    ("we're", "we are"),
    ("you're", "you are"),
    ("let's", "let us"),
    ("'ll", " will"),
    ("'ve", " have"),
)
# Tone words looked for in the system prompt, first match wins.
TONES = ("concise", "formal", "casual", "friendly", "apologetic")
NOT_OWNERS = frozenset(
    {
        "the",
        "a",
        "an",
        "we",
        "i",
        "please",
        "let",
        "it",
        "this",
        "that",
        "there",
        "someone",
        "everyone",
        "also",
        "then",
        "next",
        "and",
        "but",
        "so",
        "our",
        "my",
        "all",
    }
)
MODALS = (
    ("needs", "to"),
    ("need", "to"),
    ("has", "to"),
    ("have", "to"),
    ("will",),
    ("should",),
    ("must",),
    ("shall",),
    ("can",),
    ("to",),
)
SUBJECTS = frozenset({"we", "i", "you", "they", "someone", "everyone"})  # no owner, not part of the task
DEADLINE_WORDS = frozenset(
    {
        "today",
        "tonight",
        "tomorrow",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
        "eod",
        "eow",
        "asap",
    }
)


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role", "user") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(str(b.get("text", "")) for b in content if isinstance(b, Mapping))
    return ""


def _sentence_end(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def rewrite(system: str, text: str) -> str:
    """A light, deterministic 'rewrite' of ``text`` in the tone the system prompt asks for."""
    text = " ".join(text.split())
    lowered = system.lower()
    tone = "casual" if "informal" in lowered else next((t for t in TONES if t in lowered), None)
    if tone == "formal":
        for short, long in CONTRACTIONS:
            text = text.replace(short, long)
        text = _sentence_end(text[:1].upper() + text[1:]) if text else text
    elif tone == "casual":
        text = "hey, " + text[:1].lower() + text[1:] if text else text
    elif tone == "concise":
        words = [w for w in text.split(" ") if w.lower().strip(",.") not in FILLER]
        text = " ".join(words[:CONCISE_MAX_WORDS])
    elif tone == "friendly":
        text = f"Hi there! {text} Thanks so much!"
    elif tone == "apologetic":
        text = f"I'm so sorry for the trouble. {text} Apologies again."
    variation = lowered.rpartition("variation ")[2].strip(" .") if "variation " in lowered else ""
    if variation.isdigit():
        text = f"{text} (variation {variation})"
    return text


def _action_item(sentence: str) -> dict[str, str | None] | None:
    words = sentence.split()
    if len(words) < 2:
        return None
    first = words[0].lower()
    owner = words[0] if words[0][:1].isupper() and first not in NOT_OWNERS else None
    rest = words[1:] if owner or first in SUBJECTS else words
    lowered = [w.lower() for w in rest]
    for modal in MODALS:
        if tuple(lowered[: len(modal)]) == modal:
            rest, lowered = rest[len(modal) :], lowered[len(modal) :]
            break
    deadline: str | None = None
    if "by" in lowered[1:]:
        cut = len(lowered) - 1 - lowered[::-1].index("by")
        deadline, rest = " ".join(rest[cut + 1 :]) or None, rest[:cut]
    else:
        for i, word in enumerate(lowered):
            if word.strip(",") in DEADLINE_WORDS:
                deadline = rest[i].strip(",")
                rest = rest[:i] + rest[i + 1 :]
                break
    task = " ".join(rest)
    return {"owner": owner, "deadline": deadline, "task": task} if task else None


def action_items(text: str) -> list[dict[str, str | None]]:
    """One item per sentence of ``text``: owner (a leading name), deadline ('by …' or a day), task."""
    sentences = text.replace("!", ".").replace("?", ".").replace("\n", ".").split(".")
    items = (_action_item(s.strip()) for s in sentences)
    return [item for item in items if item is not None]


def answer_text(request: ProviderRequest) -> str:
    system = request.system or ""
    user_text = _last_user_text(request.messages)
    if request.response_format == "json":
        if "action item" in system.lower():
            payload: dict[str, Any] = {"items": action_items(user_text), "simulated": True}
        else:
            payload = {"text": rewrite(system, user_text), "simulated": True}
        return json.dumps(payload, ensure_ascii=False)
    return LABEL + rewrite(system, user_text)


class SimulatedProvider:
    name = NAME

    def __init__(self, settings: SimulatedSettings | None = None) -> None:
        settings = settings or SimulatedSettings()
        self._ttft_s = settings.ttft_ms / 1000.0  # before the first stream chunk
        self._latency_s = max(settings.latency_ms, settings.ttft_ms) / 1000.0  # the whole call

    def _check(self, request: ProviderRequest) -> None:
        if UNAVAILABLE in request.model:
            raise ProviderError(
                f"simulated: model {request.model!r} is unavailable (simulated outage)",
                error_type=ErrorType.SERVER_ERROR.value,
                provider=NAME,
                retryable=True,
            )

    def _answer(self, request: ProviderRequest) -> tuple[str, TokenUsage, str]:
        text = answer_text(request)
        stop_reason = "end_turn"
        output_tokens = estimate_tokens(text)
        if output_tokens > request.max_tokens:
            text = text[: request.max_tokens * CHARS_PER_TOKEN]
            output_tokens = estimate_tokens(text)
            stop_reason = "max_tokens"
        usage = TokenUsage(
            input_tokens=estimate_input_tokens(request.system, request.messages),
            output_tokens=output_tokens,
            completeness=UsageCompleteness.REPORTED,
        )
        return text, usage, stop_reason

    async def complete(self, request: ProviderRequest) -> ProviderResult:
        self._check(request)
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        text, usage, stop_reason = self._answer(request)
        return ProviderResult(text=text, usage=usage, stop_reason=stop_reason, model=request.model)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[StreamItem]:
        self._check(request)
        text, usage, stop_reason = self._answer(request)
        words = text.split(" ")
        chunks = [" ".join(words[i : i + WORDS_PER_CHUNK]) for i in range(0, len(words), WORDS_PER_CHUNK)]
        chunks = [c + " " for c in chunks[:-1]] + chunks[-1:]
        pause = (self._latency_s - self._ttft_s) / len(chunks) if chunks and self._latency_s > self._ttft_s else 0.0
        if self._ttft_s:
            await asyncio.sleep(self._ttft_s)
        for n, chunk in enumerate(chunks):
            if n and pause:
                await asyncio.sleep(pause)
            yield TextDelta(chunk)
        if pause:
            await asyncio.sleep(pause)
        yield StreamEnd(usage=usage, stop_reason=stop_reason, model=request.model)

    async def aclose(self) -> None:
        return None
