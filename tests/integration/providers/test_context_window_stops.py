"""A reply cut off because the model's context window ran out (Anthropic's stop reason
``model_context_window_exceeded``; Mistral's finish_reason ``model_length``, over the OpenAI-compatible API) is as
incomplete as one cut off at max_tokens: with the official SDKs against the fake servers on 127.0.0.1. It was taken
for a reply that ended otherwise: a rewrite so cut was returned with `truncated: false`, and a JSON reply's error said
"the provider stopped the reply", not that it was cut off."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
from metering.runtime import Runtime, User
from metering.spool.decode import decode_line
from tests.fakes import FakeProviderServer, Reply
from tests.unit.test_metered_llm import MESSAGES, Recorder

USER = User("u1", "t1")
PLATFORM = PlatformLLM(provider="anthropic", model="unused", api_keys={})  # never reached: no failover policy set
CONTEXT_WINDOW = "model_context_window_exceeded"
# (provider, the stop reason it sends): Anthropic's own; Mistral's over the OpenAI-compatible API; a compatible
# server passing Anthropic's name on (Z.ai's)
SENT = [("anthropic", CONTEXT_WINDOW), ("openai_compatible", "model_length"), ("openai_compatible", CONTEXT_WINDOW)]


@pytest.fixture
async def pool() -> AsyncIterator[ProviderPool]:
    providers = ProviderPool(make_provider)
    yield providers
    await providers.aclose()


def served_by(request: pytest.FixtureRequest, provider: str) -> tuple[FakeProviderServer, InMemorySettings]:
    server: FakeProviderServer = request.getfixturevalue(
        "anthropic_server" if provider == "anthropic" else "openai_server"
    )
    own = ByollmSettings("u1", "t1", provider, "own-model", api_key="sk-user-123456", base_url=server.base_url)
    return server, InMemorySettings(byollm_by_user={"u1": own})


def recorded(recorder: Recorder) -> list[UsageEvent]:
    events = [decode_line(line) for line in recorder.lines]
    assert all(isinstance(event, UsageEvent) for event in events), events
    return [event for event in events if isinstance(event, UsageEvent)]


@pytest.mark.parametrize(("provider", "sent"), SENT)
async def test_a_reply_cut_off_by_the_context_window_is_truncated(
    request: pytest.FixtureRequest, pool: ProviderPool, provider: str, sent: str
) -> None:
    """In a call and in a stream; the event records the stop reason (Mistral's under Anthropic's name)."""
    server, settings = served_by(request, provider)
    server.script(Reply(text="Dear Sir, please", stop_reason=sent), Reply(text="Dear Sir, please", stop_reason=sent))
    recorder = Recorder()
    llm = MeteredLLM(scope=CallScope("t1", "u1", "rewrite", "rewrite", uuid7()), settings=settings, platform=PLATFORM,
                     providers=pool, recorder=recorder)  # fmt: skip
    response = await llm.create_message(messages=MESSAGES)
    assert (response.stop_reason, response.truncated) == (CONTEXT_WINDOW, True)
    async with llm.stream_message(messages=MESSAGES) as stream:
        assert "".join([chunk async for chunk in stream]) == "Dear Sir, please"
    assert stream.response is not None and (stream.response.stop_reason, stream.response.truncated) == (
        CONTEXT_WINDOW,
        True,
    )
    assert [(e.status, e.stop_reason) for e in recorded(recorder)] == [("ok", CONTEXT_WINDOW)] * 2


@pytest.mark.parametrize(("provider", "sent"), SENT[:2])
@pytest.mark.parametrize(("function", "extra"), [("rewrite", {}), ("rewrite_multiple", {"n_variations": 2})])
async def test_a_rewrite_cut_off_by_the_context_window_says_so(
    request: pytest.FixtureRequest, pool: ProviderPool, provider: str, sent: str, function: str, extra: dict[str, int]
) -> None:
    server, settings = served_by(request, provider)
    server.default = Reply(text="Dear Sir, please", stop_reason=sent)
    runtime = Runtime(settings=settings, platform=PLATFORM, providers=pool, recorder=Recorder())
    result = await runtime.invoke(rewrite, function, {"text": "Send me the doc.", "tone": "formal", **extra}, USER)
    assert result.result["truncated"] is True


@pytest.mark.parametrize(("provider", "sent"), SENT[:2])
async def test_a_rewrite_cut_off_by_the_context_window_before_any_text_says_so(
    request: pytest.FixtureRequest, pool: ProviderPool, provider: str, sent: str
) -> None:
    server, settings = served_by(request, provider)
    server.default = Reply(text="", stop_reason=sent)
    runtime = Runtime(settings=settings, platform=PLATFORM, providers=pool, recorder=Recorder())
    with pytest.raises(ProviderError, match="is empty: it stopped where the model's context window ran out"):
        await runtime.invoke(rewrite, "rewrite", {"text": "Send me the doc.", "tone": "formal"}, USER)


@pytest.mark.parametrize(("provider", "sent"), SENT[:2])
async def test_action_items_cut_off_by_the_context_window_say_so(
    request: pytest.FixtureRequest, pool: ProviderPool, provider: str, sent: str
) -> None:
    server, settings = served_by(request, provider)
    server.default = Reply(text='{"items": [{"owner": "Bob", "ta', stop_reason=sent)
    recorder = Recorder()
    runtime = Runtime(settings=settings, platform=PLATFORM, providers=pool, recorder=recorder)
    with pytest.raises(
        InvalidJSONResponseError, match="the reply was cut off where the model's context window ran out"
    ):
        await runtime.invoke(rewrite, "extract_action_items", {"text": "Bob sends the doc by Friday."}, USER)
    assert [(e.status, e.stop_reason) for e in recorded(recorder)] == [("ok", CONTEXT_WINDOW)]  # metered, billed
