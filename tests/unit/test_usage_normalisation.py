"""metering.llm.usage: provider raw usage → OpenTelemetry GenAI semantics, and the text estimates."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from anthropic.types import CacheCreation, ServerToolUsage, Usage

from metering.events import UsageCompleteness
from metering.llm.types import MISSING_USAGE, TokenUsage
from metering.llm.usage import (
    estimate_input_tokens,
    estimate_tokens,
    estimated,
    fill_missing,
    finished,
    from_anthropic,
    from_openai,
    unfinished,
    zero_counts_estimated,
)

# -- Anthropic: cache tokens are reported OUTSIDE input_tokens ---------------------------------------


def test_anthropic_cache_tokens_are_added_into_input() -> None:
    raw = {"input_tokens": 20, "output_tokens": 7, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 300}
    assert from_anthropic(raw) == TokenUsage(
        input_tokens=1320,
        output_tokens=7,
        cache_read_tokens=1000,
        cache_write_tokens=300,
        reasoning_tokens=0,
        completeness=UsageCompleteness.REPORTED,
    )


def test_anthropic_usage_object_with_none_cache_fields() -> None:
    # what the SDK's Usage model looks like when the API leaves the cache fields out
    raw = SimpleNamespace(
        input_tokens=15, output_tokens=4, cache_read_input_tokens=None, cache_creation_input_tokens=None
    )
    usage = from_anthropic(raw)
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens) == (15, 4, 0, 0)
    assert usage.total_tokens == 19


def test_anthropic_only_cached_input() -> None:
    usage = from_anthropic({"input_tokens": 0, "output_tokens": 1, "cache_read_input_tokens": 512})
    assert (usage.input_tokens, usage.cache_read_tokens) == (512, 512)


def test_anthropic_missing_usage_is_missing() -> None:
    assert from_anthropic(None) is MISSING_USAGE
    assert from_anthropic(None).completeness is UsageCompleteness.MISSING


# -- counts that are not counts: the usage is not reported (so it is estimated), never "reported" as 0 or a crash --

NOT_COUNTS = [None, -1, -5, "12", "x", True, 3.9, math.inf, -math.inf, math.nan, 2**63, 2**64, [1], {}]


@pytest.mark.parametrize("bad", NOT_COUNTS)
def test_anthropic_count_that_is_not_a_count_makes_the_usage_missing(bad: object) -> None:
    assert from_anthropic({"input_tokens": bad, "output_tokens": 2}) is MISSING_USAGE
    assert from_anthropic({"input_tokens": 2, "output_tokens": bad}) is MISSING_USAGE
    if bad is not None:  # an optional count may be null (0), not garbage
        assert from_anthropic({"input_tokens": 2, "output_tokens": 2, "cache_read_input_tokens": bad}) is MISSING_USAGE


@pytest.mark.parametrize("bad", NOT_COUNTS)
def test_openai_count_that_is_not_a_count_makes_the_usage_missing(bad: object) -> None:
    assert from_openai({"prompt_tokens": bad, "completion_tokens": 2, "total_tokens": 4}) is MISSING_USAGE
    assert from_openai({"prompt_tokens": 2, "completion_tokens": bad}) is MISSING_USAGE
    if bad is not None:
        details = {"prompt_tokens": 2, "completion_tokens": 2, "completion_tokens_details": {"reasoning_tokens": bad}}
        assert from_openai(details) is MISSING_USAGE


def test_absent_main_counts_make_the_usage_missing() -> None:
    assert from_anthropic({"output_tokens": 5}) is MISSING_USAGE  # e.g. a stream whose message_start had no usage
    assert from_openai({"completion_tokens": 5}) is MISSING_USAGE
    assert from_openai({}) is MISSING_USAGE


def test_counts_at_the_bound_and_integral_floats_are_reported() -> None:
    big = from_anthropic({"input_tokens": 2**63 - 1, "output_tokens": 7.0})
    assert (big.input_tokens, big.output_tokens, big.completeness) == (2**63 - 1, 7, UsageCompleteness.REPORTED)
    # each part within the bound, their sum past it: not something an event can hold
    summed = {"input_tokens": 2**62, "output_tokens": 1, "cache_read_input_tokens": 2**62}
    assert from_anthropic(summed) is MISSING_USAGE


def test_missing_usage_of_an_answered_call_is_estimated() -> None:
    usage = fill_missing(from_openai({"prompt_tokens": None, "completion_tokens": None}), "Be brief.", [], "a" * 40)
    assert usage.completeness is UsageCompleteness.ESTIMATED and usage.output_tokens == 10
    # No text (a tool call): estimated from the prompt when the provider answered; left missing when it did not.
    partial = from_openai({"prompt_tokens": 5000, "completion_tokens": None})
    prompt = [{"role": "user", "content": "x" * 20_000}]
    answered = fill_missing(partial, None, prompt, "", answered=True)
    assert answered.completeness is UsageCompleteness.ESTIMATED and answered.input_tokens == 5000
    assert answered.output_tokens == 0
    assert fill_missing(partial, None, prompt, "").completeness is UsageCompleteness.MISSING


# -- Anthropic: cache writes by TTL (cache_creation) and server tool use (web searches) -----------------

ANTHROPIC_CACHED = {"input_tokens": 20, "output_tokens": 7, "cache_read_input_tokens": 1000}


def test_anthropic_one_hour_cache_writes_and_web_searches_are_read() -> None:
    raw = {
        **ANTHROPIC_CACHED,
        "cache_creation_input_tokens": 300,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 2},  # fetches are not charged apart
    }
    assert from_anthropic(raw) == TokenUsage(
        input_tokens=1320,
        output_tokens=7,
        cache_read_tokens=1000,
        cache_write_tokens=300,
        reasoning_tokens=0,
        completeness=UsageCompleteness.REPORTED,
        cache_write_1h_tokens=200,
        web_searches=3,
    )


def test_anthropic_breakdown_and_server_tool_use_as_sdk_objects() -> None:
    raw = Usage(
        input_tokens=20,
        output_tokens=7,
        cache_read_input_tokens=1000,
        cache_creation_input_tokens=300,
        cache_creation=CacheCreation(ephemeral_5m_input_tokens=0, ephemeral_1h_input_tokens=300),
        server_tool_use=ServerToolUsage(web_search_requests=1, web_fetch_requests=0),
    )
    usage = from_anthropic(raw)
    assert (usage.input_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens, usage.web_searches) == (
        1320,
        300,
        300,
        1,
    )
    # the SDK's model when the API leaves them out
    bare = from_anthropic(Usage(input_tokens=20, output_tokens=7, cache_creation_input_tokens=300))
    assert (bare.cache_write_tokens, bare.cache_write_1h_tokens, bare.web_searches) == (300, 0, 0)


@pytest.mark.parametrize(
    "details",
    [
        {},
        {"cache_creation": None, "server_tool_use": None},
        {"cache_creation": {}, "server_tool_use": {}},
        {
            "cache_creation": {"ephemeral_5m_input_tokens": None, "ephemeral_1h_input_tokens": None},
            "server_tool_use": {"web_search_requests": None},
        },
        {"cache_creation": "1h", "server_tool_use": 4},  # not objects: read as absent, like OpenAI's *_details
    ],
    ids=["absent", "null", "empty", "null-counts", "not-objects"],
)
def test_anthropic_breakdown_and_server_tool_use_absent_or_null_are_zero(details: dict[str, object]) -> None:
    usage = from_anthropic({**ANTHROPIC_CACHED, "cache_creation_input_tokens": 300, **details})
    assert usage.completeness is UsageCompleteness.REPORTED
    assert (usage.input_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens, usage.web_searches) == (
        1320,
        300,
        0,
        0,
    )


@pytest.mark.parametrize(
    ("total", "five_minutes", "one_hour", "cache_write", "cache_write_1h"),
    [
        pytest.param(300, 100, 500, 300, 300, id="1h-past-the-total"),  # the total is what is billed: 1h capped at it
        pytest.param(300, 250, 250, 300, 250, id="breakdown-sum-past-the-total"),
        pytest.param(0, 0, 50, 0, 0, id="total-zero"),
        pytest.param(300, 0, 100, 300, 100, id="breakdown-sum-below-the-total"),  # the rest: 5-minute writes
        pytest.param(None, 100, 200, 300, 200, id="total-null"),  # the breakdown stands in for it
        pytest.param("absent", 100, 200, 300, 200, id="total-absent"),
        pytest.param("absent", None, 200, 200, 200, id="total-absent-5m-null"),
    ],
)
def test_anthropic_cache_write_total_and_its_breakdown_that_disagree(
    total: object, five_minutes: int | None, one_hour: int, cache_write: int, cache_write_1h: int
) -> None:
    raw: dict[str, object] = {
        **ANTHROPIC_CACHED,
        "cache_creation": {"ephemeral_5m_input_tokens": five_minutes, "ephemeral_1h_input_tokens": one_hour},
    }
    if total != "absent":
        raw["cache_creation_input_tokens"] = total
    usage = from_anthropic(raw)
    assert usage.completeness is UsageCompleteness.REPORTED
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (cache_write, cache_write_1h)
    assert usage.input_tokens == 20 + 1000 + cache_write
    assert usage.cache_write_1h_tokens <= usage.cache_write_tokens


@pytest.mark.parametrize("bad", [bad for bad in NOT_COUNTS if bad is not None])
def test_anthropic_breakdown_or_search_count_that_is_not_a_count_makes_the_usage_missing(bad: object) -> None:
    """The module's rule for optional details: absent or null is 0; given but not a count, the usage is not reported
    (estimated from text), never recorded as reported with a count made up."""
    base = {**ANTHROPIC_CACHED, "cache_creation_input_tokens": 300}
    assert from_anthropic({**base, "cache_creation": {"ephemeral_1h_input_tokens": bad}}) is MISSING_USAGE
    assert from_anthropic({**base, "cache_creation": {"ephemeral_5m_input_tokens": bad}}) is MISSING_USAGE
    assert from_anthropic({**base, "server_tool_use": {"web_search_requests": bad}}) is MISSING_USAGE


def test_anthropic_breakdown_summing_past_the_bound_makes_the_usage_missing() -> None:
    breakdown = {"ephemeral_5m_input_tokens": 2**62, "ephemeral_1h_input_tokens": 2**62}
    assert from_anthropic({"input_tokens": 1, "output_tokens": 1, "cache_creation": breakdown}) is MISSING_USAGE


# -- OpenAI: cached tokens are reported INSIDE prompt_tokens ----------------------------------------


def test_openai_cached_tokens_stay_inside_input() -> None:
    raw = {
        "prompt_tokens": 1500,
        "completion_tokens": 90,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 64},
    }
    assert from_openai(raw) == TokenUsage(
        input_tokens=1500,
        output_tokens=90,
        cache_read_tokens=1024,
        cache_write_tokens=0,
        reasoning_tokens=64,
        completeness=UsageCompleteness.REPORTED,
    )


def test_openai_cache_write_tokens_are_part_of_input() -> None:
    raw = {
        "prompt_tokens": 1000,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 200, "cache_write_tokens": 700},
    }
    usage = from_openai(raw)
    assert (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens) == (1000, 200, 700)


def test_openai_details_are_clamped_to_their_totals() -> None:
    raw = {
        "prompt_tokens": 100,
        "completion_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 150, "cache_write_tokens": 50},
        "completion_tokens_details": {"reasoning_tokens": 99},
    }
    usage = from_openai(raw)
    assert usage.cache_read_tokens == 100 and usage.cache_write_tokens == 0
    assert usage.reasoning_tokens == 10
    assert usage.cache_read_tokens + usage.cache_write_tokens <= usage.input_tokens


def test_openai_without_details_as_sdk_objects() -> None:
    # compatible servers (Ollama, vLLM) send no *_details; the SDK then has None there
    raw = SimpleNamespace(
        prompt_tokens=33, completion_tokens=12, prompt_tokens_details=None, completion_tokens_details=None
    )
    usage = from_openai(raw)
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.reasoning_tokens) == (33, 12, 0, 0)
    assert usage.completeness is UsageCompleteness.REPORTED


def test_openai_missing_usage_is_missing() -> None:
    assert from_openai(None) is MISSING_USAGE


def test_reasoning_is_part_of_output_not_added() -> None:
    usage = from_openai(
        {"prompt_tokens": 10, "completion_tokens": 500, "completion_tokens_details": {"reasoning_tokens": 480}}
    )
    assert usage.output_tokens == 500 and usage.total_tokens == 510


# -- reasoning reported OUTSIDE completion_tokens (xAI Grok): total_tokens is the witness ---------------------

XAI_USAGE = {  # a real xAI Grok answer: 32 + 9 + 94 = 135; the call was charged 103 output tokens
    "prompt_tokens": 32,
    "completion_tokens": 9,
    "total_tokens": 135,
    "completion_tokens_details": {"reasoning_tokens": 94},
}


def test_reasoning_outside_completion_is_added_into_output() -> None:
    """xAI reports reasoning beside completion_tokens (total = prompt + completion + reasoning): the usage said 9
    output tokens (reasoning capped at them) for a call charged 103. Reasoning is part of output: 9 + 94."""
    assert from_openai(XAI_USAGE) == TokenUsage(
        input_tokens=32,
        output_tokens=103,
        reasoning_tokens=94,
        completeness=UsageCompleteness.REPORTED,
    )
    # the same from the SDK's objects, and with reasoning smaller than completion (not a question of size)
    sdk = SimpleNamespace(
        prompt_tokens=32,
        completion_tokens=50,
        total_tokens=87,
        prompt_tokens_details=None,
        completion_tokens_details=SimpleNamespace(reasoning_tokens=5),
    )
    assert (from_openai(sdk).output_tokens, from_openai(sdk).reasoning_tokens) == (55, 5)
    # a gateway's Gemini answer spent all on thinking: completion_tokens 0, 21 + 0 + 60 = 81 (was 0 output tokens)
    gemini = {"prompt_tokens": 21, "completion_tokens": 0, "total_tokens": 81}
    usage = from_openai({**gemini, "completion_tokens_details": {"reasoning_tokens": 60}})
    assert (usage.output_tokens, usage.reasoning_tokens, usage.completeness) == (60, 60, "reported")


def test_reasoning_inside_completion_stays_inside() -> None:
    # OpenAI's convention: total = prompt + completion, reasoning a part of completion
    raw = {**XAI_USAGE, "completion_tokens": 103, "total_tokens": 135}
    usage = from_openai(raw)
    assert (usage.output_tokens, usage.reasoning_tokens, usage.total_tokens) == (103, 94, 135)


@pytest.mark.parametrize(
    "total",
    [
        None,  # no total: no witness
        136,  # neither sum: no witness
        41,  # prompt + completion: inside (reasoning past completion is then capped, as before)
        "135",  # a total that is not a count is no witness, and does not make the usage missing
        135.5,
        -135,
        True,
        math.nan,
        2**64,
        [135],
    ],
)
def test_without_a_witness_reasoning_is_capped_at_completion(total: object) -> None:
    usage = from_openai({**XAI_USAGE, "total_tokens": total})
    assert usage.completeness is UsageCompleteness.REPORTED
    assert (usage.input_tokens, usage.output_tokens, usage.reasoning_tokens) == (32, 9, 9)


def test_an_integral_float_total_is_a_witness() -> None:
    assert from_openai({**XAI_USAGE, "total_tokens": 135.0}).output_tokens == 103


def test_no_reasoning_leaves_the_total_unread() -> None:
    # total = prompt + completion + 0 is the ordinary case; a total off by anything else changes nothing
    for total in (41, 50, 0):
        raw = {**XAI_USAGE, "total_tokens": total, "completion_tokens_details": {"reasoning_tokens": 0}}
        assert (from_openai(raw).output_tokens, from_openai(raw).reasoning_tokens) == (9, 0)


def test_reasoning_outside_completion_at_the_bound() -> None:
    # a witness is a count, so the output it makes (a part of it) is one too: at most 2^63 - 1
    half = 2**62
    raw = {"prompt_tokens": 0, "completion_tokens": half, "completion_tokens_details": {"reasoning_tokens": half}}
    for total in (2 * half, float(2 * half)):  # a total past the bound is not a count: no witness, capped
        usage = from_openai({**raw, "total_tokens": total})
        assert (usage.output_tokens, usage.reasoning_tokens, usage.completeness) == (half, half, "reported")
    within = {**raw, "completion_tokens": half - 1, "total_tokens": 2 * half - 1}
    assert (from_openai(within).output_tokens, from_openai(within).reasoning_tokens) == (2**63 - 1, half)


DEEPSEEK_USAGE = {  # DeepSeek's own shape: prompt_tokens = prompt_cache_hit_tokens + prompt_cache_miss_tokens
    "prompt_tokens": 1100,
    "completion_tokens": 40,
    "total_tokens": 1140,
    "prompt_cache_hit_tokens": 1024,
    "prompt_cache_miss_tokens": 76,
}


def test_deepseek_cache_hits_are_cache_reads() -> None:
    """DeepSeek reports its cache hits as prompt_cache_hit_tokens (inside prompt_tokens), not in
    prompt_tokens_details: they were recorded as uncached input, priced at the full input rate (a cache hit costs a
    tenth of a miss). They are cache reads, inside input as OpenAI's cached_tokens."""
    usage = from_openai(DEEPSEEK_USAGE)
    assert (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens) == (1100, 1024, 40)
    sdk = SimpleNamespace(**DEEPSEEK_USAGE, prompt_tokens_details=None, completion_tokens_details=None)
    assert from_openai(sdk) == usage
    # OpenAI's own field wins when given (a gateway sending both); either is capped at prompt_tokens
    both = {**DEEPSEEK_USAGE, "prompt_tokens_details": {"cached_tokens": 1000}}
    assert from_openai(both).cache_read_tokens == 1000
    assert from_openai({**DEEPSEEK_USAGE, "prompt_cache_hit_tokens": 5000}).cache_read_tokens == 1100
    assert from_openai({**DEEPSEEK_USAGE, "prompt_cache_hit_tokens": None}).cache_read_tokens == 0
    assert from_openai({**DEEPSEEK_USAGE, "prompt_cache_hit_tokens": "1024"}) is MISSING_USAGE  # a count, or none


