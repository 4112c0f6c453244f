"""A model whose provider caps its output (4,096 tokens: many OpenAI-compatible servers, older models) refuses a call
asking for more with a 400 that states its limit. extract_action_items sizes max_tokens from its text (2,048 + 5 a
character), so a text of ~410 characters or more asked such a model for more than it allows, with the official SDKs
against fake servers on 127.0.0.1 that enforce such a limit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from metering.errors import BudgetExceededError, ProviderError
from metering.events import uuid7
from metering.extensions.rewrite import chat as rewrite
from metering.extensions.rewrite.handlers import action_items_max_tokens
from metering.llm.budgets import BudgetMode, CallBudget
from metering.llm.client import MeteredLLM
from metering.llm.event_record import CallScope
from metering.llm.pool import ProviderPool
from metering.llm.providers import make_provider
from metering.llm.resolution import ByollmSettings, FallbackPolicy, PlatformLLM
from metering.llm.settings_source import InMemorySettings
from metering.runtime import Runtime, User
from tests.fakes import Fail, FakeAnthropicServer, FakeOpenAIServer, FakeProviderServer, Reply
from tests.unit.test_metered_llm import Recorder

LIMIT = 4096
ITEMS = '{"items": [{"owner": "Bob", "deadline": "Friday", "task": "Send the budget"}]}'
TEXT = ("Bob will send the budget by Friday. Alice books the venue. " * 9)[:500]
USER = User("u1", "t1")
MakeRuntime = Callable[..., tuple[Runtime, Recorder]]


@pytest.fixture
async def runtime_for(anthropic_server: FakeAnthropicServer) -> AsyncIterator[MakeRuntime]:
    """A runtime with the real adapters; the platform LLM is the fake Anthropic server (uncapped)."""
    pools: list[ProviderPool] = []

    def make(settings: InMemorySettings) -> tuple[Runtime, Recorder]:
        platform = PlatformLLM(
            provider="anthropic",
            model="platform-model",
            base_url=anthropic_server.base_url,
            timeout_s=5,
            max_retries=0,
            api_keys={"anthropic": "sk-platform-key-123456"},
        )
        pools.append(ProviderPool(make_provider))
        recorder = Recorder()
        return Runtime(settings=settings, platform=platform, providers=pools[-1], recorder=recorder), recorder

    yield make
    for pool in pools:
        await pool.aclose()


def own_llm(provider: str, server: FakeProviderServer, policy: FallbackPolicy) -> InMemorySettings:
    own = ByollmSettings("u1", "t1", provider, "own-model", api_key="sk-user-123456", base_url=server.base_url,
                         fallback_policy=policy)  # fmt: skip
    return InMemorySettings(byollm_by_user={"u1": own})


@pytest.mark.parametrize("policy", [FallbackPolicy.ERROR, FallbackPolicy.PLATFORM])
@pytest.mark.parametrize(
    ("provider", "wording"), [("openai_compatible", "vllm"), ("openai_compatible", "openai"), ("openai", "openai")]
)
async def test_a_users_own_llm_capped_at_4096_output_tokens_extracts_action_items_of_a_long_text(
    openai_server: FakeOpenAIServer, anthropic_server: FakeAnthropicServer, runtime_for: MakeRuntime,
    provider: str, wording: str, policy: FallbackPolicy,
) -> None:  # fmt: skip
    """It failed with `502 provider_error` (bad_request) under fallback policy `error`, and under `platform` failed
    over to the platform LLM, billed, where the user's own LLM would have answered at its stated limit."""
    openai_server.max_output_tokens, openai_server.limit_wording = LIMIT, wording
    openai_server.default = anthropic_server.default = Reply(text=ITEMS)
    runtime, rec = runtime_for(own_llm(provider, openai_server, policy))
    asked = action_items_max_tokens(TEXT)
    assert asked > LIMIT
    result = await runtime.invoke(rewrite, "extract_action_items", {"text": TEXT}, USER)
    assert result.result["action_items"] == [{"owner": "Bob", "deadline": "Friday", "task": "Send the budget"}]
    assert result.result["is_byollm"] is True and not anthropic_server.requests
    refused, answered = rec.events  # one event per provider call, each with the max_tokens it asked for
    assert len(openai_server.requests) == 2
    assert (refused.status, refused.error_type, refused.max_tokens, refused.is_byollm) == ("error", "bad_request",
                                                                                          asked, True)  # fmt: skip
    assert (answered.status, answered.max_tokens, answered.is_byollm, answered.is_failover) == ("ok", LIMIT, True,
                                                                                               False)  # fmt: skip
    assert (refused.call_index, answered.call_index) == (0, 1)
    assert refused.input_tokens == refused.output_tokens == 0  # the refusal used nothing: not billed


async def test_a_platform_model_capped_at_4096_output_tokens_extracts_action_items_of_a_long_text(
    anthropic_server: FakeAnthropicServer, runtime_for: MakeRuntime
) -> None:
    """The platform (or a purpose's) model: Anthropic's own wording (`max_tokens: 7048 > 4096, which is the maximum
    allowed number of output tokens for …`). It failed with `502 provider_error`, the refusal metered."""
    anthropic_server.max_output_tokens = LIMIT
    anthropic_server.default = Reply(text=ITEMS)
    runtime, rec = runtime_for(InMemorySettings())
    result = await runtime.invoke(rewrite, "extract_action_items", {"text": TEXT}, USER)
    assert len(result.result["action_items"]) == 1 and result.result["is_byollm"] is False
    assert [(e.status, e.max_tokens) for e in rec.events] == [("error", action_items_max_tokens(TEXT)), ("ok", LIMIT)]
    assert len(anthropic_server.requests) == 2


