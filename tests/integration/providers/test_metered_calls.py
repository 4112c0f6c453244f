"""``ctx.llm`` over the real adapters and SDKs, against the fake provider servers: whatever a provider answers, a
call records exactly one event the flusher accepts, and the caller gets the answer (or a typed error)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from metering.errors import InvalidInputError, ProviderError
from metering.events import UsageEvent, uuid7
from metering.llm.client import MeteredLLM
from metering.llm.event_record import CallScope
from metering.llm.pool import ProviderPool
from metering.llm.providers import make_provider
from metering.llm.providers import openai as openai_adapter
from metering.llm.providers.base import ProviderConfig
from metering.llm.providers.openai import OpenAIProvider
from metering.llm.resolution import ByollmSettings, PlatformLLM, PurposeSettings
from metering.llm.settings_source import InMemorySettings
from metering.llm.types import ProviderRequest
from metering.spool.decode import decode_line
from tests.fakes import FakeAnthropicServer, FakeOpenAIServer, FakeProviderServer, Raw, Reply
from tests.unit.test_metered_llm import MESSAGES, Recorder

TEXT = "A fairly long answer, certainly more than zero tokens long. " * 5
MakeLLM = Callable[..., tuple[MeteredLLM, Recorder]]


@pytest.fixture
async def metered() -> AsyncIterator[MakeLLM]:
    pools: list[ProviderPool] = []

    def make(
        provider: str, server: FakeProviderServer, settings: InMemorySettings | None = None
    ) -> tuple[MeteredLLM, Recorder]:
        platform = PlatformLLM(
            provider=provider,
            model="m-test",
            base_url=server.base_url,
            timeout_s=5,
            max_retries=0,
            api_keys={provider: "sk-platform-key-123456"},
        )
        pools.append(ProviderPool(make_provider))
        recorder = Recorder()
        scope = CallScope("t1", "u1", "rewrite", "rewrite", uuid7())
        llm = MeteredLLM(
            scope=scope,
            settings=settings or InMemorySettings(),
            platform=platform,
            providers=pools[-1],
            recorder=recorder,
        )
        return llm, recorder

    yield make
    for pool in pools:
        await pool.aclose()


def the_event(recorder: Recorder) -> UsageEvent:
    """The one event spooled, as the flusher decodes it (a str there is the reason it would be dead-lettered)."""
    [line] = recorder.lines
    event = decode_line(line)
    assert isinstance(event, UsageEvent), event
    return event


BAD_OPENAI_USAGE = [
    {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
    {"prompt_tokens": -1, "completion_tokens": -1, "total_tokens": -2},
    {"prompt_tokens": 2**64, "completion_tokens": 5},
    {"prompt_tokens": math.inf, "completion_tokens": 5},  # JSON Infinity; 1e400 reads the same
    {"completion_tokens": 5},
]
BAD_ANTHROPIC_USAGE = [
    {"input_tokens": None, "output_tokens": None},
    {"input_tokens": -3, "output_tokens": 5},
    {"input_tokens": 2**64, "output_tokens": 5},
    {"input_tokens": 12, "output_tokens": math.nan},
]


@pytest.mark.parametrize(
    ("provider", "usage"),
    [("openai", usage) for usage in BAD_OPENAI_USAGE] + [("anthropic", usage) for usage in BAD_ANTHROPIC_USAGE],
)
async def test_usage_without_usable_counts_is_estimated(
    request: pytest.FixtureRequest, metered: MakeLLM, provider: str, usage: dict[str, Any]
) -> None:
    server = request.getfixturevalue(f"{provider}_server")
    server.script(Reply(text=TEXT, usage=usage), Reply(text=TEXT, usage=usage))
    llm, rec = metered(provider, server)
    response = await llm.create_message(messages=MESSAGES)
    assert response.text == TEXT and response.usage.completeness == "estimated"
    event = the_event(rec)
    assert (event.status, event.usage_completeness) == ("ok", "estimated")
    assert event.input_tokens > 0 and event.output_tokens == len(TEXT) // 4
    rec.lines.clear()
    async with llm.stream_message(messages=MESSAGES) as stream:
        assert "".join([chunk async for chunk in stream]) == TEXT
    assert the_event(rec).usage_completeness == "estimated"


ZERO_USAGE = {
    "openai": [
        {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},  # a server that counts nothing
        {"prompt_tokens": 0, "completion_tokens": 75, "total_tokens": 75},  # Ollama, for a prompt it had cached
    ],
    "anthropic": [{"input_tokens": 0, "output_tokens": 0}, {"input_tokens": 0, "output_tokens": 75}],
}


@pytest.mark.parametrize(
    ("provider", "usage"), [(provider, usage) for provider, usages in ZERO_USAGE.items() for usage in usages]
)
async def test_a_reported_zero_for_a_prompt_or_a_reply_with_text_is_estimated(
    request: pytest.FixtureRequest, metered: MakeLLM, provider: str, usage: dict[str, Any]
) -> None:
    """An answered call was recorded `reported` with 0 input tokens (or 0 tokens at all): billed $0 for what it read,
    though the docs say an answered call is never recorded as 0 tokens. A 0 for text that was there is estimated."""
    server = request.getfixturevalue(f"{provider}_server")
    server.script(Reply(text=TEXT, usage=usage), Reply(text=TEXT, usage=usage))
    llm, rec = metered(provider, server)
    response = await llm.create_message(messages=MESSAGES)
    async with llm.stream_message(messages=MESSAGES) as stream:
        assert "".join([chunk async for chunk in stream]) == TEXT
    for event in (decode_line(line) for line in rec.lines):
        assert isinstance(event, UsageEvent)
        assert (event.status, event.usage_completeness) == ("ok", "estimated")
        assert event.input_tokens == response.usage.input_tokens > 0
        expected_output = usage["completion_tokens" if provider == "openai" else "output_tokens"] or len(TEXT) // 4
        assert event.output_tokens == expected_output


@pytest.mark.parametrize(
    ("sent", "recorded"),
    [
        pytest.param("x" * 101, "x" * 100, id="too-long"),  # an OpenAI-compatible server may say anything
        pytest.param("content_filter\x00", "content_filter", id="nul"),
        pytest.param("stop\ud800", "stop?", id="lone-surrogate"),  # a valid JSON escape, not valid Unicode
        pytest.param("length", "max_tokens", id="known"),
    ],
)
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_stop_reason_is_one_the_event_can_hold(
    openai_server: FakeOpenAIServer,
    anthropic_server: FakeAnthropicServer,
    metered: MakeLLM,
    provider: str,
    sent: str,
    recorded: str,
) -> None:
    server: FakeProviderServer = openai_server if provider == "openai" else anthropic_server
    if provider == "anthropic" and sent == "length":
        recorded = sent  # the OpenAI names are mapped to Anthropic's; Anthropic's own pass as they are
    server.script(Reply(stop_reason=sent), Reply(stop_reason=sent))
    llm, rec = metered(provider, server)
    response = await llm.create_message(messages=MESSAGES)
    assert response.stop_reason == recorded == the_event(rec).stop_reason
    rec.lines.clear()
    async with llm.stream_message(messages=MESSAGES) as stream:
        assert [chunk async for chunk in stream]
    assert the_event(rec).stop_reason == recorded


@pytest.mark.parametrize(
    "body",
    [
        Raw(b"<html>Proxy login required</html>"),
        Raw(b'{"unexpected": true}', "application/json"),
        Raw(b"", "application/json"),  # the SDK's JSON decoding error was no ProviderError: no failover, a 500
        Raw(b'{"id": "msg_01", "content": [{"type": "te', "application/json"),  # cut off
    ],
    ids=["html", "other-json", "empty-json", "cut-json"],
)
@pytest.mark.parametrize("byo_provider", ["anthropic", "openai_compatible"])
async def test_byollm_endpoint_answering_200_without_a_message_fails_over(
    openai_server: FakeOpenAIServer,
    anthropic_server: FakeAnthropicServer,
    metered: MakeLLM,
    byo_provider: str,
    body: Raw,
) -> None:
    """A BYOLLM base_url behind a login proxy answers 200 with a page: an error, not an empty billable-free answer."""
    byo_server: FakeProviderServer = anthropic_server if byo_provider == "anthropic" else openai_server
    byo_server.script(body)
    own = ByollmSettings("u1", "t1", byo_provider, "byo-model", api_key="sk-user-123456", base_url=byo_server.base_url)
    settings = InMemorySettings(byollm_by_user={"u1": own})  # fallback policy: platform
    if byo_provider == "anthropic":
        llm, rec = metered("openai", openai_server, settings)
    else:
        llm, rec = metered("anthropic", anthropic_server, settings)
    response = await llm.create_message(messages=MESSAGES)
    assert not response.is_byollm and response.text == "Hello from the fake server."
    failed, served = (decode_line(line) for line in rec.lines)
    assert isinstance(failed, UsageEvent) and isinstance(served, UsageEvent)
    assert (failed.is_byollm, failed.status, failed.error_type) == (True, "error", "invalid_response")
    assert (served.is_byollm, served.is_failover, served.status) == (False, True, "ok")
    rec.lines.clear()  # a stream answered so fails over too (before its first chunk)
    byo_server.script(body)
    async with llm.stream_message(messages=MESSAGES) as stream:
        assert "".join([chunk async for chunk in stream]) == "Hello from the fake server."
    failed, served = (decode_line(line) for line in rec.lines)
    assert isinstance(failed, UsageEvent) and isinstance(served, UsageEvent)
    assert (failed.is_byollm, failed.status, failed.error_type) == (True, "error", "stream_broken")
    assert (served.is_byollm, served.is_failover, served.status) == (False, True, "ok")


@pytest.mark.parametrize(
    "base_url",
    ["http://127.0.0.1:99999/v1", "http://127.0.0.1:port/v1", "http://bad_host_\u00fc.example/v1"],
    ids=["port-out-of-range", "port-not-a-number", "invalid-idna-host"],
)
@pytest.mark.parametrize("byo_provider", ["anthropic", "openai", "openai_compatible"])
async def test_a_byollm_base_url_the_sdk_cannot_use_fails_over(
    openai_server: FakeOpenAIServer, anthropic_server: FakeAnthropicServer, metered: MakeLLM, byo_provider: str,
    base_url: str,
) -> None:  # fmt: skip
    """Settings stored before base_urls were checked: the SDK refused the URL when its client was made (InvalidURL) or,
    a port past 65535, raised an ExceptionGroup it does not wrap at the call. The call failed with an internal error
    (a 500 over HTTP; no event, or `internal:ExceptionGroup`) and never failed over to the platform LLM."""
    own = ByollmSettings("u1", "t1", byo_provider, "byo-model", api_key="sk-user-123456", base_url=base_url)
    llm, rec = metered("anthropic", anthropic_server, InMemorySettings(byollm_by_user={"u1": own}))
    for stream in (False, True):
        rec.lines.clear()
        if stream:
            async with llm.stream_message(messages=MESSAGES) as message_stream:
                text = "".join([chunk async for chunk in message_stream])
        else:
            text = (await llm.create_message(messages=MESSAGES)).text
        assert text == "Hello from the fake server."
        failed, served = (decode_line(line) for line in rec.lines)
        assert isinstance(failed, UsageEvent) and isinstance(served, UsageEvent)
        assert (failed.is_byollm, failed.status, failed.error_type) == (True, "error", "bad_request")
        assert (served.is_byollm, served.is_failover, served.status) == (False, True, "ok")
    assert len(anthropic_server.requests) == 2 and not openai_server.requests


@pytest.mark.parametrize(
    "api_key", ["sk-copied\u2026abcd", "sk-pasted-with-its-newline\n"], ids=["non-ascii", "newline"]
)
@pytest.mark.parametrize("byo_provider", ["anthropic", "openai"])
async def test_a_byollm_api_key_no_request_can_carry_fails_over_as_bad_request(
    openai_server: FakeOpenAIServer, anthropic_server: FakeAnthropicServer, metered: MakeLLM, byo_provider: str,
    api_key: str,
) -> None:  # fmt: skip
    """A key stored before keys were checked, copied with a typographic `…` or its newline: the openai SDK raised
    UnicodeEncodeError (an `internal:` event, a 500 over HTTP, no failover), and a line break failed each call as a
    `connection` error: a setup problem no retry fixes, reported as an outage."""
    byo_server: FakeProviderServer = anthropic_server if byo_provider == "anthropic" else openai_server
    own = ByollmSettings("u1", "t1", byo_provider, "byo-model", api_key=api_key, base_url=byo_server.base_url)
    platform_server = openai_server if byo_provider == "anthropic" else anthropic_server
    platform = "openai" if byo_provider == "anthropic" else "anthropic"
    llm, rec = metered(platform, platform_server, InMemorySettings(byollm_by_user={"u1": own}))
    assert (await llm.create_message(messages=MESSAGES)).text == "Hello from the fake server."
    failed, served = (decode_line(line) for line in rec.lines)
    assert isinstance(failed, UsageEvent) and isinstance(served, UsageEvent)
    assert (failed.is_byollm, failed.status, failed.error_type) == (True, "error", "bad_request")
    assert (served.is_byollm, served.is_failover, served.status) == (False, True, "ok")
    assert not byo_server.requests


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_streamed_event_that_is_not_json_breaks_the_stream(
    openai_server: FakeOpenAIServer, anthropic_server: FakeAnthropicServer, metered: MakeLLM, provider: str
) -> None:
    """A proxy's cut or garbled event mid-stream: the SDK's JSON decoding error reached the handler as it was (an
    `internal:JSONDecodeError` event, a 500 over HTTP); it is a broken stream, metered from what was received."""
    server: FakeProviderServer = openai_server if provider == "openai" else anthropic_server
    event = b"data: {not json\n\n" if provider == "openai" else b"event: content_block_delta\ndata: {not json\n\n"
    server.script(Reply(text="one two three four", frame_before=(2, event)))
    llm, rec = metered(provider, server)
    received: list[str] = []
    with pytest.raises(ProviderError) as info:
        async with llm.stream_message(messages=MESSAGES) as stream:
            async for chunk in stream:
                received.append(chunk)
    assert received == ["one ", "two "] and info.value.error_type == "stream_broken"
    event_ = the_event(rec)
    assert (event_.status, event_.error_type, event_.usage_completeness) == ("error", "stream_broken", "estimated")


LONE_SURROGATE_PROMPTS = {
    "message": {"messages": [{"role": "user", "content": "Call Bob \ud83d today."}]},
    "system": {"system": "Rewrite \udc00 this.", "messages": MESSAGES},
    "content-part": {"messages": [{"role": "user", "content": [{"type": "text", "text": "half \ud83d"}]}]},
    # a tool's result, the text an extension least controls (a fetched page, another API's JSON), nested in a part
    "tool-result": {
        "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "page \ud83d"}]},
        ]
    },
    "tool-call": {
        "messages": [
            *MESSAGES,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '"\udc00"'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "done"},
        ]
    },
    "stop-sequence": {"messages": MESSAGES, "stop": ["\ud83d"], "stop_sequences": ["\ud83d"]},
    # a field of the message's own named so (a handler spreading an input's fields into the message)
    "message-key": {"messages": [{"role": "user", "content": "Call Bob.", "\ud83d": "x"}]},
}


@pytest.mark.parametrize("where", sorted(LONE_SURROGATE_PROMPTS))
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_prompt_with_a_lone_surrogate_is_refused_before_the_call(
    openai_server: FakeOpenAIServer, anthropic_server: FakeAnthropicServer, metered: MakeLLM, provider: str, where: str
) -> None:
    """A prompt holding half an emoji (the JSON escape "\\ud83d" alone, as an HTTP invoke's params can carry it) cannot
    be encoded as UTF-8: the SDK failed while serialising the request, the call was never made, yet an `error` event
    `internal:UnicodeEncodeError` was recorded and a bare UnicodeEncodeError reached the handler (a 500 over HTTP).
    It is a bad argument: `InvalidInputError`, no call, no event, for create_message and stream_message alike."""
    server: FakeProviderServer = openai_server if provider == "openai" else anthropic_server
    llm, rec = metered(provider, server)
    args = LONE_SURROGATE_PROMPTS[where]
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        await llm.create_message(**args)
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        llm.stream_message(**args)
    assert rec.lines == [] and server.requests == [] and llm.calls == 0


# Valid text beyond ASCII: accents, a combining mark, an emoji outside the BMP, a ZWJ family, CJK, right-to-left
VALID_TEXT = "naïve café e\u0301 \U0001f600 \U0001f469\u200d\U0001f469\u200d\U0001f467 中文 مرحبا"


@pytest.mark.parametrize("where", sorted(LONE_SURROGATE_PROMPTS))
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_valid_text_beyond_ascii_is_sent_where_a_lone_surrogate_is_refused(
    openai_server: FakeOpenAIServer, anthropic_server: FakeAnthropicServer, metered: MakeLLM, provider: str, where: str
) -> None:
    """The check that refuses half an emoji reads every text of the request: the same places holding valid text
    beyond ASCII (an emoji, CJK, a combining mark, a right-to-left script) are never refused, and reach the provider
    unchanged, in a call and in a stream."""
    server: FakeProviderServer = openai_server if provider == "openai" else anthropic_server
    llm, rec = metered(provider, server)
    args = json.loads(
        json.dumps(LONE_SURROGATE_PROMPTS[where]).replace("\\ud83d", VALID_TEXT).replace("\\udc00", VALID_TEXT)
    )
    await llm.create_message(**args)
    assert VALID_TEXT in json.dumps(server.last.body, ensure_ascii=False)
    async with llm.stream_message(**args) as stream:
        _ = [chunk async for chunk in stream]
    assert VALID_TEXT in json.dumps(server.last.body, ensure_ascii=False)
    assert len(rec.lines) == 2 and len(server.requests) == 2


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_lone_surrogate_in_a_reply_never_reaches_the_caller(
    openai_server: FakeOpenAIServer, anthropic_server: FakeAnthropicServer, metered: MakeLLM, provider: str
) -> None:
    """A reply holding the JSON escape "\\ud83d" alone (half an emoji) decodes to a str that cannot be encoded as
    UTF-8: returned by a handler, it failed the HTTP invoke with a 500 after the call was billed. It is replaced by
    U+FFFD where provider text enters metering, in a reply and in a stream (a pair split between chunks is kept)."""
    server: FakeProviderServer = openai_server if provider == "openai" else anthropic_server
    chunks = ("Hi \ud83d", "\ude00 there \ud83d")
    server.script(Reply(text="Hello \ud83d there"), Reply(text="".join(chunks), chunks=chunks))
    llm, rec = metered(provider, server)
    response = await llm.create_message(messages=MESSAGES)
    assert response.text == "Hello \ufffd there"
    rec.lines.clear()
    async with llm.stream_message(messages=MESSAGES) as stream:
        received = [chunk async for chunk in stream]
    assert "".join(received) == stream.text == "Hi \U0001f600 there \ufffd"
    assert all(chunk.encode("utf-8") is not None for chunk in received)
    assert the_event(rec).status == "ok"


ANTHROPIC_CACHED = {
    "input_tokens": 20,
    "output_tokens": 7,
    "cache_read_input_tokens": 1000,
    "cache_creation_input_tokens": 300,
}
OPENAI_CACHED = {
    "prompt_tokens": 1320,
    "completion_tokens": 7,
    "prompt_tokens_details": {"cached_tokens": 1000},
    "completion_tokens_details": {"reasoning_tokens": 2},
}


LONG = " ".join(["word"] * 60)  # ≈ 75 tokens by the text estimate: far above the 7 the provider counted


@pytest.mark.parametrize(
    ("provider", "reply", "status", "received", "tokens", "completeness"),
    [
        # (input, output, cache read, cache write, reasoning) of the event
        pytest.param(
            "anthropic", Reply(text="one two three", break_after=0), "error", [], (1320, 1, 1000, 300, 0),
            "estimated", id="broken-at-once",
        ),
        pytest.param(
            "anthropic", Reply(text="one two three", break_after=2), "error", ["one ", "two "], (1320, 2, 1000, 300, 0),
            "estimated", id="broken-mid-way",
        ),
        pytest.param(
            "anthropic", Reply(text="one two three"), "cancelled", ["one "], (1320, 1, 1000, 300, 0), "estimated",
            id="abandoned",
        ),
        # Broken just before the end, after the provider's final usage: its counts are what it charges, kept as they
        # are (the text estimate, far larger here, billed output the provider never counted).
        pytest.param(
            "anthropic", Reply(text=LONG, break_before_end=True), "error", None, (1320, 7, 1000, 300, 0), "reported",
            id="broken-before-message-stop",
        ),
        pytest.param(
            "openai", Reply(text=LONG, break_before_end=True), "error", None, (1320, 7, 1000, 0, 2), "reported",
            id="broken-after-the-usage-chunk",
        ),
    ],
)  # fmt: skip
async def test_an_unfinished_stream_keeps_the_usage_reported_before_it_ended(
    openai_server: FakeOpenAIServer,
    anthropic_server: FakeAnthropicServer,
    metered: MakeLLM,
    provider: str,
    reply: Reply,
    status: str,
    received: list[str] | None,
    tokens: tuple[int, ...],
    completeness: str,
) -> None:
    """Anthropic reports the input and cache counts at the start of a stream (message_start), and charges them whether
    or not the stream ends: an abandoned or broken stream was recorded with its input estimated from the prompt's
    characters and no cache tokens at all (nothing at all when it broke before its first text), so a stream over a
    large cached prompt was billed as if no cache was read or written. The counts reported so far are kept; the
    output is the larger of its count so far and the estimate of the text received; the event says `estimated`. After
    the provider's final usage (broken just before the end), its counts are kept as they are: `reported`."""
    server: FakeProviderServer = openai_server if provider == "openai" else anthropic_server
    usage = OPENAI_CACHED if provider == "openai" else ANTHROPIC_CACHED
    server.script(dataclasses.replace(reply, usage=usage))
    llm, rec = metered(provider, server)
    chunks: list[str] = []
    if status == "cancelled":
        async with llm.stream_message(messages=MESSAGES) as stream:
            async for chunk in stream:
                chunks.append(chunk)
                break
    else:
        with pytest.raises(ProviderError, match="stream"):
            async with llm.stream_message(messages=MESSAGES) as stream:
                async for chunk in stream:
                    chunks.append(chunk)
    assert "".join(chunks) == LONG if received is None else chunks == received
    event = the_event(rec)
    assert (event.status, event.error_type) == (status, None if status == "cancelled" else "stream_broken")
    counts = (event.input_tokens, event.output_tokens, event.cache_read_tokens, event.cache_write_tokens)
    assert (*counts, event.reasoning_tokens) == tokens
    assert event.usage_completeness == completeness


MISTRAL_CONTENT = [{"type": "thinking", "thinking": [{"type": "text", "text": "Hmm."}]}, {"type": "text", "text": "Hi"}]


@pytest.mark.parametrize(
    ("provider", "content", "text"),
    [
        pytest.param("openai", MISTRAL_CONTENT, "Hi", id="openai-parts"),  # Mistral's reasoning models answer so
        pytest.param("openai", 42, "", id="openai-number"),
        pytest.param("anthropic", 42, "", id="anthropic-number"),
    ],
)
async def test_reply_text_that_is_not_a_str_is_read_and_the_call_recorded(
    openai_server: FakeOpenAIServer,
    anthropic_server: FakeAnthropicServer,
    metered: MakeLLM,
    provider: str,
    content: Any,
    text: str,
) -> None:
    """An OpenAI-compatible server answering `content` as a list of parts failed the call after it was made with an
    AttributeError and no event at all (a 500 over HTTP, the provider's usage lost); Anthropic text that is not a str
    recorded an `internal:TypeError` with no tokens. The text parts are read; anything else is no text."""
    server: FakeProviderServer = openai_server if provider == "openai" else anthropic_server
    body = server.json_body({"model": "m-test"}, Reply())
    if provider == "openai":
        body["choices"][0]["message"]["content"] = content
    else:
        body["content"][0]["text"] = content
    server.script(Raw(json.dumps(body).encode(), "application/json"))
    llm, rec = metered(provider, server)
    assert (await llm.create_message(messages=MESSAGES)).text == text
    event = the_event(rec)
    assert (event.status, event.usage_completeness, event.input_tokens, event.output_tokens) == (
        "ok",
        "reported",
        12,
        6,
    )
    rec.lines.clear()
    if provider == "openai":
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m-test"}
        frame = {**chunk, "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    else:
        frame = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": content}}
    prefix = b"" if provider == "openai" else b"event: content_block_delta\n"
    server.script(Reply(text="one two", frame_before=(1, prefix + b"data: " + json.dumps(frame).encode() + b"\n\n")))
    async with llm.stream_message(messages=MESSAGES) as stream:
        received = [chunk async for chunk in stream]
    assert received == (["one ", text, "two"] if text else ["one ", "two"])
    assert (the_event(rec).status, the_event(rec).usage_completeness) == ("ok", "reported")


async def test_an_anthropic_stream_without_final_usage_keeps_its_input_and_estimates_its_output(
    anthropic_server: FakeAnthropicServer, metered: MakeLLM
) -> None:
    """Some Anthropic-compatible gateways send message_delta without usage: the event said `reported` with
    message_start's output count (a placeholder: 1) for the whole reply. The input and cache counts of message_start
    are kept; the output is estimated from the text (`estimated`)."""
    anthropic_server.script(Reply(text=TEXT, usage=ANTHROPIC_CACHED, final_usage=False))
    llm, rec = metered("anthropic", anthropic_server)
    async with llm.stream_message(messages=MESSAGES) as stream:
        assert "".join([chunk async for chunk in stream]) == TEXT
    event = the_event(rec)
    assert (event.status, event.stop_reason, event.usage_completeness) == ("ok", "end_turn", "estimated")
    counts = (event.input_tokens, event.output_tokens, event.cache_read_tokens, event.cache_write_tokens)
    assert counts == (1320, len(TEXT) // 4, 1000, 300)


XAI_USAGE = {  # a real xAI Grok answer: reasoning beside completion_tokens (32 + 9 + 94 = 135)
    "prompt_tokens": 32,
    "completion_tokens": 9,
    "total_tokens": 135,
    "prompt_tokens_details": {"text_tokens": 32, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 94, "audio_tokens": 0},
}


@pytest.mark.parametrize("provider", ["openai", "openai_compatible"])
@pytest.mark.parametrize("how", ["complete", "stream", "stream-broken-after-the-usage-chunk"])
async def test_reasoning_reported_outside_completion_is_billed_as_output(
    openai_server: FakeOpenAIServer, metered: MakeLLM, provider: str, how: str
) -> None:
    """xAI (Grok) reports reasoning tokens beside completion_tokens, its total_tokens = prompt + completion + reasoning:
    the event said 9 output tokens (reasoning capped at them) for a call charged 103. total_tokens witnesses where the
    reasoning is counted: output = completion + reasoning, reasoning a part of it (in a stream's usage chunk too, and
    when the stream breaks after it)."""
    broken = how == "stream-broken-after-the-usage-chunk"
    openai_server.script(Reply(text=TEXT, usage=XAI_USAGE, break_before_end=broken))
    llm, rec = metered(provider, openai_server)
    if how == "complete":
        response = await llm.create_message(messages=MESSAGES)
        assert (response.usage.output_tokens, response.usage.reasoning_tokens) == (103, 94)
    elif broken:
        with pytest.raises(ProviderError, match="stream"):
            async with llm.stream_message(messages=MESSAGES) as stream:
                assert "".join([chunk async for chunk in stream]) == TEXT
    else:
        async with llm.stream_message(messages=MESSAGES) as stream:
            assert "".join([chunk async for chunk in stream]) == TEXT
    event = the_event(rec)
    assert (event.provider, event.is_stream, event.status, event.usage_completeness) == (
        provider,
        how != "complete",
        "error" if broken else "ok",
        "reported",
    )
    assert (event.input_tokens, event.output_tokens, event.reasoning_tokens) == (32, 103, 94)
    assert openai_server.last.body.get("stream_options") == (None if how == "complete" else {"include_usage": True})


DEEPSEEK_USAGE = {  # DeepSeek's own API: prompt_tokens = prompt_cache_hit_tokens + prompt_cache_miss_tokens
    "prompt_tokens": 1100,
    "completion_tokens": 40,
    "total_tokens": 1140,
    "prompt_cache_hit_tokens": 1024,
    "prompt_cache_miss_tokens": 76,
}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_deepseek_cache_hits_are_recorded_as_cache_reads(
    openai_server: FakeOpenAIServer, metered: MakeLLM, stream: bool
) -> None:
    """DeepSeek reports its cache hits as prompt_cache_hit_tokens, not prompt_tokens_details.cached_tokens: the event
    said 0 cache-read tokens, so an override's cache-read price was never used (hits billed as full-price input)."""
    openai_server.script(Reply(text=TEXT, usage=DEEPSEEK_USAGE))
    llm, rec = metered("openai_compatible", openai_server)
    if stream:
        async with llm.stream_message(messages=MESSAGES) as streamed:
            assert "".join([chunk async for chunk in streamed]) == TEXT
    else:
        await llm.create_message(messages=MESSAGES)
    event = the_event(rec)
    assert (event.status, event.usage_completeness) == ("ok", "reported")
    assert (event.input_tokens, event.cache_read_tokens, event.output_tokens) == (1100, 1024, 40)


def anthropic_sse(start_usage: dict[str, Any], delta_usage: dict[str, Any], text: str = TEXT) -> Raw:
    """An Anthropic stream whose message_start and message_delta carry these usages (as a gateway may send them)."""
    message = {"id": "msg_x", "type": "message", "role": "assistant", "model": "m-test", "content": []}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {**message, "usage": start_usage}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage}),
        ("message_stop", {"type": "message_stop"}),
    ]
    body = b"".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode() for kind, data in events)
    return Raw(body, "text/event-stream")


