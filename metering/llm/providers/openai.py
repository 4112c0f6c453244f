"""Adapter for OpenAI Chat Completions and OpenAI-compatible servers (Ollama, vLLM, LM Studio via
``base_url``), through the official ``openai`` SDK."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import openai

from metering.errors import ProviderError
from metering.events import UsageCompleteness
from metering.llm.providers._errors import (
    BODY_DECODE_ERRORS,
    MAX_LIMIT_MESSAGE_CHARS,
    STREAM_TRANSPORT_ERRORS,
    api_message,
    from_sdk_error,
    incomplete_stream,
    invalid_response,
    stream_broken,
    usable_client,
)
from metering.llm.providers.base import ProviderConfig, bounded_stop_reason, text_of, thinking_of
from metering.llm.providers.params import OPENAI_PARAMS as PASS_THROUGH  # the one list the settings store checks
from metering.llm.providers.urls import config_problem
from metering.llm.types import (
    MISSING_USAGE,
    STOP_CONTEXT_WINDOW,
    STOP_MAX_TOKENS,
    STOP_REFUSAL,
    ProviderRequest,
    ProviderResult,
    ReasoningDelta,
    RefusalDelta,
    StreamEnd,
    StreamItem,
    TextDelta,
    UsageSoFar,
)
from metering.llm.usage import from_openai

log = logging.getLogger("metering.llm.providers")

COMPATIBLE = "openai_compatible"
JSON_INSTRUCTION = "Respond with a single valid JSON value and nothing else."
PLACEHOLDER_KEY = "not-needed"  # keyless local servers; and the SDK must never fall back to OPENAI_API_KEY
# finish_reason → the stop reasons the rest of the system uses (Anthropic's names, as the simulated provider);
# Mistral's "model_length": its context window ran out
STOP_REASONS = {
    "stop": "end_turn",
    "length": STOP_MAX_TOKENS,
    "model_length": STOP_CONTEXT_WINDOW,
    "tool_calls": "tool_use",
    "function_call": "tool_use",
}
_ERRORS: tuple[type[BaseException], ...] = (openai.OpenAIError, *STREAM_TRANSPORT_ERRORS, *BODY_DECODE_ERRORS)


def reasoning_of(delta: Any, content: Any) -> str:
    """The reasoning text of a stream delta (``content``: its content): fields the SDK does not declare (its extras),
    ``reasoning_content`` (DeepSeek, SGLang) or ``reasoning`` (vLLM, OpenRouter, Ollama), and the ``thinking`` parts
    of a content list (Mistral); ``""`` for none."""
    extra = getattr(delta, "model_extra", None)  # nearly every chunk: none (OpenAI's own, the reply's text)
    reasoning = text_of(extra.get("reasoning_content") or extra.get("reasoning")) if extra else ""
    return reasoning + thinking_of(content) if isinstance(content, list) else reasoning


def stop_reason(finish_reason: object, *, refused: bool = False) -> str | None:
    """The stop reason of a reply (``refused``: it holds a refusal, whatever its finish_reason, OpenAI's ``stop``)."""
    if refused:
        return STOP_REFUSAL
    if not isinstance(finish_reason, str):
        return None
    return bounded_stop_reason(STOP_REASONS.get(finish_reason, finish_reason))


def refusal_of(message: Any) -> str:
    """The refusal a message (or a stream delta) holds: OpenAI answers one in ``refusal``, its ``content`` null;
    ``""`` for none (a compatible server may send ``"refusal": null``, or ``""``)."""
    refusal = getattr(message, "refusal", None)
    return refusal if isinstance(refusal, str) and not refusal.isspace() else ""


# Optional parameters an endpoint may refuse, with a 400 or 422 saying so, while it answers the call without them:
# `stream_options` (Azure OpenAI before api-version 2024-09-01-preview: "Unrecognized request argument supplied:
# stream_options"; gateways: "Unknown parameter: 'stream_options'"), `response_format` of type json_object (LM Studio:
# "'response_format.type' must be 'json_schema' or 'text'"; OpenAI's older models: "Invalid parameter: 'response_format'
# of type 'json_object' is not supported with this model."; the system prompt asks for JSON all the same).
OPTIONAL_PARAMS = ("stream_options", "response_format")
_REFUSAL = (
    r"(?:unrecognized|unknown|unsupported|unexpected|extra)\s+(?:request\s+)?"
    r"(?:argument|parameter|field|key|property|input)s?(?:\s+supplied)?\s*:?\s*['\"`]?{name}\b"
    r"|\b{name}(?:\.type)?['\"`]?\s*(?::|is|are)?\s*(?:extra inputs? (?:are|is) not permitted"
    r"|extra fields not permitted|not (?:supported|permitted|allowed|recognized)|unrecognized|unknown|unsupported"
    r"|must be\b)"
    r"|\b{name}['\"`]? of type ['\"`]?\w+['\"`]? is not supported"
)
# Only the error's message is read, and only such a phrase: a 400 for another reason that echoes the request or the
# prompt names the parameter without saying it is refused.
_REFUSALS = {name: re.compile(_REFUSAL.format(name=name), re.IGNORECASE) for name in OPTIONAL_PARAMS}
# (parameter, model) refusals an adapter keeps: one adapter serves every model of its endpoint and key, and a user's
# own LLM may be named by another model at each settings change; past the bound a refusal is not kept (each such
# call is refused, then made again without the parameter: still one call, one event)
MAX_REFUSED = 256


def refused_param(exc: openai.APIStatusError, sent: Mapping[str, Any]) -> str | None:
    """The optional parameter of ``sent`` an endpoint's 400 or 422 says it does not take, if any."""
    if exc.status_code not in (400, 422):
        return None
    message = api_message(exc.body)
    if message is None:
        return None
    message = message[:MAX_LIMIT_MESSAGE_CHARS]
    return next((name for name, refusal in _REFUSALS.items() if name in sent and refusal.search(message)), None)


class OpenAIProvider:
    """``openai`` and ``openai_compatible``: one ``AsyncOpenAI`` client per endpoint and key."""

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.provider
        compatible = config.provider == COMPATIBLE
        self._api_key = config.api_key
        self._config_problem = (
            "a base_url is required (e.g. http://localhost:11434/v1)"
            if compatible and not config.base_url
            else config_problem(config.base_url, config.api_key)
        )
        self._keyless = not compatible and not config.api_key and not config.base_url
        # OpenAI's own API wants max_completion_tokens; compatible servers still read max_tokens.
        self._max_tokens_param = "max_tokens" if compatible else "max_completion_tokens"
        # (OPTIONAL_PARAMS, model) this endpoint refused (a 400 saying so) and answered without: never sent again by
        # this adapter for that model (OpenAI refuses JSON mode for its older models only, and one adapter serves every
        # model of its endpoint and key)
        self._refused: set[tuple[str, str]] = set()
        self._client = None
        if self._config_problem is None:
            self._client = openai.AsyncOpenAI(
                api_key=config.api_key or PLACEHOLDER_KEY,
                base_url=config.base_url,
                timeout=config.timeout_s,
                max_retries=config.max_retries,
            )

    def _check(self) -> openai.AsyncOpenAI:
        """The SDK client, or the ProviderError of a configuration no call can be made with."""
        return usable_client(self.name, self._client, self._config_problem, self._api_key, self._keyless)

    def _kwargs(self, request: ProviderRequest) -> dict[str, Any]:
        system = request.system
        if request.response_format == "json":
            system = f"{system}\n\n{JSON_INSTRUCTION}" if system else JSON_INSTRUCTION
        messages = [{"role": "system", "content": system}, *request.messages] if system else list(request.messages)
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            self._max_tokens_param: request.max_tokens,
        }
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.response_format == "json" and ("response_format", request.model) not in self._refused:
            kwargs["response_format"] = {"type": "json_object"}
        params = request.params
        for key in PASS_THROUGH:
            if params.get(key) is not None:
                kwargs[key] = params[key]
        dropped = set(params) - set(PASS_THROUGH)
        if dropped:
            log.debug("%s: ignoring unsupported params %s", self.name, sorted(dropped))
        return kwargs

    async def _create(self, client: openai.AsyncOpenAI, kwargs: dict[str, Any]) -> Any:
        """``chat.completions.create``; refused for an optional parameter the endpoint does not take (nothing was
        generated, nothing used), the same call again without it, within this one call (and its one event), as the
        SDK's own retries are. Once the endpoint answered without it, this adapter never sends it again for that
        model (for the first ``MAX_REFUSED`` refusals it keeps)."""
        try:
            return await client.chat.completions.create(**kwargs)
        except openai.APIStatusError as exc:
            if (param := refused_param(exc, kwargs)) is None:
                raise
        answer = await client.chat.completions.create(**{k: v for k, v in kwargs.items() if k != param})
        if len(self._refused) < MAX_REFUSED:
            self._refused.add((param, kwargs["model"]))
        log.info("%s: the endpoint refuses %s; calling it without", self.name, param)
        return answer

    def _error(self, exc: BaseException) -> ProviderError:
        return from_sdk_error(exc, openai, provider=self.name, api_key=self._api_key)

    async def complete(self, request: ProviderRequest) -> ProviderResult:
        client = self._check()
        try:
            completion = await self._create(client, self._kwargs(request))
        except _ERRORS as exc:
            error = self._error(exc)
        else:
            choices = getattr(completion, "choices", None) or []
            if not choices:
                raise invalid_response(self.name, "the response has no choices")
            choice = choices[0]
            message = getattr(choice, "message", None)
            refusal = refusal_of(message)
            return ProviderResult(
                text=text_of(getattr(message, "content", None)),
                usage=from_openai(getattr(completion, "usage", None)),
                stop_reason=stop_reason(getattr(choice, "finish_reason", None), refused=bool(refusal)),
                model=getattr(completion, "model", None) or request.model,
                refusal=refusal,
            )
        raise error  # outside the except block: no chained SDK exception (it holds the request)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[StreamItem]:
        client = self._check()
        kwargs = self._kwargs(request) | {"stream": True}
        if ("stream_options", request.model) not in self._refused:  # the usage chunk; else estimated from the text
            kwargs["stream_options"] = {"include_usage": True}
        error: ProviderError | None = None
        try:
            chunks = await self._create(client, kwargs)
        except _ERRORS as exc:
            error = self._error(exc)
        if error is not None:
            raise error
        usage: Any = None
        finish: str | None = None
        refused = False  # a delta held a refusal: the stop reason is STOP_REFUSAL
        model = request.model
        try:
            async with chunks:
                async for chunk in chunks:
                    model = getattr(chunk, "model", None) or model
                    if getattr(chunk, "usage", None) is not None:
                        usage = chunk.usage  # the last chunk, when include_usage is honoured
                        if (so_far := from_openai(usage)).completeness is UsageCompleteness.REPORTED:
                            yield UsageSoFar(so_far, output_final=True)  # kept if the body breaks before its end
                    for choice in getattr(chunk, "choices", None) or ():
                        if getattr(choice, "index", 0) != 0:
                            continue
                        delta = getattr(choice, "delta", None)
                        content = getattr(delta, "content", None)
                        text = text_of(content)
                        if text:
                            yield TextDelta(text)
                        if reasoning := reasoning_of(delta, content):
                            yield ReasoningDelta(reasoning)
                        if refusal := refusal_of(delta):
                            refused = True
                            yield RefusalDelta(refusal)
                        if getattr(choice, "finish_reason", None):
                            finish = choice.finish_reason
        except _ERRORS as exc:
            error = stream_broken(exc, provider=self.name, api_key=self._api_key)
        if error is not None:
            raise error
        if finish is None:
            raise incomplete_stream(self.name)
        yield StreamEnd(
            usage=from_openai(usage) if usage is not None else MISSING_USAGE,
            stop_reason=stop_reason(finish, refused=refused),
            model=model,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
