"""Audio (OpenAI Chat Completions ``input_audio`` parts, ``prompt_tokens_details.audio_tokens``). A UsageEvent has no
audio fields, so audio tokens would be counted, and priced, as text tokens (about 13 times under for gpt-audio):
``ctx.llm`` refuses audio parts before the call, and audio tokens a provider reports anyway are input tokens priced at
the text rate. This pins what docs/ctx-llm.md and docs/billing.md say."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
import pytest

from metering.billing.pricing import PriceBook
from metering.billing.rates import RateCards
from metering.errors import InvalidInputError
from metering.events import UsageCompleteness, uuid7
from metering.llm.client import MeteredLLM
from metering.llm.event_record import CallScope
from metering.llm.pool import ProviderPool
from metering.llm.providers import make_provider
from metering.llm.resolution import PlatformLLM
from metering.llm.settings_source import InMemorySettings
from tests.fakes import FakeOpenAIServer, Reply
from tests.unit.test_metered_llm import Recorder

AUDIO_USAGE = {
    "prompt_tokens": 1_000,  # 900 of them audio (inside prompt_tokens, as OpenAI reports them)
    "completion_tokens": 10,
    "total_tokens": 1_010,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 900, "text_tokens": 100},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "text_tokens": 10},
}
AUDIO_PART = {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}}


async def test_audio_tokens_reported_anyway_are_input_tokens_priced_at_the_text_rate(
    openai_server: FakeOpenAIServer,
) -> None:
    openai_server.script(Reply(text="It says hello.", usage=AUDIO_USAGE))
    platform = PlatformLLM(
        provider="openai", model="gpt-audio", base_url=openai_server.base_url, timeout_s=5, max_retries=0,
        api_keys={"openai": "sk-platform-key-123456"},
    )  # fmt: skip
    pool, recorder = ProviderPool(make_provider), Recorder()
    llm = MeteredLLM(
        scope=CallScope("t1", "u1", "rewrite", "rewrite", uuid7()),
        settings=InMemorySettings(),
        platform=platform,
        providers=pool,
        recorder=recorder,
    )
    try:
        content = [{"type": "text", "text": "What does it say?"}]  # e.g. a gateway that reports audio it added
        await llm.create_message(messages=[{"role": "user", "content": content}], modalities=["text", "audio"])
    finally:
        await pool.aclose()
    sent = openai_server.last.body
    assert "modalities" not in sent and "audio" not in sent  # not passed through: no audio output can be asked for
    [event] = recorder.events
    assert (event.input_tokens, event.output_tokens, event.usage_completeness) == (
        1_000, 10, UsageCompleteness.REPORTED,
    )  # fmt: skip

    at = datetime.now(UTC)
    quote = RateCards(PriceBook()).quote("openai", "gpt-audio", at, 1_000, 10, 0, 0, 0, 0)
    assert quote is not None
    text_rate = (1_000 * Decimal("2.5") + 10 * Decimal("10")) / 1_000_000  # gpt-audio's text prices, $/token
    assert Decimal(quote.cost_nanos) / 10**9 == text_rate
    # What the price source charges when told which tokens are audio (gpt-audio: $32/Mtok of audio input, not 2.5).
    usage = genai_prices.Usage(input_tokens=1_000, output_tokens=10, input_audio_tokens=900)
    priced = genai_prices.calc_price(usage, "gpt-audio", provider_id="openai", genai_request_timestamp=at)
    assert priced.total_price == (100 * Decimal("2.5") + 900 * Decimal("32") + 10 * Decimal("10")) / 1_000_000


def _llm(openai_server: FakeOpenAIServer, pool: ProviderPool, recorder: Recorder) -> MeteredLLM:
    platform = PlatformLLM(
        provider="openai", model="gpt-audio", base_url=openai_server.base_url, timeout_s=5, max_retries=0,
        api_keys={"openai": "sk-platform-key-123456"},
    )  # fmt: skip
    return MeteredLLM(
        scope=CallScope("t1", "u1", "rewrite", "rewrite", uuid7()),
        settings=InMemorySettings(),
        platform=platform,
        providers=pool,
        recorder=recorder,
    )


TEXT_PART = {"type": "text", "text": "What does it say?"}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "content",
    [
        [TEXT_PART, AUDIO_PART],
        [TEXT_PART, {"type": "audio", "source": {}}],
        (TEXT_PART, AUDIO_PART),  # a tuple reaches the provider as a JSON array like a list's (once let through)
    ],
)
async def test_audio_parts_are_refused_before_any_call(
    openai_server: FakeOpenAIServer, content: list[object] | tuple[object, ...], stream: bool
) -> None:
    openai_server.script(Reply(text="It says hello.", usage=AUDIO_USAGE))
    pool, recorder = ProviderPool(make_provider), Recorder()
    llm = _llm(openai_server, pool, recorder)
    messages = [{"role": "user", "content": content}]
    try:
        with pytest.raises(InvalidInputError, match="billed at the model's text rate"):
            if stream:
                async with llm.stream_message(messages=messages) as chunks:
                    async for _ in chunks:
                        pass
            else:
                await llm.create_message(messages=messages)
        # A text part alone is still fine (the refusal is about audio only).
        await llm.create_message(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    finally:
        await pool.aclose()
    assert len(openai_server.requests) == 1  # only the text call reached the provider
    assert len(recorder.events) == 1
