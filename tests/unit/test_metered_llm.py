"""MeteredLLM: exactly one event per provider call, failover, budgets, JSON, streams (pure logic).

The provider here is a scripted in-process fake; the real adapters are tested against wire-level fake
servers in tests/integration/providers/.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from metering.errors import (
    BudgetExceededError,
    InvalidInputError,
    InvalidJSONResponseError,
    ProviderError,
    SpoolError,
)
from metering.events import MAX_INT32, UsageEvent, uuid7
from metering.llm.budgets import BudgetMode, CallBudget
from metering.llm.client import MeteredLLM
from metering.llm.event_record import CallScope, prompt_fingerprint
from metering.llm.pool import ProviderPool
from metering.llm.providers.base import ProviderConfig
from metering.llm.resolution import ByollmSettings, FallbackPolicy, PlatformLLM, PurposeSettings
from metering.llm.responses import LLMResponse
from metering.llm.settings_source import InMemorySettings
from metering.llm.types import (
    MISSING_USAGE,
    ProviderRequest,
    ProviderResult,
    StreamEnd,
    TextDelta,
    TokenUsage,
)

SECRET = "sk-user-SECRET-1234567890"
DEEP = "[" * 100_000  # nested deeper than the interpreter's recursion limit
REPLIES = {
    "json": '```json\n{"items": []}\n```',
    "badjson": "not json",
    "deepjson": DEEP,
    "empty-nousage": "",
    "cutjson": '{"items": [{"task": "Call',  # a JSON reply cut off by max_tokens
}


class Recorder:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def append_line(self, data: bytes) -> None:
        assert data.endswith(b"\n") and data.count(b"\n") == 1, "one event, one line"
        self.lines.append(data[:-1])

    @property
    def events(self) -> list[UsageEvent]:
        return [UsageEvent.model_validate(orjson.loads(line)) for line in self.lines]


class FakeProvider:
    """Behaves per model name: 'fail' raises, 'nousage' reports none, 'json'/'badjson' answer so, 'cut' stops at
    max_tokens."""

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.provider
        self.calls: list[ProviderRequest] = []

    async def complete(self, request: ProviderRequest) -> ProviderResult:
        self.calls.append(request)
        model = request.model
        if "fail" in model:
            raise ProviderError("upstream 500", error_type="server_error", provider=self.name)
        if "slow" in model:
            await asyncio.sleep(10)
        if "pause" in model:  # yields to the event loop once, as a real call does: concurrent calls interleave
            await asyncio.sleep(0)
        text = REPLIES.get(model, "hello there")
        usage = MISSING_USAGE if "nousage" in model else TokenUsage(120, 7, 100, 0, 0)
        stop_reason = "max_tokens" if "cut" in model else "end_turn"
        return ProviderResult(text=text, usage=usage, stop_reason=stop_reason, model=model)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Any]:
        self.calls.append(request)
        if "failfirst" in request.model:
            raise ProviderError("refused", error_type="rate_limited", provider=self.name)
        words = ("Hi ", "\ud83d") if "halfpair" in request.model else ("one ", "two ", "three ", "four")
        for word in words:
            yield TextDelta(word)
            if "slow" in request.model:  # a chunk, then a long wait for the next one
                await asyncio.sleep(10)
            if "broken" in request.model and word == "two ":
                raise ProviderError("connection reset", error_type="stream_broken", provider=self.name)
        usage = MISSING_USAGE if "nousage" in request.model else TokenUsage(50, 4, 0, 0, 0)
        yield StreamEnd(usage=usage, stop_reason="end_turn", model=request.model)

    async def aclose(self) -> None:
        return None


PLATFORM = PlatformLLM(provider="openai", model="platform-model", api_keys={"openai": "sk-platform"})
MESSAGES = [{"role": "user", "content": "Please rewrite this sentence."}]


def make_llm(settings: InMemorySettings | None = None, platform: PlatformLLM = PLATFORM) -> tuple[MeteredLLM, Recorder]:
    recorder = Recorder()
    llm = MeteredLLM(
        scope=CallScope("tenant-1", "user-1", "rewrite", "rewrite", uuid7()),
        settings=settings or InMemorySettings(),
        platform=platform,
        providers=ProviderPool(FakeProvider),
        recorder=recorder,
    )
    return llm, recorder


def byollm(model: str, policy: FallbackPolicy = FallbackPolicy.PLATFORM) -> InMemorySettings:
    return InMemorySettings(
        byollm_by_user={
            "user-1": ByollmSettings(
                "user-1",
                "tenant-1",
                "openai_compatible",
                model,
                api_key=SECRET,
                base_url="http://127.0.0.1:9/v1",
                fallback_policy=policy,
            )
        }
    )


async def test_one_call_records_one_complete_event() -> None:
    llm, rec = make_llm()
    response = await llm.create_message(
        system="Be brief.", messages=MESSAGES, max_tokens=300, purpose="content_rewrite"
    )
    assert response.text == "hello there"
    [event] = rec.events
    assert str(event.event_id) == response.event_id
    assert (event.provider, event.model, event.is_byollm, event.is_failover) == (
        "openai",
        "platform-model",
        False,
        False,
    )
    assert (event.tenant_id, event.user_id, event.extension_id, event.function) == (
        "tenant-1",
        "user-1",
        "rewrite",
        "rewrite",
    )
    assert (event.input_tokens, event.output_tokens, event.cache_read_tokens) == (120, 7, 100)
    assert event.usage_completeness == "reported"
    assert event.max_tokens == 300 and event.purpose == "content_rewrite" and event.status == "ok"
    assert event.call_index == 0 and event.latency_ms >= 0 and event.time_to_first_token_ms is None
    assert (llm.provider, llm.model, llm.is_byollm) == ("openai", "platform-model", False)


async def test_every_field_of_the_request_the_response_and_the_event_is_the_one_named() -> None:
    """create_message builds the provider's request and its response positionally and the Attempt from a bare tuple
    (the hot path): a swapped pair of same-typed fields (provider and model, max_tokens and the attempt, the request's
    system and model) passes mypy. Each field is pinned here by a value no other field has."""
    settings = byollm("model-fail")
    settings.purpose_by_name["tuned"] = PurposeSettings("tuned", "openai", "json", None, {"seed": 7})
    llm, rec = make_llm(settings)
    plan = llm._plan("tuned")
    assert plan.fallback is not None
    platform = llm._providers.get(plan.fallback.config).provider
    response = await llm.create_message(
        system="Be brief.", messages=MESSAGES, max_tokens=300, purpose="tuned", response_format="json", temperature=0.3
    )
    assert response == LLMResponse(
        '```json\n{"items": []}\n```',
        provider="openai",
        model="json",
        is_byollm=False,
        stop_reason="end_turn",
        usage=TokenUsage(120, 7, 100, 0, 0),
        event_id=str(rec.events[1].event_id),
        response_format="json",
        parsed={"items": []},
    )
    [request] = platform.calls  # type: ignore[attr-defined]
    assert request == ProviderRequest("json", "Be brief.", MESSAGES, 300, 0.3, "json", {"seed": 7})
    failed, served = rec.events
    assert (failed.call_index, failed.is_failover, failed.max_tokens, failed.model) == (0, False, 300, "model-fail")
    assert (served.call_index, served.is_failover, served.max_tokens, served.model) == (1, True, 300, "json")
    assert served.purpose == failed.purpose == "tuned" and served.status == "ok" and failed.status == "error"
    assert served.prompt_fingerprint == failed.prompt_fingerprint == prompt_fingerprint("Be brief.", MESSAGES)
    assert served.occurred_at >= failed.occurred_at and served.time_to_first_token_ms is None


async def test_call_index_counts_every_call_of_an_invocation() -> None:
    llm, rec = make_llm()
    for _ in range(3):
        await llm.create_message(messages=MESSAGES)
    assert [e.call_index for e in rec.events] == [0, 1, 2]
    assert len({e.invocation_id for e in rec.events}) == 1


async def test_byollm_failure_fails_over_to_a_billable_platform_call() -> None:
    llm, rec = make_llm(byollm("model-fail"))
    response = await llm.create_message(messages=MESSAGES)
    first, second = rec.events
    assert (first.is_byollm, first.status, first.error_type, first.is_failover) == (
        True,
        "error",
        "server_error",
        False,
    )
    assert (second.is_byollm, second.status, second.is_failover) == (False, "ok", True)
    assert second.call_index == 1
    assert response.is_byollm is False and llm.is_byollm is False and llm.model == "platform-model"
    assert llm.all_byollm is False
    await llm.create_message(messages=MESSAGES)
    assert llm.all_byollm is False  # a later call cannot make the invocation unbilled again


async def test_a_calls_params_reach_its_failover_and_its_next_calls_unchanged() -> None:
    """A call's own params are passed on as they are (no copy on the hot path), a purpose's are merged with them: no
    adapter or retry may change either (a purpose's temperature is taken out of its params for the request), or a
    failover, a stream or the purpose's next call would go without it."""
    purpose = PurposeSettings("tuned", "openai", "platform-model", None, {"temperature": 0.2, "seed": 7})
    settings = byollm("model-fail")
    settings.purpose_by_name["tuned"] = purpose
    llm, _ = make_llm(settings)
    plan = llm._plan("tuned")
    assert plan.fallback is not None
    own, platform = (llm._providers.get(target.config).provider for target in (plan.primary, plan.fallback))
    for _ in range(2):
        await llm.create_message(messages=MESSAGES, temperature=0.5, **{"stop": ["END"]})
        await llm.create_message(messages=MESSAGES, purpose="tuned", stop=["END"])
        await llm.create_message(messages=MESSAGES, purpose="tuned")
        async with llm.stream_message(messages=MESSAGES, model_hint=1) as stream:
            _ = [chunk async for chunk in stream]
    assert [(request.temperature, request.params) for request in own.calls] == 2 * [  # type: ignore[attr-defined]
        (0.5, {"stop": ["END"]}),
        (None, {"stop": ["END"]}),  # a purpose's params are the platform LLM's
        (None, {}),
        (None, {"model_hint": 1}),
    ]
    assert [(request.temperature, request.params) for request in platform.calls] == 2 * [  # type: ignore[attr-defined]
        (0.5, {"stop": ["END"]}),
        (0.2, {"seed": 7, "stop": ["END"]}),
        (0.2, {"seed": 7}),
    ]
    assert purpose.params == {"temperature": 0.2, "seed": 7}


async def test_byollm_failure_with_error_policy_raises_after_recording() -> None:
    llm, rec = make_llm(byollm("model-fail", FallbackPolicy.ERROR))
    with pytest.raises(ProviderError) as info:
        await llm.create_message(messages=MESSAGES)
    assert info.value.error_type == "server_error"
    [event] = rec.events
    assert event.is_byollm and event.status == "error" and event.usage_completeness == "missing"


async def test_byollm_success_is_marked_byollm(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    llm, rec = make_llm(byollm("llama3"))
    assert llm.all_byollm is None  # no call yet
    response = await llm.create_message(messages=MESSAGES)
    assert response.is_byollm and rec.events[0].is_byollm and rec.events[0].provider == "openai_compatible"
    assert llm.all_byollm is True
    assert all(SECRET.encode() not in line for line in rec.lines)
    assert SECRET not in caplog.text and SECRET not in repr(llm.__dict__)


async def test_a_users_own_llm_never_serves_another_tenants_call() -> None:
    """User ids are global: a call made for 'user-1' under another tenant (e.g. by that tenant's admin over
    HTTP) must not spend user-1's own key, nor be excluded from billing as BYOLLM."""
    recorder = Recorder()
    settings = byollm("llama3")
    llm = MeteredLLM(
        scope=CallScope("tenant-2", "user-1", "rewrite", "rewrite", uuid7()),
        settings=settings,
        platform=PLATFORM,
        providers=ProviderPool(FakeProvider),
        recorder=recorder,
    )
    response = await llm.create_message(messages=MESSAGES)
    assert not response.is_byollm
    (event,) = recorder.events
    assert (event.tenant_id, event.is_byollm, event.provider, event.model) == (
        "tenant-2", False, "openai", "platform-model",
    )  # fmt: skip
    own, _ = make_llm(settings)  # the same settings still serve the user's own tenant
    assert (await own.create_message(messages=MESSAGES)).is_byollm


async def test_json_response_is_parsed_and_invalid_json_raises_a_typed_error() -> None:
    llm, rec = make_llm(platform=PlatformLLM(provider="openai", model="json", api_keys={"openai": "k"}))
    response = await llm.create_message(messages=MESSAGES, response_format="json")
    assert response.json == {"items": []}
    llm, rec = make_llm(platform=PlatformLLM(provider="openai", model="badjson", api_keys={"openai": "k"}))
    with pytest.raises(InvalidJSONResponseError) as info:
        await llm.create_message(messages=MESSAGES, response_format="json")
    assert info.value.text == "not json"
    assert len(rec.events) == 1 and rec.events[0].status == "ok"  # the call happened and used tokens


async def test_json_reply_nested_too_deeply_is_an_invalid_json_error() -> None:
    llm, rec = make_llm(platform=PlatformLLM(provider="openai", model="deepjson", api_keys={"openai": "k"}))
    with pytest.raises(InvalidJSONResponseError, match="nested too deeply") as info:
        await llm.create_message(messages=MESSAGES, response_format="json")
    assert info.value.text == DEEP and [e.status for e in rec.events] == ["ok"]


async def test_json_reply_cut_off_by_max_tokens_says_so() -> None:
    """A JSON reply that stopped at max_tokens is not valid JSON because it was cut off: the error says so (it
    only said "Unterminated string", which hid the cause) and the reply is flagged truncated."""
    llm, rec = make_llm(platform=PlatformLLM(provider="openai", model="cutjson", api_keys={"openai": "k"}))
    with pytest.raises(InvalidJSONResponseError, match="cut off at max_tokens=300") as info:
        await llm.create_message(messages=MESSAGES, max_tokens=300, response_format="json")
    assert info.value.text == REPLIES["cutjson"] and [e.stop_reason for e in rec.events] == ["max_tokens"]
    llm, _ = make_llm(platform=PlatformLLM(provider="openai", model="cut", api_keys={"openai": "k"}))
    assert (await llm.create_message(messages=MESSAGES)).truncated
    assert not (await make_llm()[0].create_message(messages=MESSAGES)).truncated


async def test_missing_usage_is_estimated() -> None:
    llm, rec = make_llm(platform=PlatformLLM(provider="openai", model="nousage", api_keys={"openai": "k"}))
    await llm.create_message(messages=MESSAGES)
    [event] = rec.events
    assert event.usage_completeness == "estimated"
    assert event.input_tokens > 0 and event.output_tokens > 0


async def test_enforced_call_budget_refuses_before_the_call() -> None:
    settings = InMemorySettings(
        budget_by_extension={"rewrite": CallBudget("rewrite", max_calls=2, mode=BudgetMode.ENFORCE)}
    )
    llm, rec = make_llm(settings)
    await llm.create_message(messages=MESSAGES)
    await llm.create_message(messages=MESSAGES)
    with pytest.raises(BudgetExceededError, match="calls"):
        await llm.create_message(messages=MESSAGES)
    assert len(rec.events) == 2  # the refused call was never made, so never metered


@pytest.mark.parametrize(
    "budget",
    [
        CallBudget("rewrite", max_calls=2, mode=BudgetMode.ENFORCE),
        CallBudget("rewrite", max_tokens=2 * (8 + 100), mode=BudgetMode.ENFORCE),  # input estimate 8, max_tokens 100
    ],
    ids=["calls", "tokens"],
)
async def test_enforced_budget_counts_the_calls_in_flight(budget: CallBudget) -> None:
    """Concurrent calls of one invocation: each is reserved before it is made, not counted only once recorded."""
    llm, rec = make_llm(
        InMemorySettings(budget_by_extension={"rewrite": budget}),
        PlatformLLM(provider="openai", model="pause", api_keys={"openai": "k"}),
    )
    calls = [llm.create_message(messages=MESSAGES, max_tokens=100) for _ in range(5)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(r).__name__ for r in results].count("BudgetExceededError") == 3
    assert len(rec.events) == 2 and llm.calls == 2
    assert (llm._budget.calls_in_flight, llm._budget.tokens_in_flight) == (0, 0)  # refused calls reserved nothing


async def test_enforced_budget_counts_calls_that_failed() -> None:
    settings = byollm("model-fail", FallbackPolicy.ERROR)
    settings.budget_by_extension["rewrite"] = CallBudget("rewrite", max_calls=1, mode=BudgetMode.ENFORCE)
    llm, rec = make_llm(settings)
    with pytest.raises(ProviderError):
        await llm.create_message(messages=MESSAGES)
    with pytest.raises(BudgetExceededError):
        await llm.create_message(messages=MESSAGES)
    assert len(rec.events) == 1


async def test_enforced_budget_covers_the_failover_call() -> None:
    settings = byollm("model-fail")
    settings.budget_by_extension["rewrite"] = CallBudget("rewrite", max_calls=1, mode=BudgetMode.ENFORCE)
    llm, rec = make_llm(settings)
    with pytest.raises(BudgetExceededError, match="failover call to the platform LLM was not made"):
        await llm.create_message(messages=MESSAGES)
    [failed] = rec.events  # the user's own LLM failed and was recorded; the platform call was refused, not made
    assert (failed.is_byollm, failed.status, failed.budget_exceeded) == (True, "error", [])
    settings.budget_by_extension["rewrite"] = CallBudget("rewrite", max_calls=3, mode=BudgetMode.ENFORCE)
    llm, rec = make_llm(settings)
    await llm.create_message(messages=MESSAGES)  # two calls: within the budget, both counted
    with pytest.raises(BudgetExceededError):
        await llm.create_message(messages=MESSAGES)  # its first call fits, its failover would not
    assert [(e.is_byollm, e.is_failover) for e in rec.events] == [(True, False), (False, True), (True, False)]


async def test_enforced_budget_covers_the_failover_of_a_stream() -> None:
    settings = byollm("failfirst")
    settings.budget_by_extension["rewrite"] = CallBudget("rewrite", max_calls=1, mode=BudgetMode.ENFORCE)
    llm, rec = make_llm(settings)
    with pytest.raises(BudgetExceededError, match="failover"):
        async with llm.stream_message(messages=MESSAGES) as stream:
            async for _chunk in stream:
                pass
    assert [(e.is_byollm, e.status) for e in rec.events] == [(True, "error")]


async def test_reported_call_budget_flags_the_event() -> None:
    settings = InMemorySettings(budget_by_extension={"rewrite": CallBudget("rewrite", max_calls=1, max_tokens=200)})
    llm, rec = make_llm(settings)
    await llm.create_message(messages=MESSAGES)
    await llm.create_message(messages=MESSAGES)
    assert [e.budget_exceeded for e in rec.events] == [[], ["calls", "tokens"]]


async def test_cancelled_call_records_a_cancelled_event() -> None:
    llm, rec = make_llm(platform=PlatformLLM(provider="openai", model="slow", api_keys={"openai": "k"}))
    task = asyncio.create_task(llm.create_message(messages=MESSAGES))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [event] = rec.events
    assert event.status == "cancelled"


class FullSpool(Recorder):
    """A spool whose disk is full: every append fails."""

    def append_line(self, data: bytes) -> None:
        raise SpoolError("could not append the usage event to the spool: disk full")


async def test_a_cancellation_stays_a_cancellation_when_the_spool_refuses_its_event() -> None:
    """The spool refusing the cancelled call's event raised SpoolError in place of the CancelledError: a task
    cancelled ended in an error, `asyncio.timeout` raised the SpoolError instead of TimeoutError. The cancellation
    propagates, the refusal noted on it (and logged)."""
    slow = PlatformLLM(provider="openai", model="slow", api_keys={"openai": "k"})
    slow_stream = PlatformLLM(provider="openai", model="slow-stream", api_keys={"openai": "k"})
    for platform, streamed in ((slow, False), (slow_stream, True)):
        llm = MeteredLLM(
            scope=CallScope("tenant-1", "user-1", "rewrite", "rewrite", uuid7()),
            settings=InMemorySettings(),
            platform=platform,
            providers=ProviderPool(FakeProvider),
            recorder=FullSpool(),
        )

        async def call(llm: MeteredLLM = llm, streamed: bool = streamed) -> None:
            if streamed:
                async with llm.stream_message(messages=MESSAGES) as stream:
                    async for _chunk in stream:
                        pass
            else:
                await llm.create_message(messages=MESSAGES)

        task = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as info:
            await task
        assert any("SpoolError" in note and "disk full" in note for note in getattr(info.value, "__notes__", []))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await call()


@pytest.mark.parametrize(
    "bad",
    [
        {"messages": []},
        {"messages": [{"content": "x"}]},
        {"messages": MESSAGES, "max_tokens": 0},
        {"messages": MESSAGES, "response_format": "xml"},
    ],
)
async def test_bad_arguments_are_refused_without_a_call(bad: dict[str, Any]) -> None:
    llm, rec = make_llm()
    with pytest.raises(InvalidInputError):
        await llm.create_message(**bad)
    assert rec.lines == []


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": MAX_INT32 + 1},  # the event's max_tokens is an INTEGER column: it would be dead-lettered
        {"max_tokens": 2**64},  # past what orjson can write
        {"purpose": ""},
        {"purpose": None},
        {"purpose": "p" * 201},
        {"purpose": "a\x00b"},
        {"purpose": "\ud800"},  # not valid Unicode: the event line could not be written
    ],
)
async def test_arguments_the_event_cannot_hold_are_refused_before_the_call(bad: dict[str, Any]) -> None:
    llm, rec = make_llm()
    with pytest.raises(InvalidInputError):
        await llm.create_message(messages=MESSAGES, **bad)
    with pytest.raises(InvalidInputError):
        llm.stream_message(messages=MESSAGES, **bad)
    assert rec.lines == [] and llm.calls == 0
    await llm.create_message(messages=MESSAGES, max_tokens=MAX_INT32, purpose="p" * 200)  # the bounds themselves


