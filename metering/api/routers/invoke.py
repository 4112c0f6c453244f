"""POST /v1/extensions/{extension_id}/functions/{function}:invoke: run a bundled extension for a user (scope `admin`).

The handler runs through the metered ``ctx.llm`` of the app's runtime: one usage event per provider call goes
to the spool and from there, by the flusher, into the database. The invocation is audited.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from starlette.concurrency import run_in_threadpool

from metering.api.admin_deps import AppRuntime, Audited, ensure_tenant
from metering.api.admin_schemas import InvokeRequest, InvokeResponse
from metering.api.deps import Admin
from metering.api.problems import problem_responses
from metering.errors import NotFoundError
from metering.extensions import BUNDLED, get_extension
from metering.runtime import User

router = APIRouter(tags=["extensions"])


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
        "`invalid_json_response`. Audited as `extension.invoke` (the params are not recorded)."
    ),
    responses=problem_responses(401, 403, 404, 422, 429, 502, 503),
)
async def invoke_function(
    extension_id: Annotated[str, Path(max_length=100, description="e.g. `rewrite`.")],
    function: Annotated[str, Path(max_length=100, description="e.g. `rewrite`, `rewrite_multiple`.")],
    body: InvokeRequest,
    principal: Admin,
    runtime: AppRuntime,
    audit: Audited,
) -> InvokeResponse:
    ensure_tenant(principal, body.tenant_id, f"user {body.user_id!r}")
    extension = get_extension(extension_id)
    if extension is None:
        raise NotFoundError(f"no extension {extension_id!r}; bundled: {', '.join(sorted(BUNDLED))}")
    if function not in extension.functions:
        raise NotFoundError(
            f"extension {extension_id!r} has no function {function!r}; it has: {', '.join(sorted(extension.functions))}"
        )
    engine = await run_in_threadpool(runtime.get)
    result = await engine.invoke(extension, function, body.params, User(body.user_id, body.tenant_id))
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
    await run_in_threadpool(
        audit.record,
        "extension.invoke",
        f"extension:{extension.id}.{function}",
        before=None,
        after=after,
        tenant_id=body.tenant_id,
    )
    return out
