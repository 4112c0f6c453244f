"""The anthropic adapter end to end: the official SDK against a fake Messages API on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

from metering.errors import ProviderError
from metering.events import UsageCompleteness
from metering.llm.providers import make_provider
from metering.llm.providers.anthropic import JSON_INSTRUCTION, AnthropicProvider
from metering.llm.providers.base import Provider, ProviderConfig
from metering.llm.types import MISSING_USAGE, ProviderRequest, StreamEnd, TextDelta, TokenUsage, UsageSoFar
from tests.fakes import Fail, FakeAnthropicServer, Raw, Reply, hang, rate_limited, server_error, unauthorized

KEY = "sk-ant-api03-TEST-SECRET-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "Please rewrite: send me the doc."}]
CACHED_USAGE = {
    "input_tokens": 20,
    "output_tokens": 7,
    "cache_read_input_tokens": 1000,
    "cache_creation_input_tokens": 300,
}
OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
NORMALISED = TokenUsage(input_tokens=1320, output_tokens=7, cache_read_tokens=1000, cache_write_tokens=300)

MakeProvider = Callable[..., AnthropicProvider]


def request(**overrides: Any) -> ProviderRequest:
    fields: dict[str, Any] = {"model": "claude-test", "system": "Be formal.", "messages": MESSAGES, "max_tokens": 100}
    return ProviderRequest(**(fields | overrides))


@pytest.fixture
async def make(anthropic_server: FakeAnthropicServer) -> AsyncIterator[MakeProvider]:
    made: list[Provider] = []

    def factory(**overrides: Any) -> AnthropicProvider:
        fields: dict[str, Any] = {
            "provider": "anthropic",
            "model": "unused",
            "api_key": KEY,
            "base_url": anthropic_server.base_url,
            "timeout_s": 5.0,
            "max_retries": 0,
        }
        provider = make_provider(ProviderConfig(**(fields | overrides)))
        assert isinstance(provider, AnthropicProvider)
        made.append(provider)
        return provider

    yield factory
    for provider in made:
        await provider.aclose()


async def collect(stream: AsyncIterator[Any]) -> tuple[list[str], StreamEnd | None, ProviderError | None]:
    deltas: list[str] = []
    end: StreamEnd | None = None
    try:
        async for item in stream:
            if isinstance(item, TextDelta):
                deltas.append(item.text)
            elif isinstance(item, UsageSoFar):
                continue  # usage reported before the end: see the tests of unfinished streams
            else:
                assert end is None, "exactly one StreamEnd"
                end = item
    except ProviderError as exc:
        return deltas, end, exc
    return deltas, end, None


# -- successful calls ------------------------------------------------------------------------------


async def test_complete_returns_text_and_normalised_cache_usage(anthropic_server, make) -> None:
    anthropic_server.script(
        Reply(text="Kindly send me the document.", usage=CACHED_USAGE, model="claude-test-20250101")
    )
    result = await make().complete(request())
    assert result.text == "Kindly send me the document."
    assert result.usage == NORMALISED and result.usage.completeness is UsageCompleteness.REPORTED
    assert result.stop_reason == "end_turn"
    assert result.model == "claude-test-20250101"


async def test_what_the_sdk_sends(anthropic_server, make) -> None:
    params = {"top_p": 0.9, "top_k": 40, "stop_sequences": ["END"], "metadata": {"x": 1}, "tools": []}
    await make().complete(request(temperature=0.2, params=params))
    sent = anthropic_server.last
    assert sent.path == "/v1/messages"
    assert anthropic_server.api_key_of(sent.headers) == KEY
    assert sent.body == {
        "model": "claude-test",
        "max_tokens": 100,
        "system": "Be formal.",
        "messages": MESSAGES,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "stop_sequences": ["END"],
    }


async def test_a_single_stop_sequence_given_as_text_is_one_sequence(anthropic_server, make) -> None:
    """A stop sequence given as one text (as OpenAI's `stop` takes it; a purpose's params, a call's keyword) went out as
    the list of its characters: {"stop_sequences": "END"} stopped every reply at its first E, N or D (a "\n\n" at its
    first line break), a cut reply, billed."""
    await make().complete(request(params={"stop_sequences": "END"}))
    assert anthropic_server.last.body["stop_sequences"] == ["END"]


async def test_temperature_and_system_are_left_out_when_not_given(anthropic_server, make) -> None:
    await make().complete(request(system=None))
    assert set(anthropic_server.last.body) == {"model", "max_tokens", "messages"}


async def test_json_format_appends_an_instruction_to_the_system_prompt(anthropic_server, make) -> None:
    provider = make()
    await provider.complete(request(response_format="json"))
    assert anthropic_server.last.body["system"] == f"Be formal.\n\n{JSON_INSTRUCTION}"
    await provider.complete(request(system=None, response_format="json"))
    assert anthropic_server.last.body["system"] == JSON_INSTRUCTION
    assert "response_format" not in anthropic_server.last.body


async def test_system_role_messages_move_into_the_system_prompt(anthropic_server, make) -> None:
    messages = [{"role": "system", "content": "Extra rule."}, *MESSAGES]
    await make().complete(request(messages=messages))
    assert anthropic_server.last.body["system"] == "Be formal.\n\nExtra rule."
    assert anthropic_server.last.body["messages"] == MESSAGES


@pytest.mark.parametrize("shape", [list, tuple])
async def test_a_system_role_message_of_content_parts_moves_in_as_its_text(anthropic_server, make, shape) -> None:
    """A provider-agnostic handler may write a system message as OpenAI's content parts (the OpenAI adapter sends
    it as is): folded into Anthropic's system prompt, it became the Python repr of the list, "[{'type': 'text',
    'text': 'Extra rule.'}]", sent to the model and billed as input. A tuple of parts (ctx.llm takes one as an array)
    was then left out of the system prompt altogether, the call made without its instructions."""
    parts = shape([{"type": "text", "text": "Extra rule."}, {"type": "text", "text": " And another."}])
    messages = [{"role": "system", "content": parts}, *MESSAGES]
    await make().complete(request(messages=messages))
    assert anthropic_server.last.body["system"] == "Be formal.\n\nExtra rule. And another."
    assert anthropic_server.last.body["messages"] == MESSAGES


async def test_one_adapter_serves_many_models(anthropic_server, make) -> None:
    provider = make()
    await provider.complete(request(model="claude-a"))
    await provider.complete(request(model="claude-b"))
    assert [r.body["model"] for r in anthropic_server.requests] == ["claude-a", "claude-b"]


async def test_missing_usage_is_missing_so_the_caller_estimates(anthropic_server, make) -> None:
    anthropic_server.script(Reply(usage=None), Reply(usage=None))
    provider = make()
    assert (await provider.complete(request())).usage is MISSING_USAGE
    deltas, end, error = await collect(provider.stream(request()))
    assert error is None and deltas and end is not None
    assert end.usage is MISSING_USAGE


async def test_stream_yields_deltas_then_usage_from_start_and_delta_events(anthropic_server, make) -> None:
    anthropic_server.script(Reply(text="one two three four", usage=CACHED_USAGE, stop_reason="max_tokens"))
    deltas, end, error = await collect(make().stream(request()))
    assert error is None
    assert deltas == ["one ", "two ", "three ", "four"]
    assert end is not None
    # message_start said output_tokens=1; message_delta's cumulative 7 wins; input+cache from message_start
    assert end.usage == NORMALISED
    assert (end.stop_reason, end.model) == ("max_tokens", "claude-test")
    assert anthropic_server.last.body["stream"] is True


async def test_stream_hands_on_the_usage_reported_before_its_end(anthropic_server, make) -> None:
    """message_start's input and cache counts come first, then message_delta's (kept if the stream never ends)."""
    anthropic_server.script(Reply(text="one two", usage=CACHED_USAGE))
    items = [item async for item in make().stream(request())]
    assert [type(item) for item in items] == [UsageSoFar, TextDelta, TextDelta, UsageSoFar, StreamEnd]
    start, final = items[0], items[3]
    assert isinstance(start, UsageSoFar) and isinstance(final, UsageSoFar) and isinstance(items[-1], StreamEnd)
    assert start.usage == TokenUsage(input_tokens=1320, output_tokens=1, cache_read_tokens=1000, cache_write_tokens=300)
    assert final.usage == items[-1].usage == NORMALISED


async def test_abandoned_stream_does_not_break_the_adapter(anthropic_server, make) -> None:
    provider = make()
    stream = provider.stream(request())
    assert isinstance(await anext(stream), UsageSoFar)  # message_start's
    first = await anext(stream)
    assert isinstance(first, TextDelta)
    await stream.aclose()  # type: ignore[attr-defined]
    assert (await provider.complete(request())).text == "Hello from the fake server."


async def test_keyless_endpoint_gets_a_placeholder_never_the_environment_key(anthropic_server, make, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-ENV-PLATFORM-KEY")
    await make(api_key=None).complete(request())
    assert anthropic_server.api_key_of(anthropic_server.last.headers) == "not-needed"


async def test_no_key_and_no_base_url_fails_without_calling_out(monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-ENV-PLATFORM-KEY")
    provider = make_provider(ProviderConfig("anthropic", "m", api_key=None))
    try:
        with pytest.raises(ProviderError) as info:
            await provider.complete(request())
        assert info.value.error_type == "auth"
        with pytest.raises(ProviderError, match="no api key"):
            await anext(provider.stream(request()))  # type: ignore[call-overload]
    finally:
        await provider.aclose()


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "error_type", "retryable"),
    [
        (rate_limited(), "rate_limited", True),
        (server_error(), "server_error", True),
        (Fail(529, "overloaded_error", "Overloaded"), "server_error", True),
        (Fail(400, "invalid_request_error", "max_tokens: too large"), "bad_request", False),
        (Fail(404, "not_found_error", "model: claude-nope"), "bad_request", False),
        (Fail(403, "permission_error", "no access"), "auth", False),
    ],
)
async def test_http_errors_map_to_bounded_error_types(anthropic_server, make, behaviour, error_type, retryable):
    anthropic_server.script(behaviour)
    with pytest.raises(ProviderError) as info:
        await make().complete(request())
    error = info.value
    assert (error.error_type, error.retryable, error.provider) == (error_type, retryable, "anthropic")
    assert f"HTTP {behaviour.status}" in str(error)
    assert error.__cause__ is None and error.__context__ is None  # the SDK error (with headers) is dropped
    assert len(anthropic_server.requests) == 1  # max_retries=0


async def test_sdk_retries_are_bounded_by_max_retries(anthropic_server, make) -> None:
    anthropic_server.script(rate_limited(0.01), Fail(500, headers={"retry-after-ms": "10"}), Reply(text="third time"))
    assert (await make(max_retries=2).complete(request())).text == "third time"
    assert [r.headers.get("x-stainless-retry-count") for r in anthropic_server.requests] == ["0", "1", "2"]

    anthropic_server.requests.clear()
    anthropic_server.script(rate_limited(0.01), rate_limited(0.01), Reply())
    with pytest.raises(ProviderError, match="rate_limited"):
        await make(max_retries=1).complete(request())
    assert len(anthropic_server.requests) == 2


async def test_timeout(anthropic_server, make) -> None:
    anthropic_server.script(hang(3.0))
    with pytest.raises(ProviderError) as info:
        await make(timeout_s=0.3).complete(request())
    assert (info.value.error_type, info.value.retryable) == ("timeout", True)


async def test_connection_refused(make, refused_url) -> None:
    with pytest.raises(ProviderError) as info:
        await make(base_url=refused_url).complete(request())
    assert (info.value.error_type, info.value.retryable) == ("connection", True)
    with pytest.raises(ProviderError) as info:
        await anext(make(base_url=refused_url).stream(request()))  # type: ignore[call-overload]
    assert info.value.error_type == "connection"


async def test_auth_error_never_shows_the_key(anthropic_server, make) -> None:
    anthropic_server.script(unauthorized())
    provider = make()
    with pytest.raises(ProviderError) as info:
        await provider.complete(request())
    error = info.value
    assert anthropic_server.api_key_of(anthropic_server.last.headers) == KEY  # the server did get (and echo) it
    assert (error.error_type, error.retryable) == ("auth", False)
    assert "invalid x-api-key: ***" in str(error)
    for text in (str(error), repr(error), repr(error.args), error.message, repr(vars(error))):
        assert KEY not in text
    assert error.__cause__ is None and error.__context__ is None
    config = ProviderConfig("anthropic", "m", api_key=KEY, base_url=anthropic_server.base_url)
    assert KEY not in repr(config) and KEY not in str(config)


async def test_auth_error_on_a_stream_never_shows_the_key(anthropic_server, make) -> None:
    anthropic_server.script(unauthorized())
    deltas, end, error = await collect(make().stream(request()))
    assert deltas == [] and end is None and error is not None
    assert error.error_type == "auth" and KEY not in str(error) and KEY not in repr(error.args)


async def test_stream_refused_before_any_output(anthropic_server, make) -> None:
    anthropic_server.script(rate_limited())
    deltas, end, error = await collect(make().stream(request()))
    assert deltas == [] and end is None
    assert error is not None and error.error_type == "rate_limited"


async def test_stream_broken_in_the_middle(anthropic_server, make) -> None:
    anthropic_server.script(Reply(text="one two three four five", break_after=2))
    deltas, end, error = await collect(make().stream(request()))
    assert deltas == ["one ", "two "]
    assert end is None
    assert error is not None and (error.error_type, error.retryable) == ("stream_broken", True)
    assert error.__context__ is None


async def test_stream_that_ends_before_message_stop_is_broken(anthropic_server, make) -> None:
    anthropic_server.script(Reply(text="one two three", break_after=1, end_cleanly=True))
    deltas, end, error = await collect(make().stream(request()))
    assert deltas == ["one "] and end is None
    assert error is not None and error.error_type == "stream_broken"


async def test_sse_error_event_mid_stream_is_a_broken_stream(anthropic_server, make) -> None:
    # the real API can send `event: error` (e.g. overloaded_error) after the stream started
    original = anthropic_server.stream_frames

    def frames(body, reply):
        for n, frame in enumerate(original(body, reply)):
            if n == 4:  # after message_start, content_block_start, ping and one delta
                yield b"event: error\ndata: " + json.dumps(OVERLOADED).encode() + b"\n\n"
                return
            yield frame

    anthropic_server.stream_frames = frames  # type: ignore[method-assign]
    deltas, end, error = await collect(make().stream(request()))
    assert deltas == ["Hello "] and end is None
    assert error is not None and error.error_type == "stream_broken" and "Overloaded" in str(error)


@pytest.mark.parametrize(
    "body",
    [
        Raw(b"<html>Proxy login required</html>"),
        Raw(b'{"unexpected": true}', "application/json"),
        Raw(b'{"type": "error", "error": {"type": "api_error", "message": "sent with 200"}}', "application/json"),
    ],
    ids=["html", "other-json", "error-json"],
)
async def test_a_success_status_without_a_message_is_an_invalid_response(anthropic_server, make, body) -> None:
    anthropic_server.script(body)
    with pytest.raises(ProviderError) as info:
        await make().complete(request())
    assert info.value.error_type == "invalid_response" and not info.value.retryable


@pytest.mark.parametrize("delta_usage", [None, {"input_tokens": 20}], ids=["no-usage", "no-output-count"])
async def test_a_stream_without_a_final_output_count_reports_no_final_usage(anthropic_server, make, delta_usage):
    """message_start's output count is a placeholder: without message_delta's, the final usage is not known (the
    caller keeps message_start's input and cache counts and estimates the output)."""
    original = anthropic_server.stream_frames

    def frames(body, reply):
        for frame in original(body, reply):
            if frame is not None and frame.startswith(b"event: message_delta"):
                data = json.loads(frame.split(b"data: ", 1)[1])
                data.pop("usage")
                if delta_usage is not None:
                    data["usage"] = delta_usage
                frame = b"event: message_delta\ndata: " + json.dumps(data).encode() + b"\n\n"
            yield frame

    anthropic_server.stream_frames = frames  # type: ignore[method-assign]
    anthropic_server.script(Reply(text="one two", usage=CACHED_USAGE))
    items = [item async for item in make().stream(request())]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.usage is MISSING_USAGE and end.stop_reason == "end_turn"
    so_far = [item.usage for item in items if isinstance(item, UsageSoFar)]
    assert so_far[-1] == TokenUsage(input_tokens=1320, output_tokens=1, cache_read_tokens=1000, cache_write_tokens=300)


# -- cache writes by TTL and web searches ------------------------------------------------------------

SEARCHED_USAGE = {
    **CACHED_USAGE,
    "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
    "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1},
}
SEARCHED = TokenUsage(1320, 7, 1000, 300, cache_write_1h_tokens=200, web_searches=2)


async def test_complete_reads_one_hour_cache_writes_and_web_searches(anthropic_server, make) -> None:
    anthropic_server.script(Reply(usage=SEARCHED_USAGE), Reply(usage=CACHED_USAGE))
    provider = make()
    result = await provider.complete(request())  # the searches' blocks come before the text
    assert (result.text, result.usage) == ("Hello from the fake server.", SEARCHED)
    assert (await provider.complete(request())).usage == NORMALISED  # neither given: 0


async def test_stream_reads_one_hour_cache_writes_at_the_start_and_web_searches_at_the_end(
    anthropic_server, make
) -> None:
    """message_start gives the cache writes by TTL, message_delta the (cumulative) server tool use: the usage reported
    so far keeps the first from the start, and counts the searches whose results it has shown (the provider charges
    them even if the stream ends before message_delta); the final usage has the provider's counts."""
    anthropic_server.script(Reply(text="one two", usage=SEARCHED_USAGE))
    items = [item async for item in make().stream(request())]
    kinds = [UsageSoFar, UsageSoFar, UsageSoFar, TextDelta, TextDelta, UsageSoFar, StreamEnd]
    assert [type(item) for item in items] == kinds
    start = TokenUsage(1320, 1, 1000, 300, cache_write_1h_tokens=200)
    so_far = [item.usage for item in items if isinstance(item, UsageSoFar)]
    assert so_far == [start, replace(start, web_searches=1), replace(start, web_searches=2), SEARCHED]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.usage == SEARCHED


async def test_stream_takes_the_breakdown_and_searches_message_delta_gives_again(anthropic_server, make) -> None:
    """Both may come in message_delta too (cumulative: the last word), and in message_start."""
    original = anthropic_server.stream_frames

    def frames(body, reply):
        for frame in original(body, reply):
            if frame is not None and frame.startswith(b"event: message_start"):
                data = json.loads(frame.split(b"data: ", 1)[1])
                data["message"]["usage"]["server_tool_use"] = {"web_search_requests": 0}
                frame = b"event: message_start\ndata: " + json.dumps(data).encode() + b"\n\n"
            if frame is not None and frame.startswith(b"event: message_delta"):
                data = json.loads(frame.split(b"data: ", 1)[1])
                data["usage"]["cache_creation_input_tokens"] = 300
                data["usage"]["cache_creation"] = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 300}
                data["usage"]["server_tool_use"] = {"web_search_requests": 5}
                frame = b"event: message_delta\ndata: " + json.dumps(data).encode() + b"\n\n"
            yield frame

    anthropic_server.stream_frames = frames  # type: ignore[method-assign]
    anthropic_server.script(Reply(text="one two", usage=SEARCHED_USAGE))
    items = [item async for item in make().stream(request())]
    end = items[-1]
    assert isinstance(end, StreamEnd)
    assert end.usage == TokenUsage(1320, 7, 1000, 300, cache_write_1h_tokens=300, web_searches=5)
    start = items[0]
    assert isinstance(start, UsageSoFar) and start.usage.web_searches == 0


