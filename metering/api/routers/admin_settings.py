"""Admin LLM settings: per-purpose settings, a user's BYOLLM settings, extension call budgets (scope `admin`).

Every change is audited in its own transaction. The BYOLLM api key is write-only: stored encrypted with the
SecretBox, answered only as ``has_api_key`` and a mask, and recorded in the audit log as ``***``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from sqlalchemy.orm import Session

from metering import audit_snapshots as snap
from metering.api.admin_deps import Audited, Box, PlatformAdmin, ensure_tenant
from metering.api.admin_schemas import BudgetIn, BudgetOut, ByollmIn, ByollmOut, PurposeIn, PurposeOut
from metering.api.deps import Admin, DbSession
from metering.api.problems import problem_responses
from metering.db.models import ByollmSettingsRow
from metering.errors import NotFoundError
from metering.events import MAX_NAME
from metering.llm import settings_admin
from metering.llm import settings_store as store

router = APIRouter(prefix="/admin", tags=["admin"])

PurposeName = Annotated[str, Path(min_length=1, max_length=MAX_NAME, description="e.g. `content_rewrite`.")]
TenantId = Annotated[str, Path(min_length=1, max_length=MAX_NAME)]
UserId = Annotated[str, Path(min_length=1, max_length=MAX_NAME)]
ExtensionId = Annotated[str, Path(min_length=1, max_length=MAX_NAME, description="e.g. `rewrite`.")]

PLATFORM_ERRORS = problem_responses(401, 403, 422, 503)
PLATFORM_ERRORS_404 = problem_responses(401, 403, 404, 422, 503)
PLATFORM_ERRORS_409 = problem_responses(401, 403, 409, 422, 503)  # a PUT creating a row a concurrent one created
USER_ERRORS = problem_responses(401, 403, 404, 422, 503)


# -- per-purpose settings ---------------------------------------------------------------------------


@router.get(
    "/purposes",
    summary="List per-purpose LLM settings",
    description="Requires the `admin` scope and a token not bound to a tenant (platform-wide settings).",
    responses=PLATFORM_ERRORS,
)
def list_purposes(principal: PlatformAdmin, session: DbSession) -> list[PurposeOut]:
    return [PurposeOut.of(row) for row in store.list_purposes(session)]


@router.get(
    "/purposes/{purpose}",
    summary="Get one purpose's LLM settings",
    description="Requires `admin`, unbound. 404 when the purpose has no settings (it then uses the platform default).",
    responses=PLATFORM_ERRORS_404,
)
def get_purpose(purpose: PurposeName, principal: PlatformAdmin, session: DbSession) -> PurposeOut:
    row = settings_admin.get_purpose_row(session, purpose)
    if row is None:
        raise NotFoundError(f"no settings for purpose {purpose!r}")
    return PurposeOut.of(row)


@router.put(
    "/purposes/{purpose}",
    summary="Set (or replace) one purpose's LLM settings",
    description=(
        "Requires `admin`, unbound. The platform LLM used for calls of this purpose when the user has no BYOLLM. "
        "Audited as `purpose.set`. 409 `conflict` when a concurrent request created the purpose meanwhile: retry."
    ),
    responses=PLATFORM_ERRORS_409,
)
def put_purpose(
    purpose: PurposeName, body: PurposeIn, principal: PlatformAdmin, session: DbSession, audit: Audited
) -> PurposeOut:
    before = snap.purpose_snapshot(settings_admin.get_purpose_row(session, purpose, for_update=True))
    row = store.put_purpose(
        session, purpose=purpose, provider=body.provider, model=body.model, base_url=body.base_url, params=body.params
    )
    audit.record("purpose.set", snap.purpose_target(purpose), before=before, after=snap.purpose_snapshot(row))
    audit.settings_changed()
    return PurposeOut.of(row)


@router.delete(
    "/purposes/{purpose}",
    status_code=204,
    summary="Delete one purpose's LLM settings",
    description="Requires `admin`, unbound. The purpose then uses the platform default. Audited as `purpose.delete`.",
    responses=PLATFORM_ERRORS_404,
)
def delete_purpose(purpose: PurposeName, principal: PlatformAdmin, session: DbSession, audit: Audited) -> Response:
    before = snap.purpose_snapshot(settings_admin.get_purpose_row(session, purpose, for_update=True))
    if before is None or not store.delete_purpose(session, purpose):
        raise NotFoundError(f"no settings for purpose {purpose!r}")
    audit.record("purpose.delete", snap.purpose_target(purpose), before=before, after=None)
    audit.settings_changed()
    return Response(status_code=204)


# -- BYOLLM ---------------------------------------------------------------------------------------------


def _byollm_out(row: ByollmSettingsRow, mask: str | None) -> ByollmOut:
    return ByollmOut(**store.byollm_view(row, mask), created_at=row.created_at, updated_at=row.updated_at)


def _users_row(session: Session, tenant_id: str, user_id: str, *, for_update: bool = False) -> ByollmSettingsRow | None:
    row = store.get_byollm_row(session, user_id, for_update=for_update)
    return row if row is not None and row.tenant_id == tenant_id else None


@router.get(
    "/users/{tenant_id}/{user_id}/byollm",
    summary="Get a user's BYOLLM settings (the api key masked)",
    description=(
        "Requires `admin`. A tenant-bound token sees only its tenant's users (404 for others). The api key is "
        "never returned: `has_api_key` and `api_key_mask` (e.g. `sk-…wxyz`) say whether one is stored."
    ),
    responses=USER_ERRORS,
)
def get_byollm(tenant_id: TenantId, user_id: UserId, principal: Admin, session: DbSession, box: Box) -> ByollmOut:
    ensure_tenant(principal, tenant_id, f"user {user_id!r}")
    row = _users_row(session, tenant_id, user_id)
    if row is None:
        raise NotFoundError(f"user {user_id!r} of tenant {tenant_id!r} has no BYOLLM settings")
    return _byollm_out(row, store.stored_key_mask(row, box))


@router.put(
    "/users/{tenant_id}/{user_id}/byollm",
    summary="Set (or replace) a user's BYOLLM settings",
    description=(
        "Requires `admin`; a tenant-bound token only for its tenant's users (404 for others). `api_key` is "
        "write-only: encrypted at rest, never in a response, a log or the audit log. Omit it to keep the stored "
        "key (same provider and base_url: a new base_url, or a stored key the configured keys cannot decrypt, "
        "needs the key again, 422), send `null` to remove it. 409 `conflict` when the user id is configured under "
        "another tenant. Audited as `byollm.set`."
    ),
    responses=problem_responses(401, 403, 404, 409, 422, 503),
)
def put_byollm(
    tenant_id: TenantId,
    user_id: UserId,
    body: ByollmIn,
    principal: Admin,
    session: DbSession,
    box: Box,
    audit: Audited,
) -> ByollmOut:
    ensure_tenant(principal, tenant_id, f"user {user_id!r}")
    existing = store.byollm_row_to_replace(session, user_id, tenant_id)
    before = snap.byollm_snapshot(existing)
    old_key = store.stored_key(existing, box)
    old_ciphertext = existing.api_key_ciphertext if existing is not None else None
    if "api_key" in body.model_fields_set:
        api_key = body.api_key.get_secret_value() if body.api_key is not None else None
    else:
        api_key = store.kept_key(existing, box, provider=body.provider, base_url=body.base_url)
    row = store.put_byollm(
        session,
        box,
        user_id=user_id,
        tenant_id=tenant_id,
        provider=body.provider,
        model=body.model,
        api_key=api_key,
        base_url=body.base_url,
        fallback_policy=body.fallback_policy,
    )
    target = snap.user_target(tenant_id, user_id)
    after = snap.byollm_snapshot(row)
    # the key is "***" before and after: a new one is told by its ciphertext (put_byollm keeps it for the same key)
    key_changed = row.api_key_ciphertext != old_ciphertext
    audit.record("byollm.set", target, before=before, after=after, tenant_id=tenant_id, secret_changed=key_changed)
    audit.settings_changed()
    audit.key_replaced(old_key)  # even when kept: its adapter may hold another base_url (one call remakes it)
    return _byollm_out(row, store.mask_key(api_key))


@router.delete(
    "/users/{tenant_id}/{user_id}/byollm",
    status_code=204,
    summary="Delete a user's BYOLLM settings",
    description=(
        "Requires `admin`; a tenant-bound token only for its tenant's users. The user's calls then use the "
        "platform LLM. Audited as `byollm.delete`."
    ),
    responses=USER_ERRORS,
)
def delete_byollm(
    tenant_id: TenantId, user_id: UserId, principal: Admin, session: DbSession, box: Box, audit: Audited
) -> Response:
    ensure_tenant(principal, tenant_id, f"user {user_id!r}")
    row = _users_row(session, tenant_id, user_id, for_update=True)
    missing = NotFoundError(f"user {user_id!r} of tenant {tenant_id!r} has no BYOLLM settings")
    if row is None:
        raise missing
    before = snap.byollm_snapshot(row)
    old_key = store.stored_key(row, box)
    if not store.delete_byollm(session, user_id):  # deleted by a concurrent request meanwhile
        raise missing
    audit.record("byollm.delete", snap.user_target(tenant_id, user_id), before=before, after=None, tenant_id=tenant_id)
    audit.settings_changed()
    audit.key_replaced(old_key)
    return Response(status_code=204)


# -- call budgets ---------------------------------------------------------------------------------------


@router.get(
    "/budgets",
    summary="List extension call budgets",
    description="Requires `admin`, unbound.",
    responses=PLATFORM_ERRORS,
)
def list_budgets(principal: PlatformAdmin, session: DbSession) -> list[BudgetOut]:
    return [BudgetOut.of(row) for row in settings_admin.list_budgets(session)]


@router.get(
    "/budgets/{extension_id}",
    summary="Get an extension's call budget",
    description="Requires `admin`, unbound. 404 when the extension has no budget.",
    responses=PLATFORM_ERRORS_404,
)
def get_budget(extension_id: ExtensionId, principal: PlatformAdmin, session: DbSession) -> BudgetOut:
    row = settings_admin.get_budget_row(session, extension_id)
    if row is None:
        raise NotFoundError(f"extension {extension_id!r} has no call budget")
    return BudgetOut.of(row)


@router.put(
    "/budgets/{extension_id}",
    summary="Set (or replace) an extension's call budget",
    description=(
        "Requires `admin`, unbound. Limits per handler invocation: `max_calls`, `max_tokens` or both. Mode "
        "`report` flags the event that went over; `enforce` refuses the call before it is made. Audited as "
        "`budget.set`. 409 `conflict` when a concurrent request created the budget meanwhile: retry."
    ),
    responses=PLATFORM_ERRORS_409,
)
def put_budget(
    extension_id: ExtensionId, body: BudgetIn, principal: PlatformAdmin, session: DbSession, audit: Audited
) -> BudgetOut:
    before = snap.budget_snapshot(settings_admin.get_budget_row(session, extension_id, for_update=True))
    row = store.put_budget(
        session, extension_id=extension_id, max_calls=body.max_calls, max_tokens=body.max_tokens, mode=body.mode
    )
    audit.record("budget.set", snap.budget_target(extension_id), before=before, after=snap.budget_snapshot(row))
    audit.settings_changed()
    return BudgetOut.of(row)


@router.delete(
    "/budgets/{extension_id}",
    status_code=204,
    summary="Delete an extension's call budget",
    description="Requires `admin`, unbound. Audited as `budget.delete`.",
    responses=PLATFORM_ERRORS_404,
)
def delete_budget(extension_id: ExtensionId, principal: PlatformAdmin, session: DbSession, audit: Audited) -> Response:
    before = snap.budget_snapshot(settings_admin.get_budget_row(session, extension_id, for_update=True))
    if before is None or not settings_admin.delete_budget(session, extension_id):
        raise NotFoundError(f"extension {extension_id!r} has no call budget")
    audit.record("budget.delete", snap.budget_target(extension_id), before=before, after=None)
    audit.settings_changed()
    return Response(status_code=204)
