"""Audio tokens (OpenAI Chat Completions ``prompt_tokens_details.audio_tokens``): what an event holds of them, and
how they are priced. A UsageEvent has no audio fields, so they are counted, and priced, as text tokens: this pins
what docs/ctx-llm.md and docs/billing.md say (a schema change is needed to price them at the audio rate)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import genai_prices

from metering.billing.pricing import PriceBook
from metering.billing.rates import RateCards
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


async def test_audio_tokens_are_counted_as_input_and_priced_at_the_text_rate(openai_server: FakeOpenAIServer) -> None:
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
        content = [{"type": "text", "text": "What does it say?"}, AUDIO_PART]
        await llm.create_message(messages=[{"role": "user", "content": content}], modalities=["text", "audio"])
    finally:
        await pool.aclose()
    sent = openai_server.last.body
    assert sent["messages"][0]["content"][1] == AUDIO_PART  # the audio reaches the provider as it is
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
