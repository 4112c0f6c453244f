"""Runtime.invoke: every call the handler made, streams it left open included, is recorded before it returns or raises.

The invocation's event ids are what the HTTP invoke keeps with its Idempotency-Key: a call missing from them is one a
retry would pay for twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from metering.errors import ProviderError
from metering.llm.pool import ProviderPool
from metering.llm.resolution import PurposeSettings
from metering.llm.settings_source import InMemorySettings
from metering.runtime import ChatExtension, Context, Runtime, User
from metering.runtime.invoke import invocation_calls
from tests.unit.test_metered_llm import MESSAGES, PLATFORM, FakeProvider, Recorder

streams = ChatExtension("streams", description="handlers that leave streams open")
kept: list[AsyncIterator[str]] = []  # a handler that keeps the stream's iterator alive past its return


class NoParams(BaseModel):
    pass


@streams.function(description="returns the first chunk, without async with")
async def first_chunk(ctx: Context, params: NoParams) -> str:
    async for chunk in ctx.llm.stream_message(messages=MESSAGES):
        return chunk
    return ""


@streams.function(description="peeks at a stream, then fails")
async def peek_then_fail(ctx: Context, params: NoParams) -> str:
    async for _chunk in ctx.llm.stream_message(messages=MESSAGES):
        break
    raise ValueError("a bug after the stream")


@streams.function(description="reads one chunk and keeps the iterator")
async def keep_iterator(ctx: Context, params: NoParams) -> str:
    iterator = aiter(ctx.llm.stream_message(messages=MESSAGES))
    kept.append(iterator)
    return await anext(iterator)


@streams.function(description="reads a whole stream, then opens one it never iterates")
async def whole_stream(ctx: Context, params: NoParams) -> str:
    ctx.llm.stream_message(messages=MESSAGES)  # never iterated: no call made, nothing to record
    return "".join([chunk async for chunk in ctx.llm.stream_message(messages=MESSAGES)])


def runtime() -> tuple[Runtime, Recorder]:
    recorder = Recorder()
    pool = ProviderPool(FakeProvider)
    return Runtime(settings=InMemorySettings(), platform=PLATFORM, providers=pool, recorder=recorder), recorder


@pytest.mark.parametrize("function", ["first_chunk", "keep_iterator"])
async def test_a_stream_left_open_is_recorded_before_invoke_returns(function: str) -> None:
    rt, rec = runtime()
    result = await rt.invoke(streams, function, {}, User("user-1", "tenant-1"))
    kept.clear()
    assert result.result == "one "
    [event] = rec.events
    assert result.event_ids == [str(event.event_id)]
    assert (event.status, event.output_tokens, event.usage_completeness) == ("cancelled", 1, "estimated")


async def test_a_stream_left_open_is_in_the_calls_of_a_failed_invocation() -> None:
    rt, rec = runtime()
    with pytest.raises(ValueError, match="a bug after the stream") as info:
        await rt.invoke(streams, "peek_then_fail", {}, User("user-1", "tenant-1"))
    calls = invocation_calls(info.value)
    [event] = rec.events
    assert calls is not None and calls.event_ids == calls.used_event_ids == [str(event.event_id)]
    assert event.status == "cancelled"


async def test_a_stream_read_to_the_end_is_recorded_once() -> None:
    rt, rec = runtime()
    result: Any = await rt.invoke(streams, "whole_stream", {}, User("user-1", "tenant-1"))
    assert result.result == "one two three four"
    assert [e.status for e in rec.events] == ["ok"] and len(result.event_ids) == 1


@pytest.mark.parametrize(
    ("user", "field"),
    [(User("u" * 201, "tenant-1"), "user_id"), (User("user-1", ""), "tenant_id"), (User("a\x00b", "t"), "user_id")],
)
async def test_ids_an_event_cannot_hold_are_refused_before_any_call(user: User, field: str) -> None:
    """The CLI's `rewrite --user <300 characters>` made the call, then its event was dead-lettered: never billed."""
    from metering.errors import InvalidInputError

    rt, rec = runtime()
    with pytest.raises(InvalidInputError, match=f"invalid {field}"):
        await rt.invoke(streams, "whole_stream", {}, user)
    assert rec.events == [] and rec.lines == []