async def test_the_call_is_retried_once_at_most(openai_server: FakeOpenAIServer, runtime_for: MakeRuntime) -> None:
    """A server that refuses the stated limit too (it misstates it, and states a lower one) is not asked a third time:
    the call fails."""
    asked = action_items_max_tokens(TEXT)
    stated = Fail(400, "invalid_request_error", f"max_tokens is too large: {asked}. This model supports at most 4000 "
                  f"completion tokens, whereas you provided {asked}.")  # fmt: skip
    again = Fail(400, "invalid_request_error", "max_tokens is too large: 4000. This model supports at most 3000 "
                 "completion tokens, whereas you provided 4000.")  # fmt: skip
    openai_server.script(stated, again, Reply(text=ITEMS))
    runtime, rec = runtime_for(own_llm("openai_compatible", openai_server, FallbackPolicy.ERROR))
    with pytest.raises(ProviderError, match="at most 3000"):
        await runtime.invoke(rewrite, "extract_action_items", {"text": TEXT}, USER)
    assert [(e.status, e.max_tokens) for e in rec.events] == [("error", action_items_max_tokens(TEXT)), ("error", 4000)]
    assert len(openai_server.requests) == 2


async def test_a_limit_at_or_above_what_was_asked_is_no_reason_to_retry(
    openai_server: FakeOpenAIServer, runtime_for: MakeRuntime
) -> None:
    """A 400 for another reason (here, the prompt alone fills the context) states no smaller output limit."""
    too_long = Fail(400, "BadRequestError", "This model's maximum context length is 4096 tokens. However, you "
                    "requested 9000 tokens (6952 in the messages, 2048 in the completion).")  # fmt: skip
    openai_server.script(too_long)
    runtime, rec = runtime_for(own_llm("openai_compatible", openai_server, FallbackPolicy.ERROR))
    with pytest.raises(ProviderError, match="bad_request"):
        await runtime.invoke(rewrite, "extract_action_items", {"text": TEXT}, USER)
    assert len(rec.events) == len(openai_server.requests) == 1


async def test_a_limit_written_in_the_prompt_and_echoed_by_a_400_is_no_reason_to_retry(
    openai_server: FakeOpenAIServer, runtime_for: MakeRuntime
) -> None:
    """A server's validation error that echoes the user's text, in which the user wrote a limit: the call was made
    again at that number (max_tokens=16, a reply cut short, or a second refusal metered), not the model's limit."""
    text = "The bot supports at most 16 completion tokens, said Bob. " + TEXT
    echo = Fail(400, "BadRequestError", f"1 validation error for ChatCompletionRequest: input_value='{text[:200]}'")
    openai_server.script(echo, echo)
    runtime, rec = runtime_for(own_llm("openai_compatible", openai_server, FallbackPolicy.ERROR))
    with pytest.raises(ProviderError, match="bad_request"):
        await runtime.invoke(rewrite, "extract_action_items", {"text": text}, USER)
    assert [(e.status, e.max_tokens) for e in rec.events] == [("error", action_items_max_tokens(text))]
    assert len(openai_server.requests) == 1


async def test_the_call_at_the_stated_limit_is_reserved_against_an_enforced_budget_like_any_call(
    openai_server: FakeOpenAIServer, runtime_for: MakeRuntime
) -> None:
    """It is a call of its own: a budget of one call refuses it (the refusal before it is metered, not billed)."""
    openai_server.max_output_tokens = LIMIT
    settings = own_llm("openai_compatible", openai_server, FallbackPolicy.ERROR)
    settings.budget_by_extension["rewrite"] = CallBudget("rewrite", max_calls=1, mode=BudgetMode.ENFORCE)
    runtime, rec = runtime_for(settings)
    with pytest.raises(BudgetExceededError, match="calls budget"):
        await runtime.invoke(rewrite, "extract_action_items", {"text": TEXT}, USER)
    assert [(e.status, e.error_type) for e in rec.events] == [("error", "bad_request")]
    assert len(openai_server.requests) == 1


@pytest.mark.parametrize("policy", [FallbackPolicy.ERROR, FallbackPolicy.PLATFORM])
async def test_a_stream_asking_a_capped_model_for_more_output_is_made_again_at_its_stated_limit(
    openai_server: FakeOpenAIServer, anthropic_server: FakeAnthropicServer, policy: FallbackPolicy
) -> None:
    """The same refusal before a stream's first chunk failed the stream (policy `error`) or failed it over to the
    platform LLM, billed (`platform`)."""
    openai_server.max_output_tokens, openai_server.limit_wording = LIMIT, "vllm"
    platform = PlatformLLM(provider="anthropic", model="platform-model", base_url=anthropic_server.base_url,
                           timeout_s=5, max_retries=0, api_keys={"anthropic": "sk-platform-key-123456"})  # fmt: skip
    pool, rec = ProviderPool(make_provider), Recorder()
    llm = MeteredLLM(scope=CallScope("t1", "u1", "rewrite", "rewrite", uuid7()), platform=platform, providers=pool,
                     settings=own_llm("openai_compatible", openai_server, policy), recorder=rec)  # fmt: skip
    try:
        async with llm.stream_message(messages=[{"role": "user", "content": TEXT}], max_tokens=16_384) as stream:
            assert "".join([chunk async for chunk in stream]) == "Hello from the fake server."
    finally:
        await pool.aclose()
    assert stream.response is not None and stream.response.is_byollm and not anthropic_server.requests
    assert [(e.status, e.max_tokens, e.is_byollm, e.is_stream) for e in rec.events] == [
        ("error", 16_384, True, True),
        ("ok", LIMIT, True, True),
    ]
    assert len(openai_server.requests) == 2
