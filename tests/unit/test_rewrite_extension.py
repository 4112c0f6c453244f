"""The bundled rewrite extension's budgets and inputs: what it accepts fits what it asks the LLM for (no database)."""

from __future__ import annotations

from typing import Any

import pytest

from metering.errors import InvalidInputError, InvalidJSONResponseError, ProviderError
from metering.extensions.rewrite import chat as rewrite
from metering.extensions.rewrite.handlers import REWRITE_MAX_TOKENS, action_items_max_tokens
from metering.extensions.rewrite.schemas import MAX_ACTION_ITEMS_CHARS, MAX_REWRITE_CHARS
from metering.llm.budgets import BudgetMode, CallBudget
from metering.llm.pool import ProviderPool
from metering.llm.providers.base import ProviderConfig
from metering.llm.providers.simulated import SimulatedProvider
from metering.llm.resolution import PlatformLLM
from metering.llm.settings_source import InMemorySettings
from metering.llm.types import ProviderRequest, ProviderResult, TokenUsage
from metering.runtime import Runtime, User
from tests.unit.test_metered_llm import PLATFORM, FakeProvider, Recorder, byollm

USER = User("user-1", "tenant-1")
SIMULATED = PlatformLLM(provider="simulated", model="claude-sonnet-4-6", api_keys={})


def simulated(settings: InMemorySettings | None = None) -> tuple[Runtime, Recorder]:
    recorder = Recorder()
    providers = ProviderPool(lambda config: SimulatedProvider())
    return Runtime(settings=settings or InMemorySettings(), platform=SIMULATED, providers=providers,
                   recorder=recorder), recorder  # fmt: skip


FUNCTIONS = [("rewrite", {"tone": "formal"}), ("rewrite_multiple", {"tone": "casual"}), ("extract_action_items", {})]


def longest(sentence: str, limit: int) -> str:
    return (sentence * (limit // len(sentence) + 1))[:limit]


@pytest.mark.parametrize("tone", ["formal", "casual", "concise", "friendly", "apologetic"])
async def test_the_longest_text_accepted_is_rewritten_whole(tone: str) -> None:
    """The rewrites accepted 20,000 characters with the recipe's max_tokens=1500: a long text's rewrite was cut off
    (stop_reason max_tokens) and returned as a success. The text is bounded to what 1,500 tokens hold."""
    runtime, rec = simulated()
    text = longest("We'll send the report to the client on Friday and won't be late. ", MAX_REWRITE_CHARS)
    result = await runtime.invoke(rewrite, "rewrite", {"text": text, "tone": tone}, USER)
    assert result.result["truncated"] is False and [e.stop_reason for e in rec.events] == ["end_turn"]
    assert rec.events[0].max_tokens == REWRITE_MAX_TOKENS
    with pytest.raises(InvalidInputError, match="at most 4000 characters"):
        await runtime.invoke(rewrite, "rewrite", {"text": text + "x", "tone": tone}, USER)
    with pytest.raises(InvalidInputError, match="at most 4000 characters"):
        await runtime.invoke(rewrite, "rewrite_multiple", {"text": text + "x", "tone": "formal"}, USER)
    assert len(rec.events) == 1  # the refused texts made no call


@pytest.mark.parametrize(
    ("function", "extra"), [("rewrite", {"tone": "formal"}), ("rewrite_multiple", {"tone": "casual"})]
)
async def test_a_rewrite_cut_off_by_max_tokens_says_so(function: str, extra: dict[str, Any]) -> None:
    """A reply still cut off (a script with more tokens a character, a verbose model) is flagged, not a success."""
    rec = Recorder()
    runtime = Runtime(settings=InMemorySettings(), platform=PlatformLLM(provider="openai", model="cut", api_keys={}),
                      providers=ProviderPool(FakeProvider), recorder=rec)  # fmt: skip
    result = await runtime.invoke(rewrite, function, {"text": "Send me the doc.", **extra}, USER)
    assert result.result["truncated"] is True
    runtime = Runtime(settings=InMemorySettings(), platform=PLATFORM, providers=ProviderPool(FakeProvider),
                      recorder=rec)  # fmt: skip
    assert (await runtime.invoke(rewrite, function, {"text": "Send me the doc.", **extra}, USER)).result[
        "truncated"
    ] is False


async def test_action_items_of_the_longest_text_of_tiny_tasks_fit_their_max_tokens() -> None:
    """The worst case, many tiny tasks: with a fixed 16,384 a valid 20,000-character text overflowed it (a 502
    invalid_json_response, billed 16,384 output tokens). The text is bounded such that its JSON fits."""
    runtime, rec = simulated()
    text = longest("Al z. ", MAX_ACTION_ITEMS_CHARS)
    result = await runtime.invoke(rewrite, "extract_action_items", {"text": text}, USER)
    assert len(result.result["action_items"]) == MAX_ACTION_ITEMS_CHARS // 6
    [event] = rec.events
    assert event.stop_reason == "end_turn" and event.max_tokens == action_items_max_tokens(text) <= 16_384
    with pytest.raises(InvalidInputError, match="at most 3200 characters"):
        await runtime.invoke(rewrite, "extract_action_items", {"text": text + "x"}, USER)


async def test_a_small_text_gets_a_small_budget_that_an_enforced_token_budget_lets_through() -> None:
    """Budgets reserve max_tokens: with a fixed 16,384 an enforced budget under ~16.4k refused even "Call Bob."."""
    budget = CallBudget(extension_id="rewrite", max_tokens=3_000, mode=BudgetMode.ENFORCE)
    runtime, rec = simulated(InMemorySettings(budget_by_extension={"rewrite": budget}))
    result = await runtime.invoke(rewrite, "extract_action_items", {"text": "Call Bob."}, USER)
    assert len(result.result["action_items"]) == 1
    assert [e.max_tokens for e in rec.events] == [action_items_max_tokens("Call Bob.")] == [2048 + 5 * 9]


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        " \n\t ",
        "\u200b",
        "\ufeff\u200b \u2060",
        "\u00a0\u3000",
        "\u3164 \u3164",
        "\u2800",
        "\u115f\u1160\uffa0",
    ],
)
@pytest.mark.parametrize(("function", "extra"), FUNCTIONS)
async def test_a_blank_text_is_refused_without_a_call(text: str, function: str, extra: dict[str, Any]) -> None:
    """Only whitespace or zero-width characters: it was accepted and made a billed call; now the 422 of ""."""
    runtime, rec = simulated()
    with pytest.raises(InvalidInputError, match="params: text: "):
        await runtime.invoke(rewrite, function, {"text": text, **extra}, USER)
    assert rec.events == []
    await runtime.invoke(rewrite, function, {"text": "\u200bok", **extra}, USER)  # a visible character is a text
    assert len(rec.events) >= 1


