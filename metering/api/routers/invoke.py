"""POST /v1/extensions/{extension_id}/functions/{function}:invoke: run a bundled extension for a user (scope `admin`).

The handler runs through the metered ``ctx.llm`` of the app's runtime: one usage event per provider call goes
to the spool and from there, by the flusher, into the database. The invocation is audited, and so is one that
failed after metered calls (its problem names them: ``invocation_id``, ``event_ids``).

With an ``Idempotency-Key`` header a retry does not run (and pay for) the invocation again: the key is claimed
before the handler runs, for an invocation id chosen then, and its outcome stored with the audit entry
(``metering.db.invoke_requests``).
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from metering.api.admin_deps import IDEMPOTENCY_KEY, REPLAYED, AppRuntime, Audited, Auditor, ensure_tenant
from metering.api.admin_schemas import InvokeRequest, InvokeResponse
from metering.api.deps import Admin
from metering.api.problems import (
    PROBLEM_MEDIA_TYPE,
    database_unavailable,
    error_body,
    is_outage,
    problem_body,
    problem_responses,
)
from metering.db import invoke_requests
from metering.db.invoke_requests import StoredResponse
from metering.errors import InvalidInputError, MeteringError, NotFoundError
from metering.events import utcnow, uuid7
from metering.extensions import BUNDLED, get_extension
from metering.runtime import InvocationResult, User
from metering.runtime.invoke import InvocationCalls, attach_calls, invocation_calls

# An invocation is stopped past this (504 invocation_timeout, its calls named and kept under its key): shorter than
# invoke_requests.UNKNOWN_AFTER, after which a retry takes a claim still running for one whose process died.
INVOKE_DEADLINE = timedelta(minutes=10)
router = APIRouter(tags=["extensions"])
log = logging.getLogger("metering.api")
ACTION = "extension.invoke"

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_KEY,
        min_length=1,
        max_length=200,
        pattern=r"^[\x20-\x7e]+$",
        description=(
            "Optional: 1 to 200 printable ASCII characters (a UUID is a good choice), per tenant, kept 24 h. A retry "
            "with the same key answers the first outcome (`Idempotent-Replayed: true`) and runs nothing. 409 "
            "`idempotency_conflict`: the key of another invocation; `idempotency_in_progress`: the first is still "
            "running; `idempotency_outcome_unknown`: the first never recorded its outcome (it is not run again)."
        ),
    ),
]
_REPLAYED_HEADER = {
    REPLAYED: {
        "description": "With an `Idempotency-Key`: `true` when this is the stored outcome of an earlier request.",
        "schema": {"type": "string", "enum": ["true", "false"]},
    }
}


def _claim(request: Request, tenant_id: str, key: str, sha256: str, invocation_id: uuid.UUID, now: datetime) -> Any:
    # Its own transaction, committed before the handler runs: a concurrent retry must see the claim.
    with request.app.state.sessions() as session:
        stored = invoke_requests.claim(
            session, tenant_id=tenant_id, key=key, sha256=sha256, invocation_id=invocation_id, now=now
        )
        try:
            session.commit()
        except Exception as exc:
            # The connection may have died as COMMIT committed the claim: nothing ran, so free the key (only our own
            # claim), or its retry answered `idempotency_in_progress`, then `idempotency_outcome_unknown`, forever.
            # The failed transaction is let go first: SQLite's (`database is locked` at COMMIT) stays open holding the
            # write lock, which the release, and every other writer, waited on until the busy timeout.
            if is_outage(exc):
                session.rollback()
                _release_claim(request, tenant_id, key, now)
            raise
    return stored


def _release_claim(request: Request, tenant_id: str, key: str, claimed_at: datetime) -> None:
    """Best effort (the database may still be down: then the claim, if it committed, stays)."""
    try:
        with request.app.state.sessions() as session:
            invoke_requests.release(session, tenant_id=tenant_id, key=key, claimed_at=claimed_at)
            session.commit()
    except Exception:
        log.warning("could not release the claim of key %r of tenant %r", key, tenant_id, exc_info=True)


def _replay(stored: StoredResponse) -> JSONResponse:
    media_type = PROBLEM_MEDIA_TYPE if stored.status >= 400 else "application/json"
    return JSONResponse(stored.body, status_code=stored.status, headers={REPLAYED: "true"}, media_type=media_type)


def _failure_problem(request: Request, exc: Exception, calls: InvocationCalls) -> tuple[int, dict[str, Any]]:
    """The problem of an invocation that failed after metered calls, naming them."""
    ids = {"invocation_id": str(calls.invocation_id), "event_ids": calls.event_ids}
    if isinstance(exc, MeteringError):
        return exc.status, error_body(exc, instance=request.url.path) | ids
    if is_outage(exc):
        error = database_unavailable()
        return error.status, error_body(error, instance=request.url.path) | ids
    log.error("%s failed after metered calls", request.url.path, exc_info=exc)
    return 500, problem_body(500, "internal_error", "an unexpected error occurred", instance=request.url.path) | ids


def _settle_failure(
    request: Request,
    audit: Auditor,
    body: InvokeRequest,
    target: str,
    key: str | None,
    claimed_at: datetime,
    calls: InvocationCalls | None,
    problem: tuple[int, dict[str, Any]] | None,
) -> None:
    """Best effort, in its own transaction (the database may be what failed): audit a failure after metered calls;
    keep its outcome under the key when they used the provider (a retry would pay again), else free the key. With a
    key, an outage (its COMMIT failing on a dropped connection or a lock) is tried once more on a fresh connection,
    as ``_record_again`` does for a success: the key stayed `running`, and its retry answered
    `idempotency_in_progress`, then `idempotency_outcome_unknown`, for a failure the first request knew."""

    def attempt(again: bool) -> None:
        """``again``: a first attempt failed, its COMMIT may have gone through: if the claim is no longer running,
        nothing is written (the audit entry not twice)."""
        with request.app.state.sessions() as session:
            if key is not None:
                if calls is not None and calls.used_event_ids and problem is not None:
                    settled = invoke_requests.complete(session, tenant_id=body.tenant_id, key=key,
                                                       claimed_at=claimed_at, status=problem[0], body=problem[1],
                                                       now=utcnow())  # fmt: skip
                else:
                    settled = invoke_requests.release(session, tenant_id=body.tenant_id, key=key,
                                                      claimed_at=claimed_at)  # fmt: skip
                if again and not settled:
                    return
            if calls is not None and problem is not None:
                after = {"invocation_id": str(calls.invocation_id), "event_ids": calls.event_ids,
                         "user_id": body.user_id, "error": problem[1]["code"], "idempotency_key": key}  # fmt: skip
                audit.record(ACTION, target, before=None, after=after, tenant_id=body.tenant_id, session=session)
            session.commit()

    for again in (False, True) if key is not None else (False,):
        try:
            attempt(again)
            return
        except Exception as exc:
            log.warning("could not record the failed invocation (key %r of tenant %r)", key, body.tenant_id,
                        exc_info=True)  # fmt: skip
            if not is_outage(exc):
                return


_INVOKE_503 = (
    "The database is unreachable or locked (`database_unavailable`), or the local spool cannot take a call's usage "
    "event (`spool_error`: its directory unwritable, the disk full, every slot taken)."
)


_INVOKE_504 = (
    f"The invocation ran past its deadline ({INVOKE_DEADLINE.total_seconds() / 60:g} minutes) and was stopped "
    "(`invocation_timeout`); the problem names the calls it made."
)


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
        "`invalid_json_response`; when the invocation had already made metered calls, the problem (whatever its "
        "status) also carries their `invocation_id` and `event_ids` (those that used the provider are billed). "
        "With an `Idempotency-Key`, a retry answers the first outcome (a success, or an error after calls that used "
        "the provider) without running anything; the key of an invocation that failed before any such call is "
        "free again. Audited as `extension.invoke`, also when it failed after metered calls (never the params)."
    ),
    response_model=InvokeResponse,
    responses={
        200: {
            "description": "The handler's result (with `Idempotent-Replayed: true`, the stored first one).",
            "headers": _REPLAYED_HEADER,
        },
        **problem_responses(401, 403, 404, 422, 429, 502, 503, 504, described={503: _INVOKE_503, 504: _INVOKE_504}),
        409: {
            "description": (
                "The `Idempotency-Key` is another invocation's (`idempotency_conflict`), its first request is still "
                "running (`idempotency_in_progress`), or that one never recorded its outcome "
                "(`idempotency_outcome_unknown`)."
            ),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        },
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
    target = f"extension:{extension.id}.{function}"
    claimed_at, invocation_id = utcnow(), uuid7()
    if key is not None:
        sha256 = invoke_requests.request_sha256(extension.id, function, body.user_id, body.params)
        stored = await run_in_threadpool(_claim, request, body.tenant_id, key, sha256, invocation_id, claimed_at)
        if stored is not None:
            return _replay(stored)
    try:
        engine = await run_in_threadpool(runtime.get)
        user = User(body.user_id, body.tenant_id)
        result = await engine.invoke(
            extension, function, body.params, user, invocation_id=invocation_id,
            deadline_s=INVOKE_DEADLINE.total_seconds(),
        )  # fmt: skip
        out, stored = _response(extension.id, function, result)
    except Exception as exc:  # not a cancellation: its claim stays, and answers `idempotency_outcome_unknown` later
        calls = invocation_calls(exc)
        problem = None if calls is None else _failure_problem(request, exc, calls)
        if key is not None or problem is not None:
            await run_in_threadpool(_settle_failure, request, audit, body, target, key, claimed_at, calls, problem)
        if problem is None:
            raise
        headers = None if key is None else {REPLAYED: "false"}
        return JSONResponse(problem[1], status_code=problem[0], headers=headers, media_type=PROBLEM_MEDIA_TYPE)
    after = out.model_dump(mode="json", include={"invocation_id", "provider", "model", "is_byollm", "event_ids"})
    after["user_id"] = body.user_id
    if key is not None:
        after["idempotency_key"] = key
        response.headers[REPLAYED] = "false"
    try:
        await run_in_threadpool(_record, request, audit, body.tenant_id, target, after, key, claimed_at, stored)
    except Exception as exc:  # an outage: the calls were made, say which (a keyed retry then answers outcome unknown)
        if not is_outage(exc):
            raise
        again = key is not None and await run_in_threadpool(
            _record_again, request, audit, body.tenant_id, target, after, key, claimed_at, stored
        )
        if again:
            return out
        calls = InvocationCalls(result.invocation_id, result.event_ids, result.event_ids)
        status, failure = _failure_problem(request, exc, calls)
        log.warning("%s: the audit entry of invocation %s was not written", request.url.path, result.invocation_id)
        headers = None if key is None else {REPLAYED: "false"}
        return JSONResponse(failure, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)
    return out


def _response(extension_id: str, function: str, result: InvocationResult) -> tuple[InvokeResponse, dict[str, Any]]:
    """The response, and its body as a keyed retry replays it. A result JSON cannot carry (an object, bytes that are
    not UTF-8, a lone surrogate) is the handler's bug after its calls: raised with them, so that the invocation fails
    like any other bug after metered calls (a 500 naming them, audited, kept under its key). It failed as the
    response was written: a 500 without the ids, after the outcome was stored (replayed as a 500 again) or not (the
    key `running` for good)."""
    out = InvokeResponse(
        extension_id=extension_id,
        function=function,
        invocation_id=result.invocation_id,
        result=result.result,
        provider=result.provider,
        model=result.model,
        is_byollm=result.is_byollm,
        event_ids=result.event_ids,
    )
    try:
        out.model_dump_json()  # as the response is written: UTF-8, so a lone surrogate fails here too
        return out, out.model_dump(mode="json")
    except Exception as exc:
        error = TypeError(f"the result of {extension_id}.{function} cannot be sent as JSON: {exc}")
        calls = result.calls()
        if calls is not None:
            attach_calls(error, calls)
        raise error from exc


def _record(
    request: Request,
    audit: Auditor,
    tenant_id: str,
    target: str,
    after: dict[str, Any],
    key: str | None,
    claimed_at: datetime,
    stored: dict[str, Any],
    *,
    again: bool = False,
) -> None:
    """The audit entry and the key's outcome, in one transaction committed here: both, or neither. ``again``: a
    first attempt's COMMIT failed and may have gone through: if the claim is no longer running, nothing is written."""
    with request.app.state.sessions() as session:
        if key is not None:
            completed = invoke_requests.complete(
                session, tenant_id=tenant_id, key=key, claimed_at=claimed_at, status=200, body=stored, now=utcnow()
            )
            if again and not completed:
                return
        audit.record(ACTION, target, before=None, after=after, tenant_id=tenant_id, session=session)
        session.commit()


def _record_again(
    request: Request,
    audit: Auditor,
    tenant_id: str,
    target: str,
    after: dict[str, Any],
    key: str,
    claimed_at: datetime,
    stored: dict[str, Any],
) -> bool:
    """Once more on a fresh connection after the outcome's COMMIT failed (a dropped connection, the database up):
    True when the outcome is stored, by this attempt or by that COMMIT after all. Else the key's retry would answer
    `idempotency_in_progress`, then `idempotency_outcome_unknown`, for an invocation that ran and was billed."""
    try:
        _record(request, audit, tenant_id, target, after, key, claimed_at, stored, again=True)
    except Exception:
        log.warning("could not record the outcome of key %r of tenant %r", key, tenant_id, exc_info=True)
        return False
    return True
