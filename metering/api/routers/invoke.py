"""POST /v1/extensions/{extension_id}/functions/{function}:invoke: run a bundled extension for a user (scope `admin`).

The handler runs through the metered ``ctx.llm`` of the app's runtime: one usage event per provider call goes
to the spool and from there, by the flusher, into the database. The invocation is audited.

With an ``Idempotency-Key`` header a retry does not run (and pay for) the invocation again: the key is claimed
before the handler runs and its outcome stored with the audit entry (``metering.db.invoke_requests``).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from metering.api.admin_deps import IDEMPOTENCY_KEY, REPLAYED, AppRuntime, Audited, Auditor, ensure_tenant
from metering.api.admin_schemas import InvokeRequest, InvokeResponse
from metering.api.deps import Admin
from metering.api.problems import PROBLEM_MEDIA_TYPE, error_body, problem_body, problem_responses
from metering.db import invoke_requests
from metering.db.invoke_requests import StoredResponse
from metering.errors import InvalidInputError, MeteringError, NotFoundError
from metering.events import utcnow
from metering.extensions import BUNDLED, get_extension
from metering.runtime import User
from metering.runtime.invoke import invocation_calls

router = APIRouter(tags=["extensions"])
log = logging.getLogger("metering.api")

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_KEY,
        min_length=1,
        max_length=200,
        description=(
            "Optional (1 to 200 characters; a UUID is a good choice), per tenant, kept 24 h. A retry with the same "
            "key answers the first outcome (`Idempotent-Replayed: true`) and runs nothing; the same key for another "
            "invocation is 409 `idempotency_conflict`; while the first is still running, 409 "
            "`idempotency_in_progress`."
        ),
    ),
]


def _claim(request: Request, tenant_id: str, key: str, sha256: str, now: datetime) -> StoredResponse | None:
    # Its own transaction, committed before the handler runs: a concurrent retry must see the claim.
    with request.app.state.sessions() as session:
        stored = invoke_requests.claim(session, tenant_id=tenant_id, key=key, sha256=sha256, now=now)
        session.commit()
    return stored


def _failure_outcome(request: Request, exc: Exception) -> tuple[int, dict[str, Any]] | None:
    """The response to keep for an invocation that failed after calls that used the provider (a retry would pay
    for them again), or None when it made none (running it again costs nothing twice)."""
    calls = invocation_calls(exc)
    if calls is None or not calls.used_event_ids:
        return None
    if isinstance(exc, MeteringError):
        return exc.status, error_body(exc, instance=request.url.path)
    log.error("invoke %s failed after metered calls", request.url.path, exc_info=exc)
    body = problem_body(500, "internal_error", "an unexpected error occurred", instance=request.url.path)
    return 500, body | {"invocation_id": str(calls.invocation_id), "event_ids": calls.event_ids}


def _settle_failure(
    request: Request, tenant_id: str, key: str, claimed_at: datetime, exc: Exception
) -> JSONResponse | None:
    """Store the failure's response (and answer it) or free the key (None: the error is raised as usual). Best
    effort: when the database fails here too, the invocation's own error is what the client gets."""
    outcome = _failure_outcome(request, exc)
    try:
        with request.app.state.sessions() as session:
            if outcome is None:
                invoke_requests.release(session, tenant_id=tenant_id, key=key, claimed_at=claimed_at)
            else:
                invoke_requests.complete(
                    session,
                    tenant_id=tenant_id,
                    key=key,
                    claimed_at=claimed_at,
                    status=outcome[0],
                    body=outcome[1],
                    now=utcnow(),
                )
            session.commit()
    except Exception:  # the database may be what failed
        log.warning("could not settle idempotency key %r of tenant %r", key, tenant_id, exc_info=True)
    if outcome is None:
        return None
    status, body = outcome
    return JSONResponse(body, status_code=status, headers={REPLAYED: "false"}, media_type=PROBLEM_MEDIA_TYPE)


def _replay(stored: StoredResponse) -> JSONResponse:
    media_type = PROBLEM_MEDIA_TYPE if stored.status >= 400 else "application/json"
    return JSONResponse(stored.body, status_code=stored.status, headers={REPLAYED: "true"}, media_type=media_type)