def test_the_same_call_normalises_alike_from_both_providers() -> None:
    anthropic = from_anthropic({"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 900})
    openai = from_openai(
        {"prompt_tokens": 1000, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 900}}
    )
    assert anthropic == openai


# -- estimates ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "tokens"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("x" * 400, 100)])
def test_estimate_tokens_is_a_ceiling_of_chars_over_four(text: str, tokens: int) -> None:
    assert estimate_tokens(text) == tokens


def test_estimate_input_tokens_counts_system_and_every_message_shape() -> None:
    messages = [
        {"role": "user", "content": "a" * 40},
        {"role": "assistant", "content": [{"type": "text", "text": "b" * 40}, "not-a-block"]},
        {"role": "user", "content": None},
    ]
    # 20 (system) + 40 + "\n" + 40 + "\n" + "" = 102 chars → 26 tokens
    assert estimate_input_tokens("s" * 20, messages) == 26
    assert estimate_input_tokens(None, []) == 0


def test_estimated_usage_is_marked_estimated() -> None:
    usage = estimated("sys", [{"role": "user", "content": "hello there"}], "x" * 9)
    assert usage.completeness is UsageCompleteness.ESTIMATED
    assert (usage.input_tokens, usage.output_tokens) == (4, 3)
    assert (usage.cache_read_tokens, usage.cache_write_tokens, usage.reasoning_tokens) == (0, 0, 0)


def test_fill_missing_keeps_reported_usage() -> None:
    reported = from_openai({"prompt_tokens": 5, "completion_tokens": 1})
    assert fill_missing(reported, None, [{"role": "user", "content": "x" * 100}], "y" * 100) is reported


def test_fill_missing_estimates_only_when_something_was_produced() -> None:
    messages = [{"role": "user", "content": "x" * 100}]
    assert fill_missing(MISSING_USAGE, None, messages, "") is MISSING_USAGE
    filled = fill_missing(MISSING_USAGE, None, messages, "y" * 10)
    assert filled.completeness is UsageCompleteness.ESTIMATED
    assert (filled.input_tokens, filled.output_tokens) == (25, 3)


def test_an_unfinished_stream_keeps_the_counts_reported_so_far() -> None:
    so_far = TokenUsage(input_tokens=1320, output_tokens=1, cache_read_tokens=1000, cache_write_tokens=300)
    messages = [{"role": "user", "content": "hi"}]
    kept = unfinished(so_far, None, messages, "x" * 40)  # 10 tokens of text received: more than the 1 reported
    assert kept == TokenUsage(1320, 10, 1000, 300, completeness=UsageCompleteness.ESTIMATED)
    assert unfinished(so_far, None, messages, "").output_tokens == 1
    assert unfinished(MISSING_USAGE, None, messages, "x" * 40) == estimated(None, messages, "x" * 40)
    assert unfinished(MISSING_USAGE, None, messages, "") is MISSING_USAGE  # nothing reported, nothing received


def test_searches_shown_without_usage_ride_on_the_estimate() -> None:
    """Usage not given, search results shown (an adapter's count on MISSING usage): the estimate keeps the searches;
    with nothing to estimate (a failed call, nothing received) the usage stays missing, which is not billed."""
    messages = [{"role": "user", "content": "hi"}]
    shown = TokenUsage(completeness=UsageCompleteness.MISSING, web_searches=2)
    with_searches = TokenUsage(1, 10, completeness=UsageCompleteness.ESTIMATED, web_searches=2)
    assert fill_missing(shown, None, messages, "x" * 40) == with_searches
    assert fill_missing(shown, None, messages, "", answered=True).web_searches == 2
    assert unfinished(shown, None, messages, "x" * 40) == with_searches
    assert unfinished(shown, None, messages, "") == shown
    assert finished(shown, MISSING_USAGE, None, messages, "x" * 40) == with_searches


def test_a_reported_zero_for_text_that_was_there_is_estimated() -> None:
    messages = [{"role": "user", "content": "x" * 40}]  # 10 tokens
    zero_in = TokenUsage(input_tokens=0, output_tokens=9)
    assert zero_counts_estimated(zero_in, None, messages, "y" * 8) == TokenUsage(
        10, 9, completeness=UsageCompleteness.ESTIMATED
    )
    both = fill_missing(TokenUsage(0, 0), None, messages, "y" * 8, answered=True)
    assert both == TokenUsage(10, 2, completeness=UsageCompleteness.ESTIMATED)
    tool_call = TokenUsage(input_tokens=30, output_tokens=0)  # no text in the reply: its 0 is not contradicted
    assert zero_counts_estimated(tool_call, None, messages, "") is tool_call
    cached = TokenUsage(input_tokens=1000, output_tokens=5, cache_read_tokens=1000)
    assert fill_missing(cached, None, messages, "y", answered=True) is cached


def test_a_finished_stream_uses_its_final_usage_else_what_was_reported_before() -> None:
    messages = [{"role": "user", "content": "hi"}]
    final = TokenUsage(1320, 7, 1000, 300)
    start = TokenUsage(1320, 1, 1000, 300)
    assert finished(final, start, None, messages, "x" * 40) is final
    assert finished(MISSING_USAGE, start, None, messages, "x" * 40) == TokenUsage(
        1320, 10, 1000, 300, completeness=UsageCompleteness.ESTIMATED
    )
    assert finished(MISSING_USAGE, MISSING_USAGE, None, messages, "x" * 40) == estimated(None, messages, "x" * 40)


def test_streams_that_end_early_or_without_final_usage_keep_one_hour_cache_writes_and_web_searches() -> None:
    messages = [{"role": "user", "content": "hi"}]
    so_far = TokenUsage(1320, 1, 1000, 300, cache_write_1h_tokens=200, web_searches=2)
    kept = TokenUsage(
        1320, 10, 1000, 300, completeness=UsageCompleteness.ESTIMATED, cache_write_1h_tokens=200, web_searches=2
    )
    assert unfinished(so_far, None, messages, "x" * 40) == kept
    assert unfinished(so_far, None, messages, "x" * 40, output_final=True) is so_far
    assert finished(MISSING_USAGE, so_far, None, messages, "x" * 40) == kept
    zero_in = TokenUsage(0, 5, web_searches=1)  # a zero input for a prompt: estimated
    assert zero_counts_estimated(zero_in, None, messages, "y").web_searches == 1
