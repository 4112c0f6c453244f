"""Running one handler invocation with a metered ``ctx.llm``."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from metering.errors import InvalidInputError, InvocationTimeoutError, MeteringError, NotFoundError
from metering.events import uuid7
from metering.llm.client import EventRecorder, MeteredLLM
from metering.llm.event_record import CallScope
from metering.llm.pool import ProviderPool
from metering.llm.resolution import PlatformLLM
from metering.llm.settings_source import SettingsSource
from metering.runtime.context import Context, User
from metering.runtime.extension import ChatExtension

log = logging.getLogger("metering.runtime")


@dataclass(frozen=True, slots=True)
class InvocationResult:
    result: Any
    invocation_id: uuid.UUID
    event_ids: list[str]
    provider: str | None
    model: str | None
    is_byollm: bool | None
    used_event_ids: list[str] = field(default_factory=list)  # those of calls that used the provider (billed)

    def calls(self) -> InvocationCalls | None:
        """Its calls, for a failure after it returned (None when it made none)."""
        return InvocationCalls(self.invocation_id, self.event_ids, self.used_event_ids) if self.event_ids else None


@dataclass(frozen=True, slots=True)
class InvocationCalls:
    """The metered calls an invocation made before it failed."""

    invocation_id: uuid.UUID
    event_ids: list[str]  # every call's event
    used_event_ids: list[str]  # those of calls that used the provider (see MeteredLLM.used_event_ids)


_CALLS_ATTRIBUTE = "_metering_invocation_calls"


async def _close_streams_after(ctx: Context, failure: BaseException) -> None:
    """End the streams a failed handler left open; an error doing so is logged and noted on the handler's own
    exception, which stays the one raised (a cancellation stays a cancellation)."""
    try:
        await ctx.llm.end_calls()
        await ctx.llm.close_streams()
    except Exception as exc:
        log.error("could not record a stream the failed handler left open: %s", exc)
        failure.add_note(f"while ending the streams the handler left open: {type(exc).__name__}: {exc}")


def attach_calls(exc: BaseException, calls: InvocationCalls) -> None:
    """Note on ``exc`` the metered calls the invocation it ended had made (``invocation_calls`` reads them)."""
    setattr(exc, _CALLS_ATTRIBUTE, calls)
    if isinstance(exc, MeteringError):
        exc.members.update(invocation_id=str(calls.invocation_id), event_ids=calls.event_ids)


def invocation_calls(exc: BaseException) -> InvocationCalls | None:
    """The calls made by the invocation ``exc`` ended, if it had made any."""
    calls: InvocationCalls | None = getattr(exc, _CALLS_ATTRIBUTE, None)
    return calls


def _validation_message(exc: ValidationError) -> str:
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in exc.errors())
    return f"invalid params: {problems}"


class Runtime:
    """Builds a fresh ``ctx.llm`` per invocation over shared settings, providers and spool."""

    def __init__(
        self,
        *,
        settings: SettingsSource,
        platform: PlatformLLM,
        providers: ProviderPool,
        recorder: EventRecorder,
    ) -> None:
        self.settings = settings
        self.platform = platform
        self.providers = providers
        self.recorder = recorder

    def context(
        self, extension: ChatExtension, function: str, user: User, invocation_id: uuid.UUID | None = None
    ) -> Context:
        spec = extension.functions.get(function)
        if spec is None:
            raise NotFoundError(
                f"extension {extension.id!r} has no function {function!r}; "
                f"it has: {', '.join(sorted(extension.functions)) or 'none'}"
            )
        invocation_id = invocation_id or uuid7()
        scope = CallScope(
            tenant_id=user.tenant_id,
            user_id=user.id,
            extension_id=extension.id,
            function=function,
            invocation_id=invocation_id,
            action_type=spec.action_type,
        )
        llm = MeteredLLM(
            scope=scope,
            settings=self.settings,
            platform=self.platform,
            providers=self.providers,
            recorder=self.recorder,
        )
        return Context(user=user, extension_id=extension.id, function=function, invocation_id=invocation_id, llm=llm)

    async def invoke(
        self,
        extension: ChatExtension,
        function: str,
        params: BaseModel | dict[str, Any],
        user: User,
        *,
        invocation_id: uuid.UUID | None = None,
        deadline_s: float | None = None,
    ) -> InvocationResult:
        """Run the handler. ``invocation_id``: one chosen in advance (an idempotency claim records it).
        ``deadline_s``: past it the handler is cancelled (its call in flight recorded as cancelled) and
        ``InvocationTimeoutError`` raised, with the calls it made."""
        ctx = self.context(extension, function, user, invocation_id)
        spec = extension.functions[function]
        try:
            model = params if isinstance(params, spec.params_model) else spec.params_model.model_validate(params)
        except ValidationError as exc:
            raise InvalidInputError(_validation_message(exc)) from None
        try:
            timer = asyncio.timeout(deadline_s)
            try:
                async with timer:
                    result = await spec.handler(ctx, model)
            except BaseException as failure:
                await _close_streams_after(ctx, failure)
                if timer.expired():
                    raise InvocationTimeoutError(
                        f"{extension.id}.{function} ran past its deadline of {deadline_s:g} s and was stopped"
                    ) from failure
                raise
            # Calls and streams the handler left unfinished are ended and recorded now, not after it returned.
            await ctx.llm.end_calls()
            await ctx.llm.close_streams()
        except BaseException as exc:
            if ctx.llm.event_ids:  # metered calls were made (those that used the provider are billed): say which
                attach_calls(
                    exc, InvocationCalls(ctx.invocation_id, list(ctx.llm.event_ids), list(ctx.llm.used_event_ids))
                )
            raise
        return InvocationResult(
            result=result,
            invocation_id=ctx.invocation_id,
            event_ids=list(ctx.llm.event_ids),
            provider=ctx.llm.provider,
            model=ctx.llm.model,
            is_byollm=ctx.llm.all_byollm,  # every call the user's own LLM: none billed to the user
            used_event_ids=list(ctx.llm.used_event_ids),
        )