async def test_a_stream_without_final_usage_keeps_its_one_hour_cache_writes_and_the_searches_it_showed(
    anthropic_server, make
) -> None:
    anthropic_server.script(Reply(text="one two", usage=SEARCHED_USAGE, final_usage=False))
    items = [item async for item in make().stream(request())]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.usage == replace(MISSING_USAGE, web_searches=2)
    so_far = [item.usage for item in items if isinstance(item, UsageSoFar)]
    assert so_far[-1] == TokenUsage(1320, 1, 1000, 300, cache_write_1h_tokens=200, web_searches=2)


SEARCH_ERROR = {
    "type": "content_block_start",
    "index": 1,
    "content_block": {
        "type": "web_search_tool_result",
        "tool_use_id": "srvtoolu_failed",
        "content": {"type": "web_search_tool_result_error", "error_code": "unavailable"},
    },
}


async def test_a_failed_search_is_not_counted_and_the_final_count_is_the_providers(anthropic_server, make) -> None:
    """A search that failed is not charged (its result is an error, not a list of results). Once the provider gives
    its count (message_delta), it is the count, even below the results the stream showed."""
    error_frame = b"event: content_block_start\ndata: " + json.dumps(SEARCH_ERROR).encode() + b"\n\n"
    usage = {**CACHED_USAGE, "server_tool_use": {"web_search_requests": 2}}
    original = anthropic_server.stream_frames

    def frames(body, reply):
        for frame in original(body, reply):
            if frame is not None and frame.startswith(b"event: message_delta"):
                data = json.loads(frame.split(b"data: ", 1)[1])
                data["usage"]["server_tool_use"] = {"web_search_requests": 1}
                frame = b"event: message_delta\ndata: " + json.dumps(data).encode() + b"\n\n"
            yield frame

    anthropic_server.stream_frames = frames  # type: ignore[method-assign]
    anthropic_server.script(Reply(text="one two", usage=usage, frame_before=(1, error_frame)))
    items = [item async for item in make().stream(request())]
    so_far = [item.usage.web_searches for item in items if isinstance(item, UsageSoFar)]
    assert so_far == [0, 1, 2, 1]  # the error result between the two text deltas counts nothing
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.usage.web_searches == 1


