"""Adapter for Anthropic's Messages API, through the official ``anthropic`` SDK."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

import anthropic

from metering.errors import ProviderError
from metering.events import UsageCompleteness
from metering.llm.providers._errors import (
    BODY_DECODE_ERRORS,
    STREAM_TRANSPORT_ERRORS,
    from_sdk_error,
    incomplete_stream,
    invalid_response,
    stream_broken,
    usable_client,
)
from metering.llm.providers.base import ProviderConfig, bounded_stop_reason, text_of
from metering.llm.providers.params import ANTHROPIC_BODY_PARAMS as BODY_PARAMS  # the one list the settings store checks
from metering.llm.providers.urls import config_problem
from metering.llm.types import (
    MISSING_USAGE,
    ProviderRequest,
    ProviderResult,
    StreamEnd,
    StreamItem,
    TextDelta,
    TokenUsage,
    UsageSoFar,
)
from metering.llm.usage import from_anthropic

log = logging.getLogger("metering.llm.providers")

JSON_INSTRUCTION = "Respond with a single valid JSON value and nothing else."
PLACEHOLDER_KEY = "not-needed"  # a keyless endpoint (a proxy via base_url); never let the SDK read env keys
# the counts, and the objects that hold details (cache writes by TTL, server tool use: cumulative in message_delta)
_USAGE_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cache_creation",
    "server_tool_use",
)
_NESTED_COUNTS = {
    "cache_creation": ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"),
    "server_tool_use": ("web_search_requests", "web_fetch_requests"),
}
_ERRORS: tuple[type[BaseException], ...] = (anthropic.AnthropicError, *STREAM_TRANSPORT_ERRORS, *BODY_DECODE_ERRORS)


def _text(content: Any) -> str:
    """A message's text: a tuple of content parts (ctx.llm takes one as an array) as a list's."""
    return text_of(list(content) if isinstance(content, tuple) else content)


def _system_and_messages(request: ProviderRequest) -> tuple[str | None, list[dict[str, Any]]]:
    """Anthropic takes the system prompt apart: fold any ``system``-role messages into it, as their text (a list of
    content parts, OpenAI's shape, is the text of its ``text`` parts: it was folded in as the list's Python repr)."""
    system, messages = request.system, request.messages
    if any(message.get("role") == "system" for message in messages):
        extra = [text for m in messages if m.get("role") == "system" and (text := _text(m.get("content")))]
        system = "\n\n".join([system, *extra] if system else extra)
        messages = [m for m in messages if m.get("role") != "system"]
    if request.response_format == "json":
        system = f"{system}\n\n{JSON_INSTRUCTION}" if system else JSON_INSTRUCTION
    return system, messages


def _usage_count(usage: Any, key: str) -> Any:
    return usage.get(key) if isinstance(usage, Mapping) else getattr(usage, key, None)


def _merge_usage(
    into: dict[str, Any],
    usage: Any,
    *,
    output_final: bool = False,
    searches_seen: int = 0,
    searches_final: bool = False,
) -> UsageSoFar | None:
    """Stream usage: message_start carries input (and cache) counts, message_delta cumulative output and server tool
    use (e.g. web searches), and, from the API today, the input counts again (cumulative too, they never fall below
    message_start's). Each key given replaces what came before; a nested object (``cache_creation``,
    ``server_tool_use``) is kept as it is, for ``from_anthropic`` to read.

    An input count of 0 after one that was not (a gateway's 0 for an input count it does not know, in message_delta)
    is no count: the earlier one is kept. So is a nested object whose counts are all 0 after one whose counts were not
    (a gateway's zeros for the cache writes by TTL), and a cache writes' total of 0 after their breakdown alone, which
    stood in for it. A count after a 0 (a gateway counting only at the end) replaces it.
    Returns the usage reported so far, when it holds usable counts (an output count not given yet is 0).
    """
    if usage is None:
        return None
    for key in _USAGE_KEYS:
        value = _usage_count(usage, key)
        if value is None or (
            key != "output_tokens" and _is_zero(key, value) and not _is_zero(key, _earlier(into, key))
        ):
            continue
        into[key] = value
    return _usage_so_far(into, output_final, searches_seen, searches_final)


def _earlier(into: dict[str, Any], key: str) -> Any:
    """What a stream has given for ``key`` so far (0 for nothing). The cache writes' total not given yet is their
    breakdown (``from_anthropic`` sums it in its stead), so a 0 for it later does not drop the writes."""
    if key == "cache_creation_input_tokens" and key not in into:
        return 0 if _is_zero("cache_creation", into.get("cache_creation", 0)) else 1
    return into.get(key, 0)


def _is_zero(key: str, value: Any) -> bool:
    """A count of 0, or a nested object (``cache_creation``, ``server_tool_use``) whose counts are all 0 or absent."""
    fields = _NESTED_COUNTS.get(key)
    if fields is None:
        return bool(value == 0)
    return all(not _usage_count(value, field) for field in fields)


def _usage_so_far(
    into: dict[str, Any], output_final: bool, searches_seen: int, searches_final: bool
) -> UsageSoFar | None:
    """The usage reported so far, if usable (its web searches as ``_with_searches``), or, when the stream has given no
    usage at all, the searches it showed (the provider charges them; the tokens are estimated at the end). Usage given
    but not usable yields nothing: the last usable usage stands."""
    so_far = _with_searches(from_anthropic({"output_tokens": 0, **into}), searches_seen, searches_final)
    if so_far.completeness is not UsageCompleteness.REPORTED and (into or not so_far.web_searches):
        return None
    return UsageSoFar(so_far, output_final)


def _with_searches(usage: TokenUsage, searches_seen: int, searches_final: bool) -> TokenUsage:
    """The web searches of reported usage, one rule for a stream and for a message. Until the usage gives the
    provider's search count (``searches_final``, ``_gives_searches``: a stream's message_delta, a message's usage), the
    web searches are at least those whose results were shown (``searches_seen``, ``_is_web_search_result``): a stream
    gets the count only at the end, and the provider charges them whether or not the stream gets there; a gateway may
    pass on only the counts it knows (a message_delta with the output count and no ``server_tool_use``, a message's
    usage without it). Usage not given at all (``MISSING``) carries them too: its estimate keeps them
    (``usage.fill_missing``)."""
    if searches_final or usage.web_searches >= searches_seen:
        return usage
    return replace(usage, web_searches=searches_seen)


def _gives_searches(usage: Any) -> bool:
    """Whether a usage (a message's, a stream's message_delta) gives the provider's search count: one that is not 0 (a
    0 after search results the reply showed is a gateway's 0 for a count it does not know: the provider charges them;
    with none shown, the searches are 0 either way)."""
    count = _usage_count(_usage_count(usage, "server_tool_use"), "web_search_requests")
    return count is not None and count != 0


def _is_web_search_result(block: Any) -> bool:
    """A web search the provider ran and charges: its result block, a list of results (a failed search's is an error
    object instead, and is not charged)."""
    return getattr(block, "type", None) == "web_search_tool_result" and isinstance(
        getattr(block, "content", None), list
    )


class AnthropicProvider:
    """One ``AsyncAnthropic`` client (one connection pool) per endpoint and key; the model is per request."""

    name = "anthropic"

    def __init__(self, config: ProviderConfig) -> None:
        self._api_key = config.api_key
        self._keyless = not config.api_key and not config.base_url
        self._config_problem = config_problem(config.base_url, config.api_key)
        self._client = None
        if self._config_problem is None:
            self._client = anthropic.AsyncAnthropic(
                api_key=config.api_key or PLACEHOLDER_KEY,
                base_url=config.base_url,
                timeout=config.timeout_s,
                max_retries=config.max_retries,
            )

    def _sdk(self) -> anthropic.AsyncAnthropic:
        """The SDK client, or the ProviderError of a configuration no call can be made with."""
        return usable_client(self.name, self._client, self._config_problem, self._api_key, self._keyless)

    def _kwargs(self, request: ProviderRequest) -> dict[str, Any]:
        system, messages = _system_and_messages(request)
        kwargs: dict[str, Any] = {"model": request.model, "max_tokens": request.max_tokens, "messages": messages}
        if system:
            kwargs["system"] = system
        params = request.params
        if (stop := params.get("stop_sequences")) is not None:  # one text is one sequence, not its characters
            kwargs["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        body = {key: params[key] for key in BODY_PARAMS if params.get(key) is not None}
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if body:
            kwargs["extra_body"] = body
        dropped = set(params) - {"stop_sequences", *BODY_PARAMS}
        if dropped:
            log.debug("anthropic: ignoring unsupported params %s", sorted(dropped))
        return kwargs

    def _error(self, exc: BaseException) -> ProviderError:
        return from_sdk_error(exc, anthropic, provider=self.name, api_key=self._api_key)

    async def complete(self, request: ProviderRequest) -> ProviderResult:
        client = self._sdk()
        try:
            message = await client.messages.create(**self._kwargs(request))
        except _ERRORS as exc:
            error = self._error(exc)
        else:
            blocks = getattr(message, "content", None)
            if not isinstance(blocks, list):  # an HTML page (the SDK returns it as a str), JSON of another shape
                raise invalid_response(self.name, "the response is not a message")
            text = "".join(text_of(getattr(b, "text", None)) for b in blocks if getattr(b, "type", None) == "text")
            raw_usage = getattr(message, "usage", None)
            # as in a stream: the search results in the reply count until the usage gives the provider's count
            shown = sum(map(_is_web_search_result, blocks))
            return ProviderResult(
                text=text,
                usage=_with_searches(from_anthropic(raw_usage), shown, _gives_searches(raw_usage)),
                stop_reason=bounded_stop_reason(getattr(message, "stop_reason", None)),
                model=getattr(message, "model", None) or request.model,
            )
        raise error  # outside the except block: no chained SDK exception (it holds the request)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[StreamItem]:
        client = self._sdk()
        try:
            events = await client.messages.create(**self._kwargs(request), stream=True)
        except _ERRORS as exc:
            error: ProviderError | None = self._error(exc)
        else:
            error = None
        if error is not None:
            raise error
        usage: dict[str, Any] = {}
        final_usage = False  # message_delta gave the final output count (message_start's is a placeholder)
        searches_seen = 0  # web search results shown so far (the provider's count comes in message_delta)
        searches_final = False  # message_delta gave the provider's search count
        stop_reason: str | None = None
        model = request.model
        finished = False
        try:
            async with events:
                async for event in events:
                    kind = event.type
                    if kind == "content_block_delta":
                        delta = event.delta
                        is_text = getattr(delta, "type", None) == "text_delta"
                        text = text_of(getattr(delta, "text", None)) if is_text else ""
                        if text:
                            yield TextDelta(text)
                    elif kind == "content_block_start":
                        if _is_web_search_result(getattr(event, "content_block", None)):
                            searches_seen += 1
                            if so_far := _usage_so_far(usage, final_usage, searches_seen, searches_final):
                                yield so_far
                    elif kind == "message_start":
                        model = getattr(event.message, "model", None) or model
                        if so_far := _merge_usage(usage, getattr(event.message, "usage", None)):
                            yield so_far
                    elif kind == "message_delta":
                        stop_reason = getattr(event.delta, "stop_reason", None) or stop_reason
                        delta_usage = getattr(event, "usage", None)
                        final_usage = final_usage or _usage_count(delta_usage, "output_tokens") is not None
                        searches_final = searches_final or _gives_searches(delta_usage)
                        if so_far := _merge_usage(
                            usage,
                            delta_usage,
                            output_final=final_usage,
                            searches_seen=searches_seen,
                            searches_final=searches_final,
                        ):
                            yield so_far
                    elif kind == "message_stop":
                        finished = True
        except _ERRORS as exc:
            error = stream_broken(exc, provider=self.name, api_key=self._api_key)
        if error is not None:
            raise error
        if not finished:
            raise incomplete_stream(self.name)
        yield StreamEnd(
            # without message_delta's counts, the output is unknown: the caller keeps the input reported so far (the
            # searches shown ride on it, for a stream that reported nothing)
            usage=_with_searches(
                from_anthropic(usage) if final_usage else MISSING_USAGE, searches_seen, searches_final
            ),
            stop_reason=bounded_stop_reason(stop_reason),
            model=model,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