async def test_a_message_holding_itself_twice_is_checked_in_bounded_time() -> None:
    """The check for half an emoji walks every text of a message, at any depth: a part holding itself (a handler's
    tool result that refers back to its own part) was walked once per path, 2 ** 64 for two self-references, and the
    call never returned, the event loop it runs on blocked (the whole service). Each container is walked once."""

    def too_long(signum: int, frame: Any) -> None:
        raise TimeoutError("the argument check did not end")

    part: dict[str, Any] = {"type": "tool_result", "tool_use_id": "t1", "content": []}
    part["content"] += [part, part]
    llm, rec = make_llm()
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        response = await llm.create_message(messages=[{"role": "user", "content": ["caf\u00e9 \u2764", part]}])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert response.text == "hello there" and len(rec.lines) == 1


# -- streams -------------------------------------------------------------------------------------


async def test_stream_consumed_to_the_end() -> None:
    llm, rec = make_llm()
    stream = llm.stream_message(messages=MESSAGES, purpose="chat")
    chunks = [chunk async for chunk in stream]
    assert "".join(chunks) == "one two three four" == stream.text
    [event] = rec.events
    assert event.status == "ok" and event.is_stream and event.time_to_first_token_ms is not None
    assert (event.input_tokens, event.output_tokens) == (50, 4) and stream.usage == TokenUsage(50, 4)