def _edit_message(server: FakeAnthropicServer, edit: Callable[[dict[str, Any]], None]) -> None:
    """Have the server's JSON message edited (as a compatible gateway may pass it on)."""
    original = server.json_body

    def body(request: Any, reply: Reply) -> dict[str, Any]:
        message = original(request, reply)
        edit(message)
        return message

    server.json_body = body  # type: ignore[method-assign]


async def test_a_message_whose_usage_has_no_server_tool_use_counts_the_search_results_it_shows(
    anthropic_server, make
) -> None:
    """A gateway that drops ``server_tool_use`` from a message's usage: its searches were billed as 0. As in a stream,
    the successful search results in the reply count (a failed search's error result is not charged)."""
    failed_search = SEARCH_ERROR["content_block"]

    def drop_count(message: dict[str, Any]) -> None:
        del message["usage"]["server_tool_use"]
        message["content"].insert(0, failed_search)

    _edit_message(anthropic_server, drop_count)
    anthropic_server.script(Reply(usage=SEARCHED_USAGE))
    result = await make().complete(request())
    assert (result.text, result.usage) == ("Hello from the fake server.", SEARCHED)


async def test_a_message_whose_usage_gives_a_search_count_is_billed_that_count(anthropic_server, make) -> None:
    """The provider's count wins over the results shown, below them too; a 0 after results shown is a gateway's 0
    for a count it does not know (as in a stream's message_delta): the results count."""
    counts = iter([1, 0])
    _edit_message(anthropic_server, lambda m: m["usage"].update(server_tool_use={"web_search_requests": next(counts)}))
    anthropic_server.script(Reply(usage=SEARCHED_USAGE), Reply(usage=SEARCHED_USAGE))
    provider = make()
    assert (await provider.complete(request())).usage == replace(SEARCHED, web_searches=1)
    assert (await provider.complete(request())).usage == SEARCHED


