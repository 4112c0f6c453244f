"""Fake OpenAI Chat Completions API: ``POST /v1/chat/completions``, JSON and ``data:`` SSE chunks."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from tests.fakes.server import Fail, FakeProviderServer, Reply

# OpenAI reports prompt_tokens INCLUDING the cached tokens, completion_tokens including reasoning.
OPENAI_DEFAULT_USAGE: Mapping[str, Any] = {
    "prompt_tokens": 12,
    "completion_tokens": 6,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
CREATED = 1_700_000_000


def _data(payload: Mapping[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


class FakeOpenAIServer(FakeProviderServer):
    endpoint = "/v1/chat/completions"
    default_usage = OPENAI_DEFAULT_USAGE
    # How a request over max_output_tokens is refused: "openai" (OpenAI's own API), "vllm" (the context length,
    # vLLM's wording, with the prompt's tokens: PROMPT_TOKENS).
    limit_wording = "openai"
    PROMPT_TOKENS = 120
    # Request parameters the endpoint refuses with a 400, as Azure OpenAI before api-version 2024-09-01-preview and
    # some gateways refuse `stream_options` ("Unrecognized request argument supplied: stream_options").
    unknown_params: frozenset[str] = frozenset()
    # Answer a `response_format` of type json_object with LM Studio's 400 (it takes only json_schema or text).
    refuses_json_object = False
    # Models answering a json_object `response_format` with OpenAI's own 400 for its older models (gpt-4, ...), while
    # the endpoint's other models take it.
    json_object_refused_by: frozenset[str] = frozenset()

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def api_key_of(self, headers: Mapping[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        return auth.removeprefix("Bearer ") if auth else None

    def _model(self, request: Any, reply: Reply) -> str:
        return reply.model or (request.get("model") if isinstance(request, dict) else None) or "gpt-fake"

    def json_body(self, request: Any, reply: Reply) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": CREATED,
            "model": self._model(request, reply),
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": reply.text if reply.refusal is None else None,
                        "refusal": reply.refusal,
                    },
                    "finish_reason": reply.stop_reason or "stop",
                }
            ],
        }
        usage = self.usage_of(reply)
        if usage is not None:
            body["usage"] = dict(usage)
        return body

    def stream_frames(self, request: Any, reply: Reply) -> Iterator[bytes | None]:
        model = self._model(request, reply)
        options = request.get("stream_options") or {}
        usage = self.usage_of(reply)

        def chunk(delta: Mapping[str, Any], finish_reason: str | None = None) -> bytes:
            return _data(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": CREATED,
                    "model": model,
                    "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish_reason}],
                    **({"usage": None} if options.get("include_usage") else {}),
                }
            )

        if reply.refusal is not None:  # OpenAI's: a first chunk with no content, then the refusal's
            yield chunk({"role": "assistant", "content": None, "refusal": ""})
            for delta in reply.refusal_deltas():
                yield chunk({"refusal": delta})
        else:
            yield chunk({"role": "assistant", "content": ""})
        for n, delta in enumerate(reply.deltas() if reply.refusal is None else ()):
            if (frame := reply.extra_frame(n)) is not None:
                yield frame
            if reply.break_after is not None and n >= reply.break_after:
                yield None
                return
            yield chunk({"content": delta})
        if reply.break_after is not None:
            yield None
            return
        yield chunk({}, reply.stop_reason or "stop")
        if options.get("include_usage") and usage is not None:
            yield _data(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": CREATED,
                    "model": model,
                    "choices": [],
                    "usage": dict(usage),
                }
            )
        yield None if reply.break_before_end else _data("[DONE]")

    def refusal(self, request: Any) -> Fail | None:
        for param in sorted(self.unknown_params & set(request if isinstance(request, dict) else ())):
            return Fail(400, "invalid_request_error", f"Unrecognized request argument supplied: {param}")
        json_object = isinstance(request, dict) and (request.get("response_format") or {}).get("type") == "json_object"
        if self.refuses_json_object and json_object:
            return Fail(400, "invalid_request_error", "'response_format.type' must be 'json_schema' or 'text'")
        if json_object and request.get("model") in self.json_object_refused_by:
            message = "Invalid parameter: 'response_format' of type 'json_object' is not supported with this model."
            return Fail(400, "invalid_request_error", message)
        return None

    def requested_output(self, request: Any) -> int | None:
        if not isinstance(request, dict):
            return None
        return request.get("max_completion_tokens", request.get("max_tokens"))

    def output_limit_error(self, request: Any, requested: int, limit: int) -> Fail:
        if self.limit_wording == "vllm":  # the limit is the context length: the prompt's tokens count too
            context = limit + self.PROMPT_TOKENS
            message = (
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{requested + self.PROMPT_TOKENS} tokens ({self.PROMPT_TOKENS} in the messages, {requested} in the "
                "completion). Please reduce the length of the messages or completion."
            )
            return Fail(400, "BadRequestError", message)
        param = "max_completion_tokens" if "max_completion_tokens" in request else "max_tokens"
        message = (
            f"{param} is too large: {requested}. This model supports at most {limit} completion tokens, whereas you "
            f"provided {requested}."
        )
        return Fail(400, "invalid_request_error", message)

    def error_body(self, fail: Fail, api_key: str | None) -> dict[str, Any]:
        message = f"Incorrect API key provided: {api_key}." if fail.echo_api_key else fail.message
        code = "invalid_api_key" if fail.status == 401 else None
        return {"error": {"message": message, "type": fail.error_type, "param": None, "code": code}}
