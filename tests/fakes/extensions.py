"""A test extension with a bug: it calls the LLM (a billed call), then raises something that is not a MeteringError."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from pydantic import BaseModel

from metering.runtime import ChatExtension, Context

buggy = ChatExtension("buggy", description="calls the LLM, then fails")


class BuggyParams(BaseModel):
    text: str


@buggy.function(description="one call, then a bug", action_type="read", effects=["llm.text-generation"])
async def run(ctx: Context, params: BuggyParams) -> dict[str, Any]:
    await ctx.llm.create_message(messages=[{"role": "user", "content": params.text}], max_tokens=50)
    raise RuntimeError("a bug after the call")


@buggy.function(description="one call, then Ctrl-C", action_type="read", effects=["llm.text-generation"])
async def interrupted(ctx: Context, params: BuggyParams) -> dict[str, Any]:
    """One call, then SIGINT (as a Ctrl-C would): ``asyncio.run`` cancels the invocation, and it waits until then."""
    await ctx.llm.create_message(messages=[{"role": "user", "content": params.text}], max_tokens=50)
    signal.raise_signal(signal.SIGINT)
    await asyncio.Event().wait()  # never set: the cancellation ends it
    raise AssertionError("unreachable")


class OddParams(BaseModel):
    kind: str


ODD_RESULTS: dict[str, Any] = {
    "object": object(),
    "bytes": {"data": b"\xff\xfe"},  # not UTF-8
    "surrogate": {"text": "half an emoji \ud83d"},  # a lone surrogate no response can encode
}


@buggy.function(
    description="one call, then a result JSON cannot carry", action_type="read", effects=["llm.text-generation"]
)
async def odd_result(ctx: Context, params: OddParams) -> Any:
    await ctx.llm.create_message(messages=[{"role": "user", "content": params.kind}], max_tokens=50)
    return ODD_RESULTS[params.kind]