def _edit_message_delta(server: FakeAnthropicServer, edit: Callable[[dict[str, Any]], None]) -> None:
    """Have the server's message_delta usage edited (as a compatible gateway may send it)."""
    original = server.stream_frames

    def frames(body, reply):
        for frame in original(body, reply):
            if frame is not None and frame.startswith(b"event: message_delta"):
                data = json.loads(frame.split(b"data: ", 1)[1])
                edit(data["usage"])
                frame = b"event: message_delta\ndata: " + json.dumps(data).encode() + b"\n\n"
            yield frame

    server.stream_frames = frames  # type: ignore[method-assign]


async def test_a_message_delta_without_server_tool_use_keeps_the_searches_the_stream_showed(
    anthropic_server, make
) -> None:
    """A message_delta that gives the output count but no ``server_tool_use`` (a gateway that passes on only the
    counts it knows) has not given the provider's search count: the searches whose results the stream showed are
    still charged, in the usage so far and at the end (they were dropped: 0 searches billed)."""
    _edit_message_delta(anthropic_server, lambda usage: usage.pop("server_tool_use"))
    anthropic_server.script(Reply(text="one two", usage=SEARCHED_USAGE))
    items = [item async for item in make().stream(request())]
    so_far = [item.usage.web_searches for item in items if isinstance(item, UsageSoFar)]
    assert so_far == [0, 1, 2, 2]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.usage == SEARCHED


