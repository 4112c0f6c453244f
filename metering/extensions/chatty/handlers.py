"""Handlers of the chatty extension: a thread summarizer written the way cost reviews exist to catch.

It is bundled on purpose, as demo traffic for the metering: ``summarize_thread`` makes one LLM call per message
of the thread (the number of calls grows with the input, unbounded by its schema), each re-sending the running
summary, then "polishes" the summary in a loop with a near-identical prompt until the answer stops changing,
which with most models (and the simulated provider) is never: it runs to its round limit. Like every
extension, it uses ``ctx.llm`` only.
"""

from __future__ import annotations

from typing import Any

from metering.extensions.chatty.schemas import SummarizeThreadParams
from metering.runtime import ChatExtension, Context

chat = ChatExtension("chatty", description="Summarize a chat thread (calls the LLM in a loop: a cost-review example).")

SUMMARY_SYSTEM = "Update the running summary of a chat thread with the new message. Reply with the summary only."
POLISH_SYSTEM = "Improve this summary of a chat thread. If it cannot be improved, reply with exactly the same text."
SUMMARY_MAX_TOKENS = 400
PURPOSE = "thread_summary"


@chat.function(
    description="Summarize a chat thread: one LLM call per message, then polish rounds until the summary is stable.",
    action_type="read",
    effects=["llm.text-generation"],
)
async def summarize_thread(ctx: Context, params: SummarizeThreadParams) -> dict[str, Any]:
    summary = ""
    for message in params.messages:  # one call per message: as many calls as the thread is long
        response = await ctx.llm.create_message(
            system=SUMMARY_SYSTEM,
            messages=[{"role": "user", "content": f"Summary so far: {summary or '(none)'}\n\nNew message: {message}"}],
            max_tokens=SUMMARY_MAX_TOKENS,
            purpose=PURPOSE,
        )
        summary = response.text
    rounds = 0
    for _ in range(params.polish_rounds):  # near-identical prompts until the text stops changing (it rarely does)
        response = await ctx.llm.create_message(
            system=POLISH_SYSTEM,
            messages=[{"role": "user", "content": summary}],
            max_tokens=SUMMARY_MAX_TOKENS,
            purpose=PURPOSE,
        )
        rounds += 1
        if response.text.strip() == summary.strip():
            break
        summary = response.text
    return {
        "summary": summary,
        "llm_calls": ctx.llm.calls,
        "polish_rounds": rounds,
        "provider": ctx.llm.provider,
        "model": ctx.llm.model,
        "is_byollm": ctx.llm.all_byollm,  # every call served by the user's own LLM, none billed
    }