class FailsOnce(FakeProvider):
    """The user's own endpoint fails once (a transient 500), then recovers; the platform answers."""

    failures = 1

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)

    async def complete(self, request: ProviderRequest) -> ProviderResult:
        if self.name == "openai_compatible" and FailsOnce.failures > 0:
            FailsOnce.failures -= 1
            raise ProviderError("upstream 500", error_type="server_error", provider=self.name)
        return ProviderResult(text="v", usage=TokenUsage(100, 20), stop_reason="end_turn", model=request.model)


@pytest.mark.parametrize("failures", [0, 1])
async def test_is_byollm_only_when_every_variation_was_served_by_the_users_own_llm(
    failures: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result said is_byollm (Policy A: not billed) from the last call only: a first variation that failed over
    to the platform LLM was billed while the result said true."""
    monkeypatch.setattr(FailsOnce, "failures", failures)
    rec = Recorder()
    runtime = Runtime(settings=byollm("llama"), platform=PLATFORM, providers=ProviderPool(FailsOnce), recorder=rec)
    result = await runtime.invoke(rewrite, "rewrite_multiple", {"text": "hi", "tone": "formal"}, USER)
    billed = [e for e in rec.events if e.status == "ok" and not e.is_byollm]
    assert len(billed) == failures
    assert result.result["is_byollm"] is (not billed)
    assert result.is_byollm is (not billed)  # the invoke response's top-level flag too
    assert (result.result["provider"], result.result["model"]) == ("openai_compatible", "llama")  # the last call's


class Replies(FakeProvider):
    """Answers the text its model names (REPLIED[model]), as a real model may write it."""

    async def complete(self, request: ProviderRequest) -> ProviderResult:
        return ProviderResult(text=REPLIED[request.model], usage=TokenUsage(100, 20), stop_reason="end_turn",
                              model=request.model)  # fmt: skip


REPLIED: dict[str, str] = {}


async def action_items_of(reply: str) -> tuple[Any, Recorder]:
    """extract_action_items' result (or the error it raised) for a model replying ``reply``, and its events."""
    REPLIED["m"] = reply
    rec = Recorder()
    runtime = Runtime(settings=InMemorySettings(), platform=PlatformLLM(provider="openai", model="m", api_keys={}),
                      providers=ProviderPool(Replies), recorder=rec)  # fmt: skip
    try:
        result: Any = (await runtime.invoke(rewrite, "extract_action_items", {"text": "Bob: doc by Fri."}, USER)).result
    except InvalidJSONResponseError as exc:
        result = exc
    return result, rec


@pytest.mark.parametrize(
    ("reply", "item", "problem"),
    [
        ('{"items": [{"task": "a"}, {"owner": "Bob"}]}', 1, "task: Field required"),
        ('{"items": [{"task": "a", "deadline": 5}]}', 0, "deadline: Input should be a valid string"),
        ('{"items": ["Call Bob"]}', 0, "Input should be a valid dictionary"),
        ('[{"task": null, "owner": 1}]', 0, "owner: Input should be a valid string (and 1 more error)"),
    ],
)
async def test_an_action_item_not_matching_names_the_item_and_the_field(reply: str, item: int, problem: str) -> None:
    """The 502 said only "action items do not match {owner, deadline, task}: 1 errors": not which item nor what."""
    error, rec = await action_items_of(reply)
    assert isinstance(error, InvalidJSONResponseError) and error.text == reply
    assert f"action item {item} does not match {{owner, deadline, task}}: {problem}" in error.message
    assert len(rec.events) == 1 and rec.events[0].status == "ok"  # the call was used: metered (and billed) once


async def test_action_items_in_a_fenced_block_after_a_sentence_are_returned() -> None:
    """What models often answer: a sentence, then the fenced JSON. It was a 502 (the call billed, nothing returned)."""
    result, rec = await action_items_of(
        'Here are the action items:\n```json\n{"items": [{"task": "Send the doc"}]}\n```'
    )
    assert result["action_items"] == [{"owner": None, "deadline": None, "task": "Send the doc"}]
    assert len(rec.events) == 1


@pytest.mark.parametrize(
    ("reply", "got"),
    [
        ('{"action_items": []}', "an object with the keys 'action_items'"),
        ('{"items": null}', "an object whose 'items' is null"),
        ('{"items": {"task": "a"}}', "an object whose 'items' is an object"),
        ('"none"', "a string"),
        ("{}", "an object with no keys"),
    ],
)
async def test_a_reply_without_an_items_list_says_what_it_holds(reply: str, got: str) -> None:
    """It said only "expected a JSON object with an 'items' list", whatever the model wrote instead."""
    error, rec = await action_items_of(reply)
    assert isinstance(error, InvalidJSONResponseError)
    assert f"expected a JSON object with an 'items' list, got {got}" in error.message
    assert len(rec.events) == 1


@pytest.mark.parametrize(
    ("reply", "item"),
    [
        ('[{"task": ""}]', 0),
        ('{"items": [{"task": "Send the doc"}, {"task": "   "}]}', 1),
        ('{"items": [{"task": "\\u200b\\n", "owner": "Bob"}]}', 0),
    ],
)
async def test_an_action_item_with_a_blank_task_is_refused_like_any_malformed_item(reply: str, item: int) -> None:
    """A task with nothing visible in it was returned as an action item ({"task": ""}), a to-do that says nothing;
    it is refused like an item without a task (502 invalid_json_response naming it), not dropped in silence."""
    error, rec = await action_items_of(reply)
    assert isinstance(error, InvalidJSONResponseError) and error.text == reply
    assert f"action item {item} does not match {{owner, deadline, task}}: task: Value error, the task is blank" in (
        error.message
    )
    assert len(rec.events) == 1 and rec.events[0].status == "ok"  # the call was used: metered (and billed) once


async def test_a_blank_owner_or_deadline_is_null() -> None:
    """A blank owner or deadline (`""`, only whitespace or invisible characters: what a model writes for "none") was
    returned as is, where the documented shape says a string or `null`: a caller testing `owner is None` for "no
    owner" got `""` or `"  "`, shown as an owner with no name. It is `null`, as the model's own `null` or no field."""
    reply = (
        '{"items": [{"owner": "", "deadline": "  ", "task": "Send the doc"},'
        ' {"owner": "\\u200b", "deadline": "\\n\\t", "task": "Book the room"},'
        ' {"owner": " Bob ", "deadline": "Friday", "task": "Call Alice"}]}'
    )
    result, rec = await action_items_of(reply)
    assert result["action_items"] == [
        {"owner": None, "deadline": None, "task": "Send the doc"},
        {"owner": None, "deadline": None, "task": "Book the room"},
        {"owner": " Bob ", "deadline": "Friday", "task": "Call Alice"},  # a visible one is kept as written
    ]
    assert len(rec.events) == 1


class CutOffBeforeAnyText(FakeProvider):
    """A reasoning model that spent its whole max_tokens thinking: no text, stop reason max_tokens."""

    async def complete(self, request: ProviderRequest) -> ProviderResult:
        return ProviderResult(text="", usage=TokenUsage(100, request.max_tokens, reasoning_tokens=request.max_tokens),
                              stop_reason="max_tokens", model=request.model)  # fmt: skip


@pytest.mark.parametrize(("function", "extra"), FUNCTIONS[:2])
async def test_a_rewrite_cut_off_before_any_text_says_so(function: str, extra: dict[str, Any]) -> None:
    """The 502 said only "the model's reply is empty", where the call stopped at max_tokens before any text (a
    reasoning model that spent all 1,500 tokens thinking, billed for them): the caller could not tell why."""
    rec = Recorder()
    runtime = Runtime(settings=InMemorySettings(), platform=PLATFORM, providers=ProviderPool(CutOffBeforeAnyText),
                      recorder=rec)  # fmt: skip
    with pytest.raises(ProviderError, match="is empty: it stopped at max_tokens before any text") as raised:
        await runtime.invoke(rewrite, function, {"text": "Send me the doc.", **extra}, USER)
    assert raised.value.error_type == "no_result" and "the call was made and is metered" in raised.value.message
    assert [(e.status, e.output_tokens) for e in rec.events] == [("ok", REWRITE_MAX_TOKENS)]