async def test_a_zero_cache_creation_in_message_delta_keeps_message_starts_one_hour_writes(
    anthropic_server, make
) -> None:
    """A gateway's zeros in message_delta for the cache writes by TTL it does not know are no counts, like its 0
    input or cache counts there: message_start's breakdown is kept (the 1-hour writes were billed as 5-minute ones)."""
    zeros = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}
    _edit_message_delta(
        anthropic_server,
        lambda usage: usage.update(cache_creation_input_tokens=0, cache_read_input_tokens=0, cache_creation=zeros),
    )
    anthropic_server.script(Reply(text="one two", usage=SEARCHED_USAGE))
    items = [item async for item in make().stream(request())]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.usage == SEARCHED


async def test_a_zero_search_count_in_message_delta_keeps_the_searches_the_stream_showed(
    anthropic_server, make
) -> None:
    """The provider charges every search whose results it showed: a 0 in message_delta after them (a gateway's 0 for
    a count it does not know) is no count; a count that is not 0 is the provider's, even below them."""
    _edit_message_delta(anthropic_server, lambda usage: usage.update(server_tool_use={"web_search_requests": 0}))
    anthropic_server.script(Reply(text="one two", usage=SEARCHED_USAGE))
    items = [item async for item in make().stream(request())]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.usage == SEARCHED


