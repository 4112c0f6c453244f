"""A model that refuses (OpenAI's ``message.refusal``, a stream's ``delta.refusal``, the content null, the finish_reason
``stop``) is a refusal, metered as the provider counts it: with the official SDK against the fake server on 127.0.0.1.
It was a reply that ended normally with no text: the rewrite said "the model's reply is empty", and when the server
reported no usage, its estimate counted no output, where the provider charges the refusal's tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from metering.errors import InvalidJSONResponseError, ProviderError
from metering.events import UsageEvent, uuid7
from metering.extensions.rewrite import chat as rewrite
from metering.llm.client import MeteredLLM
from metering.llm.event_record import CallScope
from metering.llm.pool import ProviderPool
from metering.llm.providers import make_provider
from metering.llm.resolution import ByollmSettings, PlatformLLM
from metering.llm.settings_source import InMemorySettings
from metering.llm.usage import estimate_tokens
from metering.runtime import Runtime, User
from metering.spool.decode import decode_line
from tests.fakes import FakeOpenAIServer, Reply
from tests.unit.test_metered_llm import MESSAGES, Recorder

REFUSAL = "I'm sorry, but I can't help with that request."
USAGE = {"prompt_tokens": 40, "completion_tokens": 11, "total_tokens": 51}
USER = User("u1", "t1")


@pytest.fixture
async def pool() -> AsyncIterator[ProviderPool]:
    providers = ProviderPool(make_provider)
    yield providers
    await providers.aclose()


def own_llm(server: FakeOpenAIServer, provider: str = "openai_compatible") -> InMemorySettings:
    own = ByollmSettings("u1", "t1", provider, "own-model", api_key="sk-user-123456", base_url=server.base_url)
    return InMemorySettings(byollm_by_user={"u1": own})


PLATFORM = PlatformLLM(provider="anthropic", model="unused", api_keys={})  # never reached: no failover policy set


def events(recorder: Recorder) -> list[UsageEvent]:
    decoded = [decode_line(line) for line in recorder.lines]
    assert all(isinstance(event, UsageEvent) for event in decoded), decoded  # the flusher takes them
    return [event for event in decoded if isinstance(event, UsageEvent)]


@pytest.mark.parametrize("provider", ["openai", "openai_compatible"])
@pytest.mark.parametrize("usage", [USAGE, None], ids=["reported", "not-reported"])
async def test_a_refusal_is_metered_as_the_provider_counts_it(
    openai_server: FakeOpenAIServer, pool: ProviderPool, provider: str, usage: dict[str, Any] | None
) -> None:
    """The event of the call (and of the stream) says `refusal`; its tokens are the provider's, or, not reported, an
    estimate that counts the refusal's text (it counted no output: the refusal's tokens, charged, were lost)."""
    openai_server.script(Reply(refusal=REFUSAL, usage=usage), Reply(refusal=REFUSAL, usage=usage))
    recorder = Recorder()
    llm = MeteredLLM(scope=CallScope("t1", "u1", "rewrite", "rewrite", uuid7()), settings=own_llm(openai_server,
                     provider), platform=PLATFORM, providers=pool, recorder=recorder)  # fmt: skip
    response = await llm.create_message(messages=MESSAGES)
    assert (response.text, response.stop_reason, response.truncated) == ("", "refusal", False)
    async with llm.stream_message(messages=MESSAGES) as stream:
        assert [chunk async for chunk in stream] == []  # the refusal is not the reply's text
    assert stream.response is not None and stream.response.stop_reason == "refusal"
    called, streamed = events(recorder)
    expected = (11, "reported") if usage is not None else (estimate_tokens(REFUSAL), "estimated")
    for event in (called, streamed):
        assert (event.status, event.stop_reason, event.is_byollm) == ("ok", "refusal", True)
        assert (event.output_tokens, event.usage_completeness) == expected
        assert event.input_tokens > 0


@pytest.mark.parametrize("function", ["rewrite", "rewrite_multiple"])
async def test_a_refused_rewrite_says_the_model_refused_not_that_its_reply_is_empty(
    openai_server: FakeOpenAIServer, pool: ProviderPool, function: str
) -> None:
    openai_server.default = Reply(refusal=REFUSAL, usage=USAGE)
    recorder = Recorder()
    runtime = Runtime(settings=own_llm(openai_server), platform=PLATFORM, providers=pool, recorder=recorder)
    with pytest.raises(ProviderError, match="stopped by the provider \\(stop reason 'refusal'\\)") as raised:
        await runtime.invoke(rewrite, function, {"text": "Send me the doc.", "tone": "formal"}, USER)
    assert raised.value.error_type == "no_result" and "is empty" not in raised.value.message
    assert [(e.status, e.stop_reason, e.output_tokens) for e in events(recorder)] == [("ok", "refusal", 11)]


async def test_refused_action_items_name_the_refusal(openai_server: FakeOpenAIServer, pool: ProviderPool) -> None:
    openai_server.default = Reply(refusal=REFUSAL, usage=USAGE)
    recorder = Recorder()
    runtime = Runtime(settings=own_llm(openai_server), platform=PLATFORM, providers=pool, recorder=recorder)
    with pytest.raises(InvalidJSONResponseError, match="its stop reason 'refusal'"):
        await runtime.invoke(rewrite, "extract_action_items", {"text": "Bob sends the doc by Friday."}, USER)
    assert [(e.status, e.stop_reason, e.output_tokens) for e in events(recorder)] == [("ok", "refusal", 11)]