class RefusingRecorder(Recorder):
    """A spool that starts refusing lines (disk full) once ``refusing`` is set."""

    refusing = False

    def append_line(self, data: bytes) -> None:
        if self.refusing:
            from metering.errors import SpoolError

            raise SpoolError("could not append the usage event to the spool: disk full")
        super().append_line(data)


refusing = RefusingRecorder()


@streams.function(description="keeps a stream open, then the spool fails, then the handler fails")
async def keep_then_fail(ctx: Context, params: NoParams) -> str:
    kept.append(iterator := aiter(ctx.llm.stream_message(messages=MESSAGES)))
    await anext(iterator)
    refusing.refusing = True
    raise ValueError("the handler's own bug")


async def test_a_failure_ending_a_left_stream_never_replaces_the_handlers_exception() -> None:
    """The stream's event cannot be written: the handler's ValueError is still what invoke raises (it was replaced
    by the SpoolError, which the HTTP invoke then answered and stored under its Idempotency-Key; found by a
    review), with the failure noted on it."""
    rt = Runtime(
        settings=InMemorySettings(), platform=PLATFORM, providers=ProviderPool(FakeProvider), recorder=refusing
    )
    with pytest.raises(ValueError, match="the handler's own bug") as info:
        await rt.invoke(streams, "keep_then_fail", {}, User("user-1", "tenant-1"))
    kept.clear()
    assert any("SpoolError" in note and "disk full" in note for note in info.value.__notes__)


fan_out = ChatExtension("fan_out", description="handlers that run calls concurrently")
SLOW = InMemorySettings(
    purpose_by_name={
        "slow": PurposeSettings("slow", "openai", "slow-model"),  # FakeProvider: sleeps 10 s
        "failing": PurposeSettings("failing", "openai", "fail-model"),  # FakeProvider: raises at once
    }
)


@fan_out.function(description="two calls at once with asyncio.gather; one fails at once")
async def gather_one_fails(ctx: Context, params: NoParams) -> str:
    await asyncio.gather(
        ctx.llm.create_message(messages=MESSAGES, purpose="slow"),
        ctx.llm.create_message(messages=MESSAGES, purpose="failing"),
    )
    return "unreachable"


@fan_out.function(description="starts a call in a task it never awaits")
async def call_left_running(ctx: Context, params: NoParams) -> str:
    background.append(asyncio.create_task(ctx.llm.create_message(messages=MESSAGES, purpose="slow")))
    await asyncio.sleep(0)  # the call is made
    return "done"


background: list[asyncio.Task[Any]] = []


async def read_stream(ctx: Context, purpose: str) -> str:
    return "".join([chunk async for chunk in ctx.llm.stream_message(messages=MESSAGES, purpose=purpose)])


@fan_out.function(description="reads two streams at once with asyncio.gather; one call fails at once")
async def gather_streams_one_fails(ctx: Context, params: NoParams) -> str:
    await asyncio.gather(read_stream(ctx, "slow"), ctx.llm.create_message(messages=MESSAGES, purpose="failing"))
    return "unreachable"


async def test_a_call_a_failed_handler_left_in_flight_is_in_the_calls_of_the_invocation() -> None:
    """`asyncio.gather` raises the first failure and leaves the other calls running: invoke raised with only the failed
    call's event, and the HTTP invoke freed (or stored) the Idempotency-Key without the call still in flight, whose
    event came later: a retry paid for it twice. The runtime ends it, as a stream left open (`cancelled`)."""
    recorder = Recorder()
    rt = Runtime(settings=SLOW, platform=PLATFORM, providers=ProviderPool(FakeProvider), recorder=recorder)
    with pytest.raises(ProviderError) as info:
        await asyncio.wait_for(rt.invoke(fan_out, "gather_one_fails", {}, User("user-1", "tenant-1")), 5)
    calls = invocation_calls(info.value)
    assert calls is not None
    assert sorted(e.status for e in recorder.events) == ["cancelled", "error"]
    assert sorted(calls.event_ids) == sorted(str(e.event_id) for e in recorder.events)