async def test_a_zero_cache_write_total_in_message_delta_keeps_the_breakdown_that_stood_in_for_it(
    anthropic_server, make
) -> None:
    """A gateway whose message_start gives the cache writes by TTL without their total (the breakdown's sum stands in
    for it), then 0 for the total in message_delta: that 0 is no count, as after a total that was given (the writes,
    1-hour ones too, were dropped from the input: 300 tokens billed as none)."""
    usage = {key: value for key, value in SEARCHED_USAGE.items() if key != "cache_creation_input_tokens"}
    _edit_message_delta(anthropic_server, lambda delta: delta.update(cache_creation_input_tokens=0))
    anthropic_server.script(Reply(text="one two", usage=usage))
    items = [item async for item in make().stream(request())]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.usage == SEARCHED


async def test_a_count_that_is_not_one_in_message_delta_keeps_the_usage_reported_so_far(anthropic_server, make) -> None:
    """Usage given but not usable yields no usage so far: the last usable one (message_start's counts, the searches
    shown) stands; only a stream that gave no usage at all yields the searches it showed on missing usage."""

    def garbage(usage: dict[str, Any]) -> None:
        usage.pop("server_tool_use")
        usage["cache_read_input_tokens"] = "many"

    _edit_message_delta(anthropic_server, garbage)
    anthropic_server.script(Reply(text="one two", usage=SEARCHED_USAGE))
    items = [item async for item in make().stream(request())]
    so_far = [item.usage for item in items if isinstance(item, UsageSoFar)]
    assert [u.completeness for u in so_far] == [UsageCompleteness.REPORTED] * 3
    assert so_far[-1] == TokenUsage(1320, 1, 1000, 300, cache_write_1h_tokens=200, web_searches=2)
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.usage.completeness is UsageCompleteness.MISSING  # the caller keeps so_far
