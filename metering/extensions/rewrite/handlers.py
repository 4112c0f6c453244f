"""Handlers of the rewrite extension (from the platform's BYOLLM recipe)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from metering.errors import InvalidJSONResponseError, ProviderError
from metering.extensions.rewrite.schemas import (
    ActionItem,
    ExtractActionItemsParams,
    RewriteMultipleParams,
    RewriteParams,
    is_blank,
)
from metering.llm.responses import LLMResponse
from metering.llm.types import STOP_CONTEXT_WINDOW
from metering.runtime import ChatExtension, Context

chat = ChatExtension("rewrite", description="Rewrite a message in another tone, with the user's own LLM if set.")

TONE_PROMPTS = {
    "formal": "Rewrite the following text in a formal, professional tone.",
    "casual": "Rewrite the following text in a casual, conversational tone.",
    "concise": "Rewrite the following text to be as concise as possible while keeping every important detail.",
    "friendly": "Rewrite the following text to feel warm and friendly.",
    "apologetic": "Rewrite the following text to be apologetic and humble.",
}
KEEP_MEANING = " Preserve all factual content. Don't add or remove information."
REWRITE_MAX_TOKENS = 1500  # the recipe's; the text is bounded to fit it (schemas.MAX_REWRITE_CHARS)
# extract_action_items asks for what the text's JSON list can need, so a small text gets a small budget (an enforced
# token budget reserves max_tokens: a fixed 16,384 refused "Call Bob." under any budget below ~16.4k). The worst case
# is many tiny tasks: a task of ~5 characters ("Al z.") is ~20 tokens of JSON ({"owner": ..., "deadline": null,
# "task": ...}), so 5 tokens a character, plus room for the object around the list and a code fence. The text is
# bounded (schemas.MAX_ACTION_ITEMS_CHARS) so that this stays under 16,384; only the tokens used are billed. A model
# that allows less output (4,096 tokens: many OpenAI-compatible servers, older models) states its limit when it
# refuses more, and ctx.llm makes the call once more at that limit. The base leaves a reasoning model (whose
# max_tokens covers its reasoning too) room to think before a short list: 2,048.
ACTION_ITEMS_BASE_TOKENS = 2048
ACTION_ITEMS_MAX_TOKENS = 16_384
ACTION_ITEMS_TOKENS_PER_CHAR = 5
ACTION_ITEMS_SYSTEM = "Extract action items as JSON: {items: [{owner, deadline, task}]}"


def action_items_max_tokens(text: str) -> int:
    return min(ACTION_ITEMS_MAX_TOKENS, ACTION_ITEMS_BASE_TOKENS + ACTION_ITEMS_TOKENS_PER_CHAR * len(text))


# Stop reasons of a reply the provider's content filter cut (OpenAI's finish_reason) or the model refused (Anthropic's).
FILTERED_STOPS = frozenset({"content_filter", "refusal"})


def _no_result(response: LLMResponse, what: str, reason: str) -> ProviderError:
    return ProviderError(
        f"the model's reply {reason}: no {what} to return (the call was made and is metered)",
        error_type="no_result",
        provider=response.provider,
    )


def _not_filtered(response: LLMResponse, what: str) -> None:
    """A reply stopped by the provider's content filter or a refusal is not the answer asked for, whatever text it
    has (a fragment, a list cut short): a ``provider_error``; the call was made and is metered (billed unless the
    user's own LLM served it; the invocation's problem names it)."""
    if response.stop_reason in FILTERED_STOPS:
        raise _no_result(response, what, f"was stopped by the provider (stop reason {response.stop_reason!r})")


def _rewritten(response: LLMResponse) -> str:
    """The rewrite a reply holds; one with nothing visible in it (empty, only blanks) or filtered is none."""
    _not_filtered(response, "rewrite")
    if is_blank(response.text):
        reason = "is empty" if not response.text else "holds only whitespace or invisible characters"
        if response.stop_reason == STOP_CONTEXT_WINDOW:  # not the model's answer: its context window ran out first
            reason += ": it stopped where the model's context window ran out, before any text"
        elif response.truncated:  # not the model's answer: its max_tokens ran out first
            reason += ": it stopped at max_tokens before any text (a reasoning model may spend them all thinking)"
        raise _no_result(response, "rewrite", reason)
    return response.text


def _served_by(ctx: Context) -> dict[str, Any]:
    """The last call's provider and model; is_byollm only when every call was served by the user's own LLM (a call
    that failed over to the platform LLM was billed: the result must not say the invocation was not)."""
    return {"provider": ctx.llm.provider, "model": ctx.llm.model, "is_byollm": ctx.llm.all_byollm}


@chat.function(
    description="Rewrite a piece of text in a specified tone using the user's configured LLM.",
    action_type="read",
    effects=["llm.text-generation"],
)
async def rewrite(ctx: Context, params: RewriteParams) -> dict[str, Any]:
    system = TONE_PROMPTS[params.tone]
    if params.keep_meaning:
        system += KEEP_MEANING
    response = await ctx.llm.create_message(
        system=system,
        messages=[{"role": "user", "content": params.text}],
        max_tokens=REWRITE_MAX_TOKENS,
        purpose="content_rewrite",
    )
    # A rewrite cut off (by max_tokens, or where the model's context window ran out) is not returned as a plain
    # success: `truncated` says the text is incomplete.
    return {"text": _rewritten(response), "truncated": response.truncated, **_served_by(ctx)}


@chat.function(
    description="Rewrite a piece of text several times (1 to 5 variations) in a formal or casual tone.",
    action_type="read",
    effects=["llm.text-generation"],
)
async def rewrite_multiple(ctx: Context, params: RewriteMultipleParams) -> dict[str, Any]:
    variations: list[str] = []
    truncated = False
    for i in range(params.n_variations):  # bounded by the schema: 1..5 calls
        response = await ctx.llm.create_message(
            system=f"Rewrite in {params.tone} tone, variation {i + 1}.",
            messages=[{"role": "user", "content": params.text}],
            max_tokens=REWRITE_MAX_TOKENS,
            purpose="content_rewrite",
        )
        variations.append(_rewritten(response))
        truncated = truncated or response.truncated
    return {"variations": variations, "truncated": truncated, **_served_by(ctx)}


@chat.function(
    description="Extract action items (owner, deadline, task) from a piece of text, as JSON.",
    action_type="read",
    effects=["llm.text-generation"],
)
async def extract_action_items(ctx: Context, params: ExtractActionItemsParams) -> dict[str, Any]:
    response = await ctx.llm.create_message(
        system=ACTION_ITEMS_SYSTEM,
        messages=[{"role": "user", "content": params.text}],
        max_tokens=action_items_max_tokens(params.text),
        purpose="action_items",
        response_format="json",
    )
    _not_filtered(response, "action items")
    payload = response.json
    raw_items = payload.get("items") if isinstance(payload, dict) else payload
    if not isinstance(raw_items, list):
        got = _what(payload) if not isinstance(payload, dict) else _object_without_items(payload)
        raise InvalidJSONResponseError(f"expected a JSON object with an 'items' list, got {got}", text=response.text)
    return {"action_items": [_action_item(index, item, response.text) for index, item in enumerate(raw_items)],
            **_served_by(ctx)}  # fmt: skip


_JSON_KINDS = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


def _what(value: Any) -> str:
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


def _object_without_items(payload: dict[str, Any]) -> str:
    """What a reply object holds instead of an 'items' list (its keys, bounded; or what its 'items' is)."""
    if "items" in payload:
        return f"an object whose 'items' is {_what(payload['items'])}"
    if not payload:
        return "an object with no keys"
    keys = ", ".join(repr(key[:40]) for key in list(payload)[:5])
    return f"an object with the keys {keys}{', ...' if len(payload) > 5 else ''}"


def _action_item(index: int, item: Any, text: str) -> dict[str, Any]:
    """One item of the reply's list, or a 502 naming it, its field and what is wrong (the first problem found)."""
    try:
        return ActionItem.model_validate(item).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"{part}: " for part in first["loc"])
        more = exc.error_count() - 1
        rest = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        raise InvalidJSONResponseError(
            f"action item {index} does not match {{owner, deadline, task}}: {where}{first['msg']}{rest}", text=text
        ) from None