@router.post(
    "/extensions/{extension_id}/functions/{function}:invoke",
    summary="Invoke an extension function for a user",
    description=(
        "Requires the `admin` scope; a tenant-bound token only for its tenant's users (404 for others). Runs the "
        "bundled extension's handler with `params` (validated against the function's own schema: 422 "
        "`invalid_input` when they do not match) as `user_id` of `tenant_id`, through the metered `ctx.llm` (the "
        "user's BYOLLM settings, else the purpose's, else the platform default; the simulated provider when no "
        "provider key is configured). Returns the handler's result and the usage event ids (delivered to the "
        f"database asynchronously, by the spool's flusher). Extensions: {', '.join(sorted(BUNDLED))}. "
        "Errors of the call itself: 429 `budget_exceeded` (an enforced call budget), 502 `provider_error`, "
        "`invalid_json_response`; when the invocation had already made metered calls, the problem also carries "
        "their `invocation_id` and `event_ids` (those that used the provider are billed). With an "
        "`Idempotency-Key`, a retry answers the first outcome (a success, or an error after calls that used the "
        "provider) without running anything; the key of an invocation that failed before any such call is free "
        "again. Audited as `extension.invoke` (the params are not recorded)."
    ),
    response_model=InvokeResponse,
    responses={
        200: {"description": "The handler's result (or, with `Idempotent-Replayed: true`, the first one's)."},
        **problem_responses(401, 403, 404, 409, 422, 429, 502, 503),
    },
)
async def invoke_function(
    extension_id: Annotated[str, Path(max_length=100, description="e.g. `rewrite`.")],
    function: Annotated[str, Path(max_length=100, description="e.g. `rewrite`, `rewrite_multiple`.")],
    body: InvokeRequest,
    request: Request,
    response: Response,
    principal: Admin,
    runtime: AppRuntime,
    audit: Audited,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    ensure_tenant(principal, body.tenant_id, f"user {body.user_id!r}")
    extension = get_extension(extension_id)
    if extension is None:
        raise NotFoundError(f"no extension {extension_id!r}; bundled: {', '.join(sorted(BUNDLED))}")
    if function not in extension.functions:
        raise NotFoundError(
            f"extension {extension_id!r} has no function {function!r}; it has: {', '.join(sorted(extension.functions))}"
        )
    key = None if idempotency_key is None else idempotency_key.strip()
    if key == "":
        raise InvalidInputError(f"the {IDEMPOTENCY_KEY} header is blank")
    claimed_at = utcnow()
    if key is not None:
        sha256 = invoke_requests.request_sha256(extension.id, function, body.user_id, body.params)
        stored = await run_in_threadpool(_claim, request, body.tenant_id, key, sha256, claimed_at)
        if stored is not None:
            return _replay(stored)
    try:
        engine = await run_in_threadpool(runtime.get)
        result = await engine.invoke(extension, function, body.params, User(body.user_id, body.tenant_id))
    except Exception as exc:  # not a cancellation: its claim is taken over after TAKEOVER_AFTER
        if key is not None:
            stored = await run_in_threadpool(_settle_failure, request, body.tenant_id, key, claimed_at, exc)
            if stored is not None:
                return stored
        raise
    out = InvokeResponse(
        extension_id=extension.id,
        function=function,
        invocation_id=result.invocation_id,
        result=result.result,
        provider=result.provider,
        model=result.model,
        is_byollm=result.is_byollm,
        event_ids=result.event_ids,
    )
    after = out.model_dump(mode="json", include={"invocation_id", "provider", "model", "is_byollm", "event_ids"})
    after["user_id"] = body.user_id
    if key is not None:
        after["idempotency_key"] = key
        response.headers[REPLAYED] = "false"
    await run_in_threadpool(_record, audit, body.tenant_id, extension.id, function, after, key, claimed_at, out)
    return out


def _record(
    audit: Auditor,
    tenant_id: str,
    extension_id: str,
    function: str,
    after: dict[str, Any],
    key: str | None,
    claimed_at: datetime,
    out: InvokeResponse,
) -> None:
    """The audit entry and the key's outcome, in the request's transaction: both commit, or neither."""
    audit.record(
        "extension.invoke", f"extension:{extension_id}.{function}", before=None, after=after, tenant_id=tenant_id
    )
    if key is not None:
        invoke_requests.complete(
            audit.session,
            tenant_id=tenant_id,
            key=key,
            claimed_at=claimed_at,
            status=200,
            body=out.model_dump(mode="json"),
            now=utcnow(),
        )
