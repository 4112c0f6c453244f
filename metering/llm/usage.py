"""Provider raw usage → TokenUsage, normalised once (pure; no I/O).

OpenTelemetry GenAI semantics: ``input_tokens`` includes cache-read and cache-write tokens;
``reasoning_tokens`` is part of ``output_tokens``.

- Anthropic reports ``input_tokens`` *excluding* cache tokens, with ``cache_read_input_tokens`` and
  ``cache_creation_input_tokens`` beside it; thinking tokens are inside ``output_tokens`` and not
  reported apart. ``cache_creation`` splits the cache writes by how long they are kept
  (``ephemeral_5m_input_tokens``, ``ephemeral_1h_input_tokens``): the 1-hour ones, priced higher, are
  ``cache_write_1h_tokens``, part of ``cache_write_tokens``. ``cache_creation_input_tokens`` is the count billed and
  the breakdown only splits it: a 1-hour count past it is capped at it (as OpenAI's details are capped at their
  totals), and without it (absent or ``null``) the cache writes are the breakdown's sum.
  ``server_tool_use.web_search_requests`` is the searches its web search tool ran for the call (``web_searches``,
  charged per search; web fetches are not, and are not read).
- OpenAI (and OpenAI-compatible servers) report ``prompt_tokens`` *including* cached tokens
  (``prompt_tokens_details.cached_tokens``; newer APIs also give ``cache_write_tokens`` there) and
  ``completion_tokens`` including ``completion_tokens_details.reasoning_tokens``.
- DeepSeek's own API gives its cache hits as ``prompt_cache_hit_tokens`` (inside ``prompt_tokens`` too): read when
  ``cached_tokens`` is not given.
- Some compatible servers (xAI's Grok) report reasoning *beside* ``completion_tokens`` instead: their
  ``total_tokens`` is prompt + completion + reasoning. ``total_tokens`` is the witness: when reasoning is not 0 and
  the total is exactly that sum, the output is completion + reasoning (reasoning a part of it, as everywhere here);
  otherwise reasoning is inside completion and capped at it (a total that is absent, not a count, or neither sum
  says nothing either way). A ``total_tokens`` that is not a count is only no witness: it never makes the usage
  missing.

Counts are trusted only when they are counts. Every count the provider gives must be a non-negative integer
(an ``int``, or a float with an integral value) below 2^63; the main counts (Anthropic ``input_tokens`` and
``output_tokens``, OpenAI ``prompt_tokens`` and ``completion_tokens``) must be given. Otherwise — a count absent,
``null``, negative, text, a bool, a fraction, infinite, past 2^63, or a normalised sum past it — the provider's
usage is treated as not reported (``MISSING``, which ``fill_missing`` estimates from text): it is never recorded as
``reported`` with 0 tokens (a paid call billed $0), and never breaks the event line (orjson writes no integer past
64 bits). The optional details (cache, reasoning and web search counts, and the objects that hold them:
Anthropic's ``cache_creation`` and ``server_tool_use``, read as absent when not objects) may be absent or ``null``:
0; a detail that is given but is not a count makes the usage not reported, like a main count (one wrong count casts
doubt on the others). A reported input or output of 0 for a prompt or a reply that has text is not a count either:
that part is estimated (``zero_counts_estimated``). A count within 2^63 but past ``metering.events.MAX_TOKENS`` (or
a search count past ``MAX_WEB_SEARCHES``) stays as reported: ingest rejects that event with its reason, by design.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from metering.events import UsageCompleteness
from metering.llm.types import MISSING_USAGE, TokenUsage

CHARS_PER_TOKEN = 4
MAX_COUNT = 2**63 - 1  # BIGINT, and what orjson can write as an integer


class _NotACount(Exception):
    """A count the provider gave is not a usable count: its usage is treated as not reported."""


def _count(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():  # inf and nan are not integers
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
        raise _NotACount
    return value


def _detail(value: Any) -> int:
    """An optional count (cache, reasoning): absent or ``null`` is 0."""
    return 0 if value is None else _count(value)


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def from_anthropic(usage: Any) -> TokenUsage:
    """Normalise an Anthropic ``usage`` object or dict (``None`` → MISSING)."""
    if usage is None:
        return MISSING_USAGE
    cache_creation = _get(usage, "cache_creation")  # the cache writes by TTL
    try:
        uncached = _count(_get(usage, "input_tokens"))
        output = _count(_get(usage, "output_tokens"))
        cache_read = _detail(_get(usage, "cache_read_input_tokens"))
        cache_write_total = _get(usage, "cache_creation_input_tokens")
        cache_write_5m = _detail(_get(cache_creation, "ephemeral_5m_input_tokens"))
        cache_write_1h = _detail(_get(cache_creation, "ephemeral_1h_input_tokens"))
        web_searches = _detail(_get(_get(usage, "server_tool_use"), "web_search_requests"))
        # the total is what the provider bills; the breakdown only splits it (it stands in for a total not given)
        cache_write = cache_write_5m + cache_write_1h if cache_write_total is None else _count(cache_write_total)
    except _NotACount:
        return MISSING_USAGE
    input_tokens = uncached + cache_read + cache_write
    if input_tokens > MAX_COUNT:  # each part a count, their sum not
        return MISSING_USAGE
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=output,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=0,
        completeness=UsageCompleteness.REPORTED,
        cache_write_1h_tokens=min(cache_write_1h, cache_write),
        web_searches=web_searches,
    )


def _total(usage: Any) -> int | None:
    """OpenAI's ``total_tokens``, when it is a count: only a witness of where reasoning is counted, so one that is
    not a count is no witness (``None``), and never makes the usage missing."""
    try:
        return _count(_get(usage, "total_tokens"))
    except _NotACount:
        return None


def from_openai(usage: Any) -> TokenUsage:
    """Normalise an OpenAI chat-completions ``usage`` object or dict (``None`` → MISSING)."""
    if usage is None:
        return MISSING_USAGE
    prompt_details = _get(usage, "prompt_tokens_details")
    try:
        prompt = _count(_get(usage, "prompt_tokens"))
        completion = _count(_get(usage, "completion_tokens"))
        cached = _get(prompt_details, "cached_tokens")
        if cached is None:  # DeepSeek's own API: its cache hits, inside prompt_tokens as OpenAI's cached_tokens
            cached = _get(usage, "prompt_cache_hit_tokens")
        cached = min(_detail(cached), prompt)
        cache_write = min(_detail(_get(prompt_details, "cache_write_tokens")), prompt - cached)
        reasoning = _detail(_get(_get(usage, "completion_tokens_details"), "reasoning_tokens"))
    except _NotACount:
        return MISSING_USAGE
    output = completion
    if reasoning and _total(usage) == prompt + completion + reasoning:
        output = completion + reasoning  # reasoning reported beside completion (xAI): it is part of output
        if output > MAX_COUNT:  # not while the total (their sum's bound) is a count: kept as a guard
            return MISSING_USAGE
    else:
        reasoning = min(reasoning, completion)  # inside completion (OpenAI), or no witness saying otherwise
    return TokenUsage(
        input_tokens=prompt,
        output_tokens=output,
        cache_read_tokens=cached,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
        completeness=UsageCompleteness.REPORTED,
    )


def estimate_tokens(text: str) -> int:
    """A provider-agnostic estimate: about four characters per token, at least one for any text."""
    if not text:
        return 0
    return max(1, (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN)


def _message_text(messages: Iterable[Mapping[str, Any]]) -> str:
    parts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(block.get("text", "")) for block in content if isinstance(block, Mapping))
    return "\n".join(parts)


def estimate_input_tokens(system: str | None, messages: Iterable[Mapping[str, Any]]) -> int:
    return estimate_tokens((system or "") + _message_text(messages))


def estimated(
    system: str | None, messages: Iterable[Mapping[str, Any]], output_text: str, web_searches: int = 0
) -> TokenUsage:
    """Usage estimated from what was sent and what was received, marked ``estimated``; ``web_searches``: those the
    reply showed (a provider's usage not given, its search results were)."""
    return TokenUsage(
        input_tokens=estimate_input_tokens(system, messages),
        output_tokens=estimate_tokens(output_text),
        completeness=UsageCompleteness.ESTIMATED,
        web_searches=web_searches,
    )


def zero_counts_estimated(
    usage: TokenUsage, system: str | None, messages: Iterable[Mapping[str, Any]], output_text: str
) -> TokenUsage:
    """Reported usage whose input or output is 0 for a prompt or a reply that has text: that count is not one (a server
    that counts nothing and says 0; Ollama's ``prompt_tokens`` for a prompt it had cached), so it is estimated and the
    usage marked ``estimated``, never billed as 0 tokens. Other usage is returned as it is."""
    input_tokens = usage.input_tokens or estimate_input_tokens(system, messages)
    output_tokens = usage.output_tokens or estimate_tokens(output_text)
    if input_tokens == usage.input_tokens and output_tokens == usage.output_tokens:
        return usage
    return replace(
        usage, input_tokens=input_tokens, output_tokens=output_tokens, completeness=UsageCompleteness.ESTIMATED
    )


def fill_missing(
    usage: TokenUsage,
    system: str | None,
    messages: Iterable[Mapping[str, Any]],
    output_text: str,
    *,
    answered: bool = False,
) -> TokenUsage:
    """Keep reported usage (its counts of 0 for text that was there estimated: ``zero_counts_estimated``); replace
    MISSING usage by an estimate when anything was produced, or when the provider answered (``answered``: it read the
    prompt, even if its reply has no text, e.g. a tool call or all output spent thinking: never recorded as 0 tokens,
    which would bill a paid call $0). MISSING usage may carry the web searches whose results the reply showed (an
    adapter's count when the provider's usage is not given): the estimate keeps them."""
    if usage.completeness is UsageCompleteness.REPORTED:
        if usage.input_tokens and (usage.output_tokens or not output_text):
            return usage  # nearly every call: no count to question (the metered call's hot path)
        return zero_counts_estimated(usage, system, messages, output_text)
    if usage.completeness is not UsageCompleteness.MISSING:
        return usage
    if not output_text and not answered:
        return usage
    return estimated(system, messages, output_text, usage.web_searches)


def finished(
    reported: TokenUsage,
    reported_so_far: TokenUsage,
    system: str | None,
    messages: Iterable[Mapping[str, Any]],
    output_text: str,
    *,
    output_final: bool = False,
) -> TokenUsage:
    """The usage of a stream that ended normally: what the provider reported at its end; when it reported nothing there
    but counts before (an Anthropic-compatible gateway whose ``message_delta`` has no usage: ``message_start``'s output
    count is a placeholder), those counts with the output estimated as for an unfinished stream; else an estimate."""
    nothing_at_the_end = reported.completeness is UsageCompleteness.MISSING
    if nothing_at_the_end and reported_so_far.completeness is UsageCompleteness.REPORTED:
        return unfinished(reported_so_far, system, messages, output_text, output_final=output_final)
    return fill_missing(reported, system, messages, output_text, answered=True)


def unfinished(
    reported_so_far: TokenUsage,
    system: str | None,
    messages: Iterable[Mapping[str, Any]],
    output_text: str,
    *,
    output_final: bool = False,
) -> TokenUsage:
    """The usage of a stream that did not end normally (abandoned, or broken).

    What the provider reported before it ended (``UsageSoFar``: Anthropic's input and cache counts at the start) is
    kept, the output being the larger of its count so far and the estimate of the text received (``estimated``);
    without it, the input is estimated from the prompt too (and nothing is counted when nothing was received).
    When the provider had given its final counts (``output_final``: its last usage, after the last text; the
    stream broke or was dropped just before its end), they are what it charges: kept as they are (``reported``).
    """
    if reported_so_far.completeness is not UsageCompleteness.REPORTED:  # searches shown without usage are kept
        searches = reported_so_far.web_searches
        missing = replace(MISSING_USAGE, web_searches=searches) if searches else MISSING_USAGE
        return fill_missing(missing, system, messages, output_text)
    usage = zero_counts_estimated(reported_so_far, system, messages, output_text)
    if output_final:
        return usage
    output = max(usage.output_tokens, estimate_tokens(output_text))
    return replace(usage, output_tokens=output, completeness=UsageCompleteness.ESTIMATED)
