"""The openai / openai_compatible adapter end to end: the official SDK against a fake Chat Completions API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from metering.errors import ProviderError
from metering.events import UsageCompleteness
from metering.llm.providers import make_provider
from metering.llm.providers.base import Provider, ProviderConfig
from metering.llm.providers.openai import JSON_INSTRUCTION, OpenAIProvider
from metering.llm.types import (
    MISSING_USAGE,
    ProviderRequest,
    RefusalDelta,
    StreamEnd,
    TextDelta,
    TokenUsage,
    UsageSoFar,
)
from tests.fakes import Fail, FakeOpenAIServer, Reply, hang, rate_limited, server_error, unauthorized

KEY = "sk-proj-TEST-SECRET-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "Please rewrite: send me the doc."}]
CACHED_USAGE = {
    "prompt_tokens": 1500,
    "completion_tokens": 90,
    "total_tokens": 1590,
    "prompt_tokens_details": {"cached_tokens": 1024},
    "completion_tokens_details": {"reasoning_tokens": 64},
}
NORMALISED = TokenUsage(input_tokens=1500, output_tokens=90, cache_read_tokens=1024, reasoning_tokens=64)

MakeProvider = Callable[..., OpenAIProvider]


def request(**overrides: Any) -> ProviderRequest:
    fields: dict[str, Any] = {"model": "gpt-test", "system": "Be formal.", "messages": MESSAGES, "max_tokens": 100}
    return ProviderRequest(**(fields | overrides))


@pytest.fixture
async def make(openai_server: FakeOpenAIServer) -> AsyncIterator[MakeProvider]:
    made: list[Provider] = []

    def factory(**overrides: Any) -> OpenAIProvider:
        fields: dict[str, Any] = {
            "provider": "openai",
            "model": "unused",
            "api_key": KEY,
            "base_url": openai_server.base_url,
            "timeout_s": 5.0,
            "max_retries": 0,
        }
        provider = make_provider(ProviderConfig(**(fields | overrides)))
        assert isinstance(provider, OpenAIProvider)
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


async def test_complete_returns_text_and_normalised_usage(openai_server, make) -> None:
    openai_server.script(Reply(text="Kindly send me the document.", usage=CACHED_USAGE, model="gpt-test-2025"))
    result = await make().complete(request())
    assert result.text == "Kindly send me the document."
    assert result.usage == NORMALISED and result.usage.completeness is UsageCompleteness.REPORTED
    assert (result.stop_reason, result.model) == ("end_turn", "gpt-test-2025")


async def test_finish_reason_length_is_max_tokens(openai_server, make) -> None:
    openai_server.script(Reply(stop_reason="length"), Reply(stop_reason="length"))
    provider = make()
    assert (await provider.complete(request())).stop_reason == "max_tokens"
    _, end, _ = await collect(provider.stream(request()))
    assert end is not None and end.stop_reason == "max_tokens"


REFUSAL = "I'm sorry, but I can't help with that."


async def test_a_refusal_is_reported_as_the_stop_reason_refusal(openai_server, make) -> None:
    """OpenAI answers a refusal in `message.refusal` (a stream: `delta.refusal` chunks), its content null, its
    finish_reason `stop`: it was reported as a reply that ended normally with no text (`end_turn`, "empty")."""
    openai_server.script(Reply(refusal=REFUSAL, usage=CACHED_USAGE), Reply(refusal=REFUSAL, usage=CACHED_USAGE))
    provider = make()
    result = await provider.complete(request())
    assert (result.text, result.stop_reason, result.usage) == ("", "refusal", NORMALISED)
    assert result.refusal == REFUSAL  # output the provider charges: an estimate of missing usage counts it
    items = [item async for item in provider.stream(request())]
    assert not any(isinstance(item, TextDelta) for item in items)  # the refusal is not the reply's text
    assert "".join(item.text for item in items if isinstance(item, RefusalDelta)) == REFUSAL  # counted if estimated
    end = items[-1]
    assert isinstance(end, StreamEnd) and (end.stop_reason, end.usage) == ("refusal", NORMALISED)


async def test_what_the_sdk_sends(openai_server, make) -> None:
    params = {"top_p": 0.9, "stop": ["END"], "seed": 7, "presence_penalty": 0.1, "frequency_penalty": 0.2, "top_k": 5}
    await make().complete(request(temperature=0.3, params=params))
    sent = openai_server.last
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.body == {
        "model": "gpt-test",
        "messages": [{"role": "system", "content": "Be formal."}, *MESSAGES],
        "max_completion_tokens": 100,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": ["END"],
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
    }


async def test_no_system_prompt_and_no_temperature(openai_server, make) -> None:
    await make().complete(request(system=None))
    assert openai_server.last.body["messages"] == MESSAGES
    assert "temperature" not in openai_server.last.body


async def test_json_format_asks_for_a_json_object_and_says_so(openai_server, make) -> None:
    openai_server.script(Reply(text='{"items": []}'))
    result = await make().complete(request(response_format="json"))
    assert result.text == '{"items": []}'  # parsing is the caller's job
    body = openai_server.last.body
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"][0] == {"role": "system", "content": f"Be formal.\n\n{JSON_INSTRUCTION}"}


async def test_one_adapter_serves_many_models(openai_server, make) -> None:
    provider = make()
    await provider.complete(request(model="gpt-a"))
    _, end, _ = await collect(provider.stream(request(model="gpt-b")))
    assert [r.body["model"] for r in openai_server.requests] == ["gpt-a", "gpt-b"]
    assert end is not None and end.model == "gpt-b"


async def test_stream_yields_deltas_then_the_usage_chunk(openai_server, make) -> None:
    openai_server.script(Reply(text="one two three four", usage=CACHED_USAGE))
    deltas, end, error = await collect(make().stream(request()))
    assert error is None
    assert deltas == ["one ", "two ", "three ", "four"]
    assert end is not None and end.usage == NORMALISED and end.stop_reason == "end_turn"
    body = openai_server.last.body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_missing_usage_is_missing_so_the_caller_estimates(openai_server, make) -> None:
    openai_server.script(Reply(usage=None), Reply(usage=None))
    provider = make()
    assert (await provider.complete(request())).usage is MISSING_USAGE
    deltas, end, error = await collect(provider.stream(request()))  # no usage chunk at all
    assert error is None and deltas and end is not None
    assert end.usage is MISSING_USAGE


async def test_openai_compatible_with_base_url_and_no_key(openai_server, make, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ENV-PLATFORM-KEY")  # must never be sent to a user's server
    provider = make(provider="openai_compatible", api_key=None)
    assert provider.name == "openai_compatible"
    openai_server.script(Reply(text="llama says hi", usage={"prompt_tokens": 9, "completion_tokens": 3}))
    result = await provider.complete(request(model="llama3.1:8b"))
    assert result.text == "llama says hi"
    assert result.usage == TokenUsage(input_tokens=9, output_tokens=3)
    sent = openai_server.last
    assert sent.headers["authorization"] == "Bearer not-needed"
    assert sent.body["max_tokens"] == 100 and "max_completion_tokens" not in sent.body
    deltas, end, error = await collect(provider.stream(request(model="llama3.1:8b")))
    assert error is None and "".join(deltas) == "Hello from the fake server." and end is not None


async def test_openai_compatible_without_base_url_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    provider = make_provider(ProviderConfig("openai_compatible", "llama3", api_key=None))
    try:
        with pytest.raises(ProviderError, match="base_url") as info:
            await provider.complete(request())
        assert (info.value.error_type, info.value.provider) == ("bad_request", "openai_compatible")
    finally:
        await provider.aclose()


async def test_openai_without_key_fails_without_calling_out(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ENV-PLATFORM-KEY")
    provider = make_provider(ProviderConfig("openai", "gpt-test", api_key=None))
    try:
        with pytest.raises(ProviderError, match="no api key") as info:
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
        (Fail(503, "server_error", "overloaded"), "server_error", True),
        (Fail(400, "invalid_request_error", "bad max_tokens"), "bad_request", False),
        (Fail(404, "invalid_request_error", "The model `gpt-nope` does not exist"), "bad_request", False),
        (Fail(403, "permission_error", "region not supported"), "auth", False),
    ],
)
async def test_http_errors_map_to_bounded_error_types(openai_server, make, behaviour, error_type, retryable):
    openai_server.script(behaviour)
    with pytest.raises(ProviderError) as info:
        await make().complete(request())
    error = info.value
    assert (error.error_type, error.retryable, error.provider) == (error_type, retryable, "openai")
    assert f"HTTP {behaviour.status}" in str(error) and behaviour.message in str(error)
    assert error.__cause__ is None and error.__context__ is None
    assert len(openai_server.requests) == 1  # max_retries=0


async def test_sdk_retries_are_bounded_by_max_retries(openai_server, make) -> None:
    openai_server.script(rate_limited(0.01), Fail(500, headers={"retry-after-ms": "10"}), Reply(text="third time"))
    assert (await make(max_retries=2).complete(request())).text == "third time"
    assert len(openai_server.requests) == 3

    openai_server.requests.clear()
    openai_server.script(rate_limited(0.01), rate_limited(0.01), Reply())
    with pytest.raises(ProviderError, match="rate_limited"):
        await make(max_retries=1).complete(request())
    assert len(openai_server.requests) == 2


async def test_timeout(openai_server, make) -> None:
    openai_server.script(hang(3.0), hang(3.0))
    provider = make(timeout_s=0.3)
    with pytest.raises(ProviderError) as info:
        await provider.complete(request())
    assert (info.value.error_type, info.value.retryable) == ("timeout", True)
    deltas, _, error = await collect(provider.stream(request()))
    assert deltas == [] and error is not None and error.error_type == "timeout"


async def test_connection_refused(make, refused_url) -> None:
    with pytest.raises(ProviderError) as info:
        await make(base_url=f"{refused_url}/v1").complete(request())
    assert (info.value.error_type, info.value.retryable) == ("connection", True)


async def test_auth_error_never_shows_the_key(openai_server, make) -> None:
    openai_server.script(unauthorized(), unauthorized())
    provider = make()
    with pytest.raises(ProviderError) as info:
        await provider.complete(request())
    error = info.value
    assert openai_server.api_key_of(openai_server.last.headers) == KEY  # the server did get (and echo) it
    assert (error.error_type, error.retryable) == ("auth", False)
    assert "Incorrect API key provided: ***" in str(error)
    for text in (str(error), repr(error), repr(error.args), error.message, repr(vars(error))):
        assert KEY not in text
    assert error.__cause__ is None and error.__context__ is None
    assert KEY not in repr(ProviderConfig("openai", "gpt-test", api_key=KEY, base_url=openai_server.base_url))

    _, _, stream_error = await collect(provider.stream(request()))
    assert stream_error is not None and stream_error.error_type == "auth"
    assert KEY not in str(stream_error) and KEY not in repr(stream_error.args)


async def test_key_shaped_strings_are_masked_even_when_not_ours(openai_server, make) -> None:
    openai_server.script(Fail(401, "invalid_request_error", "key sk-someone-else-0123456789 revoked"))
    with pytest.raises(ProviderError) as info:
        await make().complete(request())
    assert "sk-someone-else" not in str(info.value) and "***" in str(info.value)


async def test_stream_broken_in_the_middle(openai_server, make) -> None:
    openai_server.script(Reply(text="one two three four five", break_after=3))
    deltas, end, error = await collect(make().stream(request()))
    assert deltas == ["one ", "two ", "three "]
    assert end is None
    assert error is not None and (error.error_type, error.retryable) == ("stream_broken", True)
    assert error.__context__ is None


async def test_stream_that_ends_without_a_finish_reason_is_broken(openai_server, make) -> None:
    openai_server.script(Reply(text="one two three", break_after=2, end_cleanly=True))
    deltas, end, error = await collect(make().stream(request()))
    assert deltas == ["one ", "two "] and end is None
    assert error is not None and error.error_type == "stream_broken"


async def test_no_choices_is_an_invalid_response(openai_server, make) -> None:
    original = openai_server.json_body
    openai_server.json_body = lambda body, reply: original(body, reply) | {"choices": []}  # type: ignore[method-assign]
    with pytest.raises(ProviderError) as info:
        await make().complete(request())
    assert info.value.error_type == "invalid_response"


# -- review: reasoning beside completion (xAI), DeepSeek's cache hits, through the SDK --------------------------

XAI_STYLE = {  # reasoning beside completion (total = 32 + 9 + 94), cache hits the DeepSeek way
    "prompt_tokens": 32,
    "completion_tokens": 9,
    "total_tokens": 135,
    "completion_tokens_details": {"reasoning_tokens": 94},
    "prompt_cache_hit_tokens": 6,
}
O_SERIES = {  # OpenAI's own: reasoning inside completion, total = prompt + completion, cached inside prompt
    "prompt_tokens": 1500,
    "completion_tokens": 500,
    "total_tokens": 2000,
    "prompt_tokens_details": {"cached_tokens": 1024},
    "completion_tokens_details": {"reasoning_tokens": 400},
}


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (XAI_STYLE, TokenUsage(32, 103, cache_read_tokens=6, reasoning_tokens=94)),
        (O_SERIES, TokenUsage(1500, 500, cache_read_tokens=1024, reasoning_tokens=400)),
        # both cache fields (a gateway in front of DeepSeek): OpenAI's, never their sum
        ({**XAI_STYLE, "prompt_tokens_details": {"cached_tokens": 6}}, TokenUsage(32, 103, 6, reasoning_tokens=94)),
    ],
)
async def test_the_sdk_objects_normalise_alike_in_calls_and_streams(openai_server, make, usage, expected) -> None:
    """The SDK keeps the fields it does not know (prompt_cache_hit_tokens) as attributes; the usage chunk of a stream
    (include_usage) is read as the call's usage, both as the usage so far and at the end."""
    openai_server.script(Reply(usage=usage), Reply(text="one two", usage=usage))
    provider = make()
    assert (await provider.complete(request())).usage == expected
    items = [item async for item in provider.stream(request())]
    so_far = [item.usage for item in items if isinstance(item, UsageSoFar)]
    end = items[-1]
    assert so_far == [expected] and isinstance(end, StreamEnd) and end.usage == expected