async def test_a_call_left_running_by_a_handler_is_recorded_before_invoke_returns() -> None:
    recorder = Recorder()
    rt = Runtime(settings=SLOW, platform=PLATFORM, providers=ProviderPool(FakeProvider), recorder=recorder)
    result = await asyncio.wait_for(rt.invoke(fan_out, "call_left_running", {}, User("user-1", "tenant-1")), 5)
    [event] = recorder.events
    assert result.event_ids == [str(event.event_id)] and event.status == "cancelled"
    [task] = background
    background.clear()
    assert task.cancelled()


async def test_a_stream_another_task_is_reading_is_in_the_calls_of_a_failed_invocation() -> None:
    """The stream's task was waiting for its next chunk when the invocation ended: the stream was left to it, and
    recorded after invoke raised (missing from the calls the HTTP invoke keeps with its Idempotency-Key)."""
    recorder = Recorder()
    rt = Runtime(settings=SLOW, platform=PLATFORM, providers=ProviderPool(FakeProvider), recorder=recorder)
    with pytest.raises(ProviderError) as info:
        await asyncio.wait_for(rt.invoke(fan_out, "gather_streams_one_fails", {}, User("user-1", "tenant-1")), 5)
    calls = invocation_calls(info.value)
    assert calls is not None
    assert sorted(e.status for e in recorder.events) == ["cancelled", "error"]
    assert sorted(calls.event_ids) == sorted(str(e.event_id) for e in recorder.events)
    [stream_event] = [e for e in recorder.events if e.is_stream]
    assert (stream_event.status, stream_event.output_tokens) == ("cancelled", 1)  # "one ", received before


FAST = InMemorySettings(purpose_by_name={"fast": PurposeSettings("fast", "openai", "pause-model")})
after_first = asyncio.Event()


@fan_out.function(description="starts a call in a task and returns before the task ran")
async def call_started_late(ctx: Context, params: NoParams) -> str:
    background.append(asyncio.create_task(ctx.llm.create_message(messages=MESSAGES, purpose="fast")))
    return "done"


@fan_out.function(description="starts reading a stream in a task and returns before the task ran")
async def stream_started_late(ctx: Context, params: NoParams) -> str:
    background.append(asyncio.create_task(read_stream(ctx, "fast")))
    return "done"


@fan_out.function(description="a task making two calls in sequence, with other work between them")
async def two_calls_in_a_task(ctx: Context, params: NoParams) -> str:
    async def two() -> None:
        await ctx.llm.create_message(messages=MESSAGES, purpose="fast")
        after_first.set()
        await asyncio.sleep(0.05)  # a tool, a fetch: no call in flight
        await ctx.llm.create_message(messages=MESSAGES, purpose="fast")

    background.append(asyncio.create_task(two()))
    await after_first.wait()
    return "done"


@pytest.mark.parametrize("function", ["call_started_late", "stream_started_late", "two_calls_in_a_task"])
async def test_no_call_is_made_for_an_invocation_after_it_ended(function: str) -> None:
    """end_calls ends only the calls in flight at that moment: a task the handler started that had not reached its
    call yet (never run, or between two calls) made it after invoke returned, billed and missing from its event_ids
    (an Idempotency-Key's retry paid for it again). A call of an invocation that has ended is refused, never made."""
    recorder = Recorder()
    after_first.clear()
    rt = Runtime(settings=FAST, platform=PLATFORM, providers=ProviderPool(FakeProvider), recorder=recorder)
    result = await asyncio.wait_for(rt.invoke(fan_out, function, {}, User("user-1", "tenant-1")), 5)
    [task] = background
    background.clear()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 5)
    assert sorted(result.event_ids) == sorted(str(e.event_id) for e in recorder.events)
    assert all(e.status == "ok" for e in recorder.events)