async def test_stream_abandoned_by_the_consumer_is_recorded_as_cancelled() -> None:
    llm, rec = make_llm()
    async with llm.stream_message(messages=MESSAGES) as stream:
        async for _chunk in stream:
            break
    [event] = rec.events
    assert event.status == "cancelled" and event.usage_completeness == "estimated" and event.output_tokens == 1


async def test_stream_abandoned_without_context_manager_is_recorded_once_collected() -> None:
    llm, rec = make_llm()
    async for _chunk in llm.stream_message(messages=MESSAGES):
        break
    gc.collect()
    for _ in range(5):
        await asyncio.sleep(0)
    assert [e.status for e in rec.events] == ["cancelled"]


async def test_stream_broken_by_the_provider_records_an_estimated_error() -> None:
    llm, rec = make_llm(platform=PlatformLLM(provider="openai", model="broken", api_keys={"openai": "k"}))
    received = []
    with pytest.raises(ProviderError, match="connection reset"):
        async for chunk in llm.stream_message(messages=MESSAGES):
            received.append(chunk)
    assert received == ["one ", "two "]
    [event] = rec.events
    assert (event.status, event.error_type, event.usage_completeness) == (
        "error",
        "stream_broken",
        "estimated",
    )
    assert event.output_tokens == 2


