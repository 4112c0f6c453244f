"""Fake Anthropic Messages API: ``POST /v1/messages``, JSON and the SSE event stream."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from tests.fakes.server import Fail, FakeProviderServer, Reply

# Anthropic reports input_tokens WITHOUT the cache tokens, which are given beside it.
ANTHROPIC_DEFAULT_USAGE: Mapping[str, Any] = {
    "input_tokens": 12,
    "output_tokens": 6,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
}
# Like the real API, a stream gives the input and cache counts (and the cache writes by TTL, ``cache_creation``) in
# message_start, and the output and server tool use (``server_tool_use``: web searches, run during the reply) in
# message_delta, both cumulative. A test sets any of them in ``Reply.usage``; the JSON answer carries it all. Each web
# search the usage counts is also answered as the real API does, before the text: a ``server_tool_use`` block and its
# ``web_search_tool_result``.
_START_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "cache_creation")
_DELTA_KEYS = ("server_tool_use",)


def _frame(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def searches_of(usage: Mapping[str, Any] | None) -> int:
    """The web searches a usage says were run (``server_tool_use.web_search_requests``), if a plain count."""
    count = ((usage or {}).get("server_tool_use") or {}).get("web_search_requests")
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def search_blocks(n: int) -> list[dict[str, Any]]:
    """What the real API answers for the ``n``-th web search: the server tool use, then its result."""
    tool_use_id = f"srvtoolu_fake_{n}"
    result = {"type": "web_search_result", "title": "A page", "url": "https://example.com/", "encrypted_content": "x"}
    return [
        {"type": "server_tool_use", "id": tool_use_id, "name": "web_search", "input": {"query": "fake"}},
        {"type": "web_search_tool_result", "tool_use_id": tool_use_id, "content": [result]},
    ]


class FakeAnthropicServer(FakeProviderServer):
    endpoint = "/v1/messages"
    default_usage = ANTHROPIC_DEFAULT_USAGE

    def api_key_of(self, headers: Mapping[str, str]) -> str | None:
        # older SDKs send ``x-api-key``; newer ones ``Authorization: Bearer <key>``
        auth = headers.get("authorization", "")
        return headers.get("x-api-key") or (auth.removeprefix("Bearer ") if auth else None)

    def _model(self, request: Any, reply: Reply) -> str:
        return reply.model or (request.get("model") if isinstance(request, dict) else None) or "claude-fake"

    def json_body(self, request: Any, reply: Reply) -> dict[str, Any]:
        usage = self.usage_of(reply)
        searches = [block for n in range(searches_of(usage)) for block in search_blocks(n)]
        body: dict[str, Any] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": self._model(request, reply),
            "content": [*searches, {"type": "text", "text": reply.text}],
            "stop_reason": reply.stop_reason or "end_turn",
            "stop_sequence": None,
        }
        if usage is not None:
            body["usage"] = dict(usage)
        return body

    def stream_frames(self, request: Any, reply: Reply) -> Iterator[bytes | None]:
        usage = self.usage_of(reply)
        message: dict[str, Any] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": self._model(request, reply),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if usage is not None:  # like the real API: input (and cache) counts first, output so far = 1
            message["usage"] = {key: usage[key] for key in _START_KEYS if key in usage} | {"output_tokens": 1}
        yield _frame("message_start", {"type": "message_start", "message": message})
        # the searches (Reply.usage's server_tool_use) first, as a reply that searches before it writes
        blocks = [block for n in range(searches_of(usage)) for block in search_blocks(n)]
        for index, block in enumerate(blocks):
            yield _frame("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
            yield _frame("content_block_stop", {"type": "content_block_stop", "index": index})
        text_index = len(blocks)
        yield _frame(
            "content_block_start",
            {"type": "content_block_start", "index": text_index, "content_block": {"type": "text", "text": ""}},
        )
        yield _frame("ping", {"type": "ping"})
        for n, delta in enumerate(reply.deltas()):
            if (frame := reply.extra_frame(n)) is not None:
                yield frame
            if reply.break_after is not None and n >= reply.break_after:
                yield None
                return
            yield _frame(
                "content_block_delta",
                {"type": "content_block_delta", "index": text_index, "delta": {"type": "text_delta", "text": delta}},
            )
        if reply.break_after is not None:
            yield None
            return
        yield _frame("content_block_stop", {"type": "content_block_stop", "index": text_index})
        message_delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason or "end_turn", "stop_sequence": None},
        }
        if usage is not None and reply.final_usage:  # cumulative output tokens (and server tool use), at the end
            delta_usage = {key: usage[key] for key in _DELTA_KEYS if key in usage}
            message_delta["usage"] = {"output_tokens": usage.get("output_tokens", 0)} | delta_usage
        yield _frame("message_delta", message_delta)
        yield None if reply.break_before_end else _frame("message_stop", {"type": "message_stop"})

    def output_limit_error(self, request: Any, requested: int, limit: int) -> Fail:
        model = request.get("model") if isinstance(request, dict) else None
        message = f"max_tokens: {requested} > {limit}, which is the maximum allowed number of output tokens for {model}"
        return Fail(400, "invalid_request_error", message)

    def error_body(self, fail: Fail, api_key: str | None) -> dict[str, Any]:
        message = f"invalid x-api-key: {api_key}" if fail.echo_api_key else fail.message
        return {"type": "error", "error": {"type": fail.error_type, "message": message}}
