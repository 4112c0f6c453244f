"""``ctx.llm.stream_message``: a stream of text chunks that records one event per provider call.

A stream consumed to the end records ``ok``; one abandoned by its consumer (``break``, ``aclose()``,
leaving ``async with``, garbage collection, task cancellation, the runtime ending the invocation)
records ``cancelled``; one broken by the
provider records ``error`` with ``error_type="stream_broken"``. Usage the provider did not report is
estimated from what was sent and received, and marked ``estimated``; an unfinished stream keeps what the provider
reported before it ended (Anthropic's input and cache counts, given at the start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from metering.errors import ProviderError
from metering.events import Status
from metering.llm.attempt import Attempt
from metering.llm.event_record import prompt_fingerprint
from metering.llm.providers.output_limit import lower_limit
from metering.llm.responses import LLMResponse
from metering.llm.text import ChunkCleaner
from metering.llm.types import (
    MISSING_USAGE,
    NO_USAGE_SO_FAR,
    ReasoningDelta,
    RefusalDelta,
    StreamEnd,
    TextDelta,
    TokenUsage,
    UsageSoFar,
)
from metering.llm.usage import finished, unfinished

if TYPE_CHECKING:
    from metering.llm.client import MeteredLLM

log = logging.getLogger("metering.llm")


def note_unrecorded(leaving: BaseException, error: Exception) -> None:
    """The event of a call being left (cancelled, or a stream's consumer leaving with an error) could not be recorded
    (the spool refused it): logged and noted on the exception that is leaving, which stays the one raised. A
    cancellation replaced by the SpoolError was no cancellation any more (``asyncio.timeout`` raised the SpoolError,
    a task cancelled ended in an error)."""
    log.error("could not record the usage event of a call being left (%s): %s", type(leaving).__name__, error)
    leaving.add_note(f"its usage event was not recorded: {type(error).__name__}: {error}")


class MessageStream:
    def __init__(
        self,
        llm: MeteredLLM,
        *,
        system: str | None,
        messages: list[dict[str, Any]],
        max_tokens: int,
        purpose: str,
        temperature: float | None,
        params: dict[str, Any],
    ) -> None:
        self._llm = llm
        self._system = system
        self._messages = messages
        self._max_tokens = max_tokens
        self._purpose = purpose
        self._temperature = temperature
        self._params = params
        # Outside `async with`, only a weak reference: a consumer that breaks out of the loop drops the
        # generator, whose finaliser records `cancelled` at once. Inside, `__aexit__` closes it.
        self._gen_ref: weakref.ref[AsyncIterator[str]] | None = None
        self._gen_held: AsyncIterator[str] | None = None
        self._entered = False
        self._ended: asyncio.Event | None = None  # set once the stream ended, recorded or not (see _run)
        self._reader: asyncio.Task[Any] | None = None  # the task that last resumed the generator (see close_unfinished)
        self.response: LLMResponse | None = None

    @property
    def text(self) -> str | None:
        return self.response.text if self.response else None

    @property
    def usage(self) -> TokenUsage | None:
        return self.response.usage if self.response else None

    def __aiter__(self) -> AsyncIterator[str]:
        if self._gen_ref is not None:
            raise RuntimeError("a MessageStream can be iterated only once")
        gen = self._run()
        self._gen_ref = weakref.ref(gen)
        if self._entered:
            self._gen_held = gen
        return gen

    async def aclose(self) -> None:
        gen = self._gen_ref() if self._gen_ref is not None else None
        self._gen_held = None
        if gen is not None:
            await gen.aclose()  # type: ignore[attr-defined]

    async def close_unfinished(self) -> None:
        """End a stream that is still open, recording its event (``cancelled``) if it has not been recorded.

        Outside ``async with``, a stream the consumer left is recorded once its generator is collected, by a task
        asyncio's finaliser starts: this waits for it. A stream another task is waiting on (the rest of an
        ``asyncio.gather`` that failed, a task never awaited) is ended as a call in flight: that task is cancelled.
        """
        if self._ended is None or self._ended.is_set():
            return
        if self._gen_ref is not None and self._gen_ref() is None:  # collected: its aclose() task is on its way
            await self._ended.wait()
            return
        try:
            await self.aclose()
        except RuntimeError:  # "already running": another task is waiting for its next chunk
            reader = self._reader
            if reader is None or reader is asyncio.current_task() or reader.done():  # pragma: no cover - defensive
                self._llm._streams.discard(self)
                return
            reader.cancel()  # its wait ends in CancelledError: the stream records `cancelled`
            await self._ended.wait()

    async def __aenter__(self) -> MessageStream:
        self._entered = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.aclose()
        except Exception as error:
            if exc is None:
                raise
            note_unrecorded(exc, error)  # the body's exception (a cancellation) stays the one raised

    def _record_unfinished(
        self,
        common: Attempt,
        so_far: UsageSoFar,
        parts: list[str],
        ttft: float | None,
        status: Status,
        error_type: str | None,
    ) -> None:
        """The event of a stream that did not end normally: the usage reported so far, the rest estimated (``parts``:
        the text received, the reasoning the consumer was not handed included)."""
        text = "".join(parts)
        usage = unfinished(so_far.usage, self._system, self._messages, text, output_final=so_far.output_final)
        self._llm._record(common, usage=usage, stop_reason=None, status=status, error_type=error_type, ttft_ms=ttft)

    async def _run(self) -> AsyncIterator[str]:
        llm = self._llm
        llm._check_open()  # an invocation that has ended makes no more calls (see MeteredLLM.end_calls)
        system, messages, purpose = self._system, self._messages, self._purpose
        ended = self._ended = asyncio.Event()
        self._reader = asyncio.current_task()
        llm._streams.add(self)  # until it ended: the runtime closes it if the handler left it open
        try:
            plan = llm._plan(purpose)
            fingerprint = prompt_fingerprint(system, messages)
            targets = (plan.primary,) if plan.fallback is None else (plan.primary, plan.fallback)
            # A stream whose max_tokens the model refuses, stating its limit, is made once more at that limit, on the
            # same LLM, before any failover, like a create_message call (see MeteredLLM.create_message).
            tries = [(attempt, target, self._max_tokens) for attempt, target in enumerate(targets)]
            for position, (attempt, target, call_max_tokens) in enumerate(tries):
                request = llm._request(target, system, messages, call_max_tokens, self._temperature, None, self._params)
                pooled = llm._adapter(target)
                upstream = pooled.provider.stream(request)
                # Reserved last, with nothing between it and the call that could fail: `_record` settles it.
                reserved = llm._reserve(system, messages, call_max_tokens, attempt)
                started = time.perf_counter()
                common = Attempt(
                    target, attempt, purpose, datetime.now(UTC), started, call_max_tokens, fingerprint, True, reserved
                )
                parts: list[str] = []
                # reasoning (and refusal) text, not handed on: output the estimates count (ReasoningDelta, RefusalDelta)
                reasoning: list[str] = []
                ttft: float | None = None
                end: StreamEnd | None = None
                so_far = NO_USAGE_SO_FAR  # usage the provider reported before the end
                cleaner = ChunkCleaner()  # no lone surrogate reaches the consumer (it could not be encoded)
                pooled.in_use += 1  # the pool closes a retired adapter only once no call uses it (released below)
                try:
                    async for item in upstream:
                        if isinstance(item, TextDelta):
                            if ttft is None:
                                ttft = round((time.perf_counter() - common.started) * 1000.0, 3)
                            chunk = cleaner.feed(item.text)
                            if not chunk:  # only half a surrogate pair, held for the next chunk: nothing to hand on
                                continue
                            parts.append(chunk)
                            yield chunk
                            self._reader = asyncio.current_task()  # a stream may be read by another task each time
                        elif isinstance(item, UsageSoFar):
                            so_far = item
                        elif isinstance(item, (ReasoningDelta, RefusalDelta)):  # output not handed on
                            reasoning.append(item.text)
                        else:
                            end = item
                    if tail := cleaner.flush():
                        parts.append(tail)
                        yield tail
                except ProviderError as exc:
                    self._record_unfinished(common, so_far, parts + reasoning, ttft, Status.ERROR, exc.error_type)
                    llm._served_by(target)
                    retry = not parts and call_max_tokens == self._max_tokens
                    if retry and (limit := lower_limit(exc, call_max_tokens)) is not None:
                        tries.insert(position + 1, (attempt, target, limit))  # a call of its own, with its own event
                        continue
                    if not parts and attempt < len(targets) - 1:
                        continue
                    raise
                except (GeneratorExit, asyncio.CancelledError) as leaving:
                    refused: Exception | None = None
                    try:
                        self._record_unfinished(common, so_far, parts + reasoning, ttft, Status.CANCELLED, None)
                    except Exception as error:
                        if isinstance(leaving, GeneratorExit):
                            refused = error  # aclose() raises it, once upstream is closed
                        else:
                            note_unrecorded(leaving, error)
                    await _close_quietly(upstream)
                    if refused is not None:
                        raise refused from None
                    raise
                except Exception as exc:
                    error_type = f"internal:{type(exc).__name__}"[:100]
                    try:
                        self._record_unfinished(common, so_far, parts + reasoning, ttft, Status.ERROR, error_type)
                    finally:
                        await _close_quietly(upstream)  # e.g. thrown in at a yield: upstream is still open
                    raise
                finally:  # upstream has ended, or was closed: its adapter is no longer used by this stream
                    llm._providers.release(pooled)
                text = "".join(parts)
                output = text + "".join(reasoning) if reasoning else text  # what the estimates count
                reported = end.usage if end is not None else MISSING_USAGE
                usage = finished(reported, so_far.usage, system, messages, output, output_final=so_far.output_final)
                stop_reason = end.stop_reason if end is not None else None
                event_id = llm._record(
                    common,
                    usage=usage,
                    stop_reason=stop_reason,
                    status=Status.OK,
                    error_type=None,
                    ttft_ms=ttft,
                )
                llm._served_by(target)
                self.response = LLMResponse(
                    text=text,
                    provider=target.config.provider,
                    model=target.config.model,
                    is_byollm=target.is_byollm,
                    stop_reason=stop_reason,
                    usage=usage,
                    event_id=event_id,
                )
                return
        finally:
            llm._streams.discard(self)
            ended.set()


async def _close_quietly(upstream: AsyncIterator[Any]) -> None:
    aclose = getattr(upstream, "aclose", None)
    if aclose is None:
        return
    with contextlib.suppress(Exception):  # the consumer is leaving; closing upstream is best effort
        await aclose()