async def test_stream_without_reported_usage_is_estimated() -> None:
    llm, rec = make_llm(platform=PlatformLLM(provider="openai", model="nousage", api_keys={"openai": "k"}))
    text = "".join([c async for c in llm.stream_message(messages=MESSAGES)])
    assert text
    assert rec.events[0].usage_completeness == "estimated"


async def test_stream_fails_over_before_the_first_chunk() -> None:
    llm, rec = make_llm(byollm("failfirst"))
    text = "".join([c async for c in llm.stream_message(messages=MESSAGES)])
    assert text == "one two three four"
    first, second = rec.events
    assert (first.is_byollm, first.status, second.is_byollm, second.is_failover) == (
        True,
        "error",
        False,
        True,
    )
    assert llm.is_byollm is False


async def test_an_answered_call_without_usage_or_text_is_estimated_from_its_prompt_never_zero() -> None:
    """A tool-call reply (no text) whose usage the provider did not report usably was recorded as 0 tokens, so a
    paid call was billed $0 (found by a reviewer)."""
    llm, rec = make_llm(platform=PlatformLLM(provider="anthropic", model="empty-nousage"))
    await llm.create_message(messages=[{"role": "user", "content": "x" * 400}])
    [event] = rec.events
    assert (event.status, event.usage_completeness, event.output_tokens) == ("ok", "estimated", 0)
    assert event.input_tokens >= 100