START = {"input_tokens": 20, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 300, "output_tokens": 1}
ZEROS = {"input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}


@pytest.mark.parametrize(
    ("start_usage", "delta_usage"),
    [
        pytest.param(START, {"output_tokens": 7}, id="output-only"),
        pytest.param(START, {**START, "output_tokens": 7}, id="cumulative"),  # the API today: input counts repeated
        pytest.param(START, {**ZEROS, "output_tokens": 7}, id="zero-filled"),  # a gateway's zeros for "not counted"
        pytest.param(START, {"input_tokens": 0, "output_tokens": 7}, id="zero-input"),
        pytest.param({**ZEROS, "output_tokens": 0}, {**START, "output_tokens": 7}, id="counts-only-at-the-end"),
    ],
)
async def test_an_anthropic_stream_keeps_the_input_counts_of_either_event(
    anthropic_server: FakeAnthropicServer,
    metered: MakeLLM,
    start_usage: dict[str, Any],
    delta_usage: dict[str, Any],
) -> None:
    """message_delta's counts are cumulative (they never fall below message_start's), and some Anthropic-compatible
    gateways fill the input counts they do not know with 0 there: that 0 replaced message_start's count, so the event
    said 0 uncached input tokens (and no cache tokens at all when every count was 0: the input then estimated from
    the prompt's characters). A 0 after a count is no count; a count after a 0 (a gateway that counts only at the
    end) is."""
    anthropic_server.script(anthropic_sse(start_usage, delta_usage))
    llm, rec = metered("anthropic", anthropic_server)
    async with llm.stream_message(messages=MESSAGES) as stream:
        assert "".join([chunk async for chunk in stream]) == TEXT
    event = the_event(rec)
    assert (event.status, event.usage_completeness) == ("ok", "reported")
    counts = (event.input_tokens, event.output_tokens, event.cache_read_tokens, event.cache_write_tokens)
    assert counts == (1320, 7, 1000, 300)


ANTHROPIC_SEARCHED = {
    **ANTHROPIC_CACHED,
    "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
    "server_tool_use": {"web_search_requests": 3},
}


def counts_of(event: UsageEvent) -> tuple[int, ...]:
    """(input, output, cache read, cache write, of which 1-hour, web searches) of the event."""
    return (
        event.input_tokens,
        event.output_tokens,
        event.cache_read_tokens,
        event.cache_write_tokens,
        event.cache_write_1h_tokens,
        event.web_searches,
    )


async def test_an_anthropic_call_records_its_one_hour_cache_writes_and_web_searches(
    anthropic_server: FakeAnthropicServer, metered: MakeLLM
) -> None:
    """Anthropic bills cache writes kept for an hour at 2x the input price (5-minute ones at 1.25x) and each web search
    its server ran ($10 per 1,000): the event recorded neither, so both were billed as nothing more than tokens."""
    anthropic_server.script(Reply(text=TEXT, usage=ANTHROPIC_SEARCHED), Reply(text=TEXT, usage=ANTHROPIC_SEARCHED))
    llm, rec = metered("anthropic", anthropic_server)
    assert (await llm.create_message(messages=MESSAGES)).text == TEXT
    event = the_event(rec)
    assert (event.status, event.usage_completeness, event.is_stream) == ("ok", "reported", False)
    assert counts_of(event) == (1320, 7, 1000, 300, 200, 3)
    rec.lines.clear()
    async with llm.stream_message(messages=MESSAGES) as stream:
        assert "".join([chunk async for chunk in stream]) == TEXT
    event = the_event(rec)
    assert (event.status, event.usage_completeness, event.is_stream) == ("ok", "reported", True)
    assert counts_of(event) == (1320, 7, 1000, 300, 200, 3)


@pytest.mark.parametrize(
    ("reply", "status", "counts", "completeness"),
    [
        # message_start's cache writes by TTL are kept; the provider counts the searches in message_delta, at the end:
        # before it, the searches are those whose results the stream showed (here all three, before the text)
        pytest.param(
            Reply(text="one two three"), "cancelled", (1320, 1, 1000, 300, 200, 3), "estimated", id="abandoned",
        ),
        pytest.param(
            Reply(text="one two three", break_after=1), "error", (1320, 1, 1000, 300, 200, 3), "estimated",
            id="broken-mid-way",
        ),
        pytest.param(
            Reply(text=TEXT, break_before_end=True), "error", (1320, 7, 1000, 300, 200, 3), "reported",
            id="broken-before-message-stop",
        ),
        pytest.param(
            Reply(text=TEXT, final_usage=False), "ok", (1320, len(TEXT) // 4, 1000, 300, 200, 3), "estimated",
            id="no-final-usage",
        ),
    ],
)  # fmt: skip
async def test_an_anthropic_stream_that_ends_early_keeps_its_one_hour_cache_writes_and_web_searches(
    anthropic_server: FakeAnthropicServer,
    metered: MakeLLM,
    reply: Reply,
    status: str,
    counts: tuple[int, ...],
    completeness: str,
) -> None:
    """A stream that does not end normally is billed on what the provider reported before: its 1-hour cache writes
    (message_start) are kept with the other cache counts, and the web searches it ran, which the provider counts only
    at the end (message_delta) but charges anyway, are those whose results the stream showed."""
    anthropic_server.script(dataclasses.replace(reply, usage=ANTHROPIC_SEARCHED))
    llm, rec = metered("anthropic", anthropic_server)
    if status == "cancelled":
        async with llm.stream_message(messages=MESSAGES) as stream:
            async for _chunk in stream:
                break
    elif status == "error":
        with pytest.raises(ProviderError, match="stream"):
            async with llm.stream_message(messages=MESSAGES) as stream:
                async for _chunk in stream:
                    pass
    else:
        async with llm.stream_message(messages=MESSAGES) as stream:
            async for _chunk in stream:
                pass
    event = the_event(rec)
    assert (event.status, event.usage_completeness) == (status, completeness)
    assert counts_of(event) == counts
    line = json.loads(rec.lines[0])
    assert (line["cache_write_1h_tokens"], line.get("web_searches", 0)) == counts[4:]


async def test_an_anthropic_call_without_them_writes_neither_field(
    anthropic_server: FakeAnthropicServer, metered: MakeLLM
) -> None:
    anthropic_server.script(Reply(text=TEXT, usage=ANTHROPIC_CACHED))
    llm, rec = metered("anthropic", anthropic_server)
    await llm.create_message(messages=MESSAGES)
    assert counts_of(the_event(rec)) == (1320, 7, 1000, 300, 0, 0)
    assert {"cache_write_1h_tokens", "web_searches"}.isdisjoint(json.loads(rec.lines[0]))


def _without_usage(server: FakeAnthropicServer) -> None:
    """Have the server answer as a gateway that drops the whole usage (JSON message, message_start, message_delta),
    passing on the content: the search results too."""
    json_body, stream_frames = server.json_body, server.stream_frames

    def body(request: Any, reply: Reply) -> dict[str, Any]:
        message = json_body(request, reply)
        del message["usage"]
        return message

    def frames(request: Any, reply: Reply):  # type: ignore[no-untyped-def]
        for frame in stream_frames(request, reply):
            if frame is not None and frame.startswith((b"event: message_start", b"event: message_delta")):
                event, data = frame.split(b"data: ", 1)
                parsed = json.loads(data)
                parsed.pop("usage", None)
                parsed.get("message", {}).pop("usage", None)
                frame = event + b"data: " + json.dumps(parsed).encode() + b"\n\n"
            yield frame

    server.json_body = body  # type: ignore[method-assign]
    server.stream_frames = frames  # type: ignore[method-assign]


async def test_an_anthropic_reply_without_usage_keeps_the_web_searches_it_showed(
    anthropic_server: FakeAnthropicServer, metered: MakeLLM
) -> None:
    """A gateway that drops the usage: the tokens are estimated, and the searches whose results the reply showed are
    charged with them, in a call, a stream and a stream broken mid-way (they were dropped: 0 searches billed)."""
    _without_usage(anthropic_server)
    anthropic_server.script(
        Reply(text=TEXT, usage=ANTHROPIC_SEARCHED),
        Reply(text=TEXT, usage=ANTHROPIC_SEARCHED),
        Reply(text="one two three", usage=ANTHROPIC_SEARCHED, break_after=1),
    )
    llm, rec = metered("anthropic", anthropic_server)
    await llm.create_message(messages=MESSAGES)
    async with llm.stream_message(messages=MESSAGES) as stream:
        assert "".join([chunk async for chunk in stream]) == TEXT
    with pytest.raises(ProviderError, match="stream"):
        async with llm.stream_message(messages=MESSAGES) as stream:
            async for _chunk in stream:
                pass
    events = [decode_line(line) for line in rec.lines]
    assert all(isinstance(e, UsageEvent) for e in events)
    summary = [(e.status, e.usage_completeness, e.web_searches, e.input_tokens > 0) for e in events]  # type: ignore[union-attr]
    assert summary == [("ok", "estimated", 3, True), ("ok", "estimated", 3, True), ("error", "estimated", 3, True)]


async def test_an_endpoint_that_refuses_stream_options_still_streams_on_the_users_own_llm(
    openai_server: FakeOpenAIServer, metered: MakeLLM
) -> None:
    """Azure OpenAI before api-version 2024-09-01-preview, and some gateways, refuse `stream_options` with a 400
    ("Unrecognized request argument supplied: stream_options"): every stream of a user whose own LLM sits behind one
    failed as `bad_request` and, with fallback policy `platform`, was served by the platform LLM, billed to the user,
    though the user's LLM answers the same call without the option (create_message worked). The adapter now streams
    again without it (one call, one event; the usage, not reported then, is estimated) and leaves it out from then
    on for that endpoint."""
    openai_server.unknown_params = frozenset({"stream_options"})
    own = ByollmSettings(
        "u1", "t1", "openai_compatible", "llama3", api_key="sk-user-0123456789", base_url=openai_server.base_url
    )
    llm, rec = metered("openai", openai_server, InMemorySettings(byollm_by_user={"u1": own}))
    for n in (1, 2):
        async with llm.stream_message(messages=MESSAGES) as stream:
            text = "".join([chunk async for chunk in stream])
        assert text == "Hello from the fake server."
        event = decode_line(rec.lines[-1])
        assert isinstance(event, UsageEvent) and len(rec.lines) == n
        assert (event.status, event.is_byollm, event.is_failover, event.provider) == (
            "ok",
            True,
            False,
            "openai_compatible",
        )
        assert event.usage_completeness == "estimated" and event.input_tokens > 0 and event.output_tokens > 0
    bodies = [request.body for request in openai_server.requests]
    assert ["stream_options" in body for body in bodies] == [True, False, False]  # asked once, then left out
    assert llm.all_byollm is True


async def test_an_endpoint_that_refuses_json_mode_still_answers_json_on_the_users_own_llm(
    openai_server: FakeOpenAIServer, metered: MakeLLM
) -> None:
    """LM Studio, named among the OpenAI-compatible servers a user's own LLM may be, refuses OpenAI's JSON mode with a
    400 ("'response_format.type' must be 'json_schema' or 'text'"): every `response_format="json"` call on it (the
    rewrite extension's extract_action_items) failed as `bad_request` and, with fallback policy `platform`, was served
    by the platform LLM, billed to the user. The call is made again without the parameter (the system prompt already
    asks for JSON; one call, one event) and the adapter leaves it out from then on for that endpoint."""
    openai_server.refuses_json_object = True
    openai_server.default = Reply(text='{"items": [{"owner": "Bob", "deadline": null, "task": "Call Ann"}]}')
    own = ByollmSettings(
        "u1", "t1", "openai_compatible", "qwen", api_key="sk-user-0123456789", base_url=openai_server.base_url
    )
    llm, rec = metered("openai", openai_server, InMemorySettings(byollm_by_user={"u1": own}))
    for n in (1, 2):
        response = await llm.create_message(system="Extract action items.", messages=MESSAGES, response_format="json")
        assert response.json == {"items": [{"owner": "Bob", "deadline": None, "task": "Call Ann"}]}
        event = decode_line(rec.lines[-1])
        assert isinstance(event, UsageEvent) and len(rec.lines) == n
        assert (event.status, event.is_byollm, event.is_failover) == ("ok", True, False)
        assert event.usage_completeness == "reported"
    bodies = [request.body for request in openai_server.requests]
    assert ["response_format" in body for body in bodies] == [True, False, False]  # asked once, then left out
    assert "JSON" in bodies[-1]["messages"][0]["content"]  # the instruction still asks for it


async def test_the_refusals_an_adapter_keeps_are_bounded_however_many_models_it_serves(
    openai_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal of an optional parameter is kept per model, and one adapter serves every model of its endpoint and
    key: a user whose own LLM refuses JSON mode (LM Studio) and who names another model in each settings change grew
    the adapter's refusals by one for each, for as long as the key was kept (no bound). They are bounded now: past
    the bound, a model's JSON call is still refused and made again without it (one call, one event), not kept."""
    bound = 4  # (MAX_REFUSED's 256 made smaller: the test makes a few calls past it)
    monkeypatch.setattr(openai_adapter, "MAX_REFUSED", bound)
    openai_server.refuses_json_object = True
    openai_server.default = Reply(text='{"ok": true}')
    config = ProviderConfig("openai_compatible", "m", api_key="sk-user-0123456789", base_url=openai_server.base_url)
    adapter = make_provider(config)
    assert isinstance(adapter, OpenAIProvider)
    try:
        for n in range(bound + 3):
            result = await adapter.complete(ProviderRequest(f"model-{n}", None, MESSAGES, 16, None, "json", {}))
            assert result.text == '{"ok": true}'
    finally:
        await adapter.aclose()
    assert len(adapter._refused) == bound
    assert len(openai_server.requests) == 2 * (bound + 3)


async def test_a_model_that_refuses_json_mode_leaves_it_on_for_the_endpoints_other_models(
    openai_server: FakeOpenAIServer, metered: MakeLLM
) -> None:
    """OpenAI refuses JSON mode for its older models only ("'response_format' of type 'json_object' is not supported
    with this model"), and one adapter (endpoint and key) serves every model of the platform's purposes: once a
    purpose on gpt-4 had its JSON call refused, every later JSON call of every purpose on that endpoint (gpt-4o
    included) went without JSON mode for the life of the process. A refusal is kept for the model it came from."""
    openai_server.json_object_refused_by = frozenset({"gpt-4"})
    openai_server.default = Reply(text='{"ok": true}')
    old = PurposeSettings("legacy", "openai", "gpt-4", openai_server.base_url, {})
    new = PurposeSettings("content_rewrite", "openai", "gpt-4o", openai_server.base_url, {})
    llm, rec = metered(
        "openai", openai_server, InMemorySettings(purpose_by_name={"legacy": old, "content_rewrite": new})
    )
    for purpose in ("legacy", "content_rewrite", "legacy", "content_rewrite"):
        response = await llm.create_message(messages=MESSAGES, purpose=purpose, response_format="json")
        assert response.json == {"ok": True}
    assert len(rec.lines) == 4
    sent = [(request.body["model"], "response_format" in request.body) for request in openai_server.requests]
    assert sent == [
        ("gpt-4", True),  # refused: asked again without it
        ("gpt-4", False),
        ("gpt-4o", True),  # another model of the same endpoint: JSON mode still asked for
        ("gpt-4", False),  # the refusing model: left out from then on
        ("gpt-4o", True),
    ]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_purposes_temperature_reaches_the_provider(
    openai_server: FakeOpenAIServer, anthropic_server: FakeAnthropicServer, metered: MakeLLM, provider: str
) -> None:
    """The admin's per-purpose settings are applied to the purpose's calls (the recipe's cascade), their `params`
    included: a `temperature` there, the first thing one tunes per purpose, was dropped by both adapters (only
    top_p, stop, seed, ... were passed on), silently. It is the call's temperature unless the caller gives one."""
    server: FakeProviderServer = openai_server if provider == "openai" else anthropic_server
    purpose = PurposeSettings("content_rewrite", provider, "m-rewrite", server.base_url, {"temperature": 0.2})
    llm, _ = metered(provider, server, InMemorySettings(purpose_by_name={"content_rewrite": purpose}))
    await llm.create_message(messages=MESSAGES, purpose="content_rewrite")
    assert (server.last.body["model"], server.last.body.get("temperature")) == ("m-rewrite", 0.2)
    async with llm.stream_message(messages=MESSAGES, purpose="content_rewrite") as stream:
        _ = [chunk async for chunk in stream]
    assert server.last.body.get("temperature") == 0.2
    await llm.create_message(messages=MESSAGES, purpose="content_rewrite", temperature=0.9)  # the caller's wins
    assert server.last.body.get("temperature") == 0.9
    await llm.create_message(messages=MESSAGES)  # another purpose: none
    assert "temperature" not in server.last.body
