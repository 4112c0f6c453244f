"""Commands that run extensions through the metered ``ctx.llm``."""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Annotated, Any

import typer
from rich.markup import escape

from metering.cli.common import console, fail, print_json, run_async, services, usage_table
from metering.db.event_store import events_for_invocations
from metering.extensions import BUNDLED, get_extension
from metering.runtime import InvocationResult, User
from metering.runtime.invoke import InvocationCalls, invocation_calls
from metering.wiring import Services

UserOpt = Annotated[str, typer.Option("--user", "-u", help="User id the call runs as.")]
TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="Tenant of the user.")]


def invoke_and_report(svc: Services, extension_id: str, function: str, params: dict[str, Any], user: User) -> None:
    extension = get_extension(extension_id)
    if extension is None:
        raise fail(f"unknown extension {extension_id!r}; bundled: {', '.join(sorted(BUNDLED))}")
    try:
        result: InvocationResult = run_async(lambda: svc.runtime.invoke(extension, function, params, user))
    except BaseException as exc:  # a MeteringError, a bug in the handler, a Ctrl-C: calls made before it were made
        calls = _calls_of(exc)
        if calls is not None:  # it failed after metered calls (a budget, a provider, a reply): they may be billed
            title = f"Metered usage of failed invocation {calls.invocation_id} (calls that used the provider: billed)"
            with contextlib.suppress(Exception):  # the invocation's own error is the one to report, below
                report_usage(svc, calls.invocation_id, title)
        raise  # then the error line (a MeteringError), or the traceback of any other error: a non-zero exit either way
    print_json(result.result)
    report_usage(svc, result.invocation_id, f"Recorded usage of invocation {result.invocation_id}")


def _calls_of(exc: BaseException) -> InvocationCalls | None:
    """The metered calls of the invocation ``exc`` ended. A Ctrl-C ends ``asyncio.run`` with a new KeyboardInterrupt,
    raised while handling the invocation's cancellation: that cancellation holds them."""
    calls = invocation_calls(exc)
    if calls is None and isinstance(exc, KeyboardInterrupt) and exc.__context__ is not None:
        calls = invocation_calls(exc.__context__)
    return calls


def report_usage(svc: Services, invocation_id: uuid.UUID, title: str) -> None:
    """Deliver the spool, then show the invocation's events (or where they went, or that they stay spooled)."""
    if not svc.flusher.flush(timeout=30.0):
        svc.drain_on_close = False  # the sink is down: the events stay spooled, a second wait at exit would not help
        # Why, as the flusher last heard it: "the sink is unreachable" was said of a sink that answered, refusing the
        # events until the operator fixes something (a token bound to another tenant, a clock behind).
        why = svc.flusher.stats.last_error or "the sink has not taken it yet"
        console.print(
            f"[yellow]usage is spooled but not delivered yet ({escape(why)}); it stays on disk for the next run or "
            "`metering spool drain`[/]",
            markup=True,
        )
        return
    if svc.settings.spool.sink == "http":  # delivered to another service's database, not the local one
        console.print(f"usage of invocation {invocation_id} delivered to {svc.settings.spool.http_url}")
        return
    with svc.sessions() as session:
        rows = events_for_invocations(session, [invocation_id])
    console.print(usage_table(rows, title=title))


def rewrite(
    text: Annotated[str, typer.Argument(help="The text to rewrite.")],
    tone: Annotated[str, typer.Option(help="formal | casual | concise | friendly | apologetic")] = "casual",
    keep_meaning: Annotated[bool, typer.Option(help="Preserve all factual content.")] = True,
    user: UserOpt = "demo-user",
    tenant: TenantOpt = "demo-tenant",
) -> None:
    """Rewrite TEXT in a tone with the bundled rewrite extension, and show the recorded usage."""
    with services() as svc:
        params = {"text": text, "tone": tone, "keep_meaning": keep_meaning}
        invoke_and_report(svc, "rewrite", "rewrite", params, User(id=user, tenant_id=tenant))


def invoke(
    extension: Annotated[str, typer.Argument(help="Extension id, e.g. rewrite.")],
    function: Annotated[str, typer.Argument(help="Function name, e.g. extract_action_items.")],
    params: Annotated[str, typer.Option("--params", "-p", help="Parameters as a JSON object.")] = "{}",
    user: UserOpt = "demo-user",
    tenant: TenantOpt = "demo-tenant",
) -> None:
    """Invoke any function of a bundled extension with JSON params."""
    try:
        parsed = json.loads(params)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested thousands of levels deep
        raise fail(f"--params is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise fail("--params must be a JSON object")
    with services() as svc:
        invoke_and_report(svc, extension, function, parsed, User(id=user, tenant_id=tenant))