async def test_a_stream_ending_on_half_a_surrogate_pair_hands_on_no_empty_chunk() -> None:
    """The held half of a pair made the consumer receive '' (a relay would send an empty frame; a review)."""
    llm, rec = make_llm(platform=PlatformLLM(provider="openai", model="halfpair", api_keys={"openai": "sk-platform"}))
    async with llm.stream_message(messages=MESSAGES) as stream:
        chunks = [chunk async for chunk in stream]
    assert chunks == ["Hi ", "\ufffd"] and stream.text == "Hi \ufffd"
    assert rec.events[0].status == "ok"


def unreadable(policy: FallbackPolicy) -> InMemorySettings:
    """A BYOLLM user whose stored key the configured METERING_SECRET_KEYS cannot decrypt."""
    settings = ByollmSettings(
        "user-1", "tenant-1", "openai_compatible", "own-model", api_key=None, base_url="http://127.0.0.1:9/v1",
        fallback_policy=policy, key_unreadable=True,
    )  # fmt: skip
    return InMemorySettings(byollm_by_user={"user-1": settings})


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_byollm_key_that_cannot_be_decrypted_is_a_failed_call_never_made(streamed: bool) -> None:
    """Such a user's settings raised SecretError before any call: no event, the invocation a 500 whatever the fallback
    policy. Now the BYOLLM attempt fails as secret_error, never reaching the provider (keyless, it would have been
    called without the user's key), its event recorded, and it raises under either policy: no failover bills the user
    on the platform LLM for a key the operator lost."""
    for policy in (FallbackPolicy.PLATFORM, FallbackPolicy.ERROR):
        llm, rec = make_llm(unreadable(policy))
        with pytest.raises(ProviderError, match="METERING_SECRET_KEYS") as info:
            if streamed:
                _ = [c async for c in llm.stream_message(messages=MESSAGES)]
            else:
                await llm.create_message(messages=MESSAGES)
        assert info.value.error_type == "secret_error"
        [event] = rec.events  # no failover call
        assert (event.is_byollm, event.status, event.error_type, event.usage_completeness) == (
            True, "error", "secret_error", "missing",
        )  # fmt: skip
        assert len(llm._providers) == 0  # no adapter made: neither the user's endpoint nor the platform's
