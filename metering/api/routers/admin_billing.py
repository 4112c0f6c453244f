"""Admin billing: price overrides and credits/adjustments (scope `admin`). Every change is audited.

Credits are idempotent on the ``Idempotency-Key`` header (required): a replay answers the first result with
200 and ``Idempotent-Replayed: true``; the same key for a different request is 409 ``idempotency_conflict``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from metering import audit_snapshots as snap
from metering.api.admin_deps import IDEMPOTENCY_KEY, REPLAYED, Audited, PlatformAdmin, ensure_tenant
from metering.api.admin_schemas import (
    CreditIn,
    CreditOut,
    EndedPriceOverrideOut,
    EndOverrideIn,
    PriceOverrideIn,
    PriceOverrideOut,
    WithdrawOverrideIn,
)
from metering.api.deps import Admin, DbSession
from metering.api.exact_json import ExactNumbersRoute
from metering.api.problems import problem_responses
from metering.api.validators import UtcDatetime
from metering.billing import overrides
from metering.billing.credits import TransferResult, add_credit
from metering.billing.money import decimal_text
from metering.errors import IdempotencyKeyRequiredError

router = APIRouter(prefix="/admin", tags=["admin"], route_class=ExactNumbersRoute)  # money as JSON numbers: exact

OverrideId = Annotated[str, Path(min_length=1, max_length=64)]


# -- price overrides ------------------------------------------------------------------------------------


_OVERRIDE_KEY_PARAMETER = {
    "name": IDEMPOTENCY_KEY,
    "in": "header",
    "required": False,
    "description": (
        "Optional (1 to 200 printable ASCII characters; a UUID is a good choice), for a request without an `id` (not "
        "both: 422). The same key again answers the first override (200, `Idempotent-Replayed: true`), adding "
        "nothing; the same key for a different request is 409 `idempotency_conflict`. Not printable ASCII: 422."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^[\x20-\x7e]+$"},
}


@router.post(
    "/price-overrides",
    status_code=201,
    summary="Add a price override",
    description=(
        "Requires `admin`, unbound. Prices (provider, model glob) in [effective_from, effective_to), in USD per 1M "
        "tokens, exactly (at most 9 decimals; send strings). Overrides are never deleted: end them. Audited as "
        "`price_override.add`. Safe to retry with an `Idempotency-Key` header or an `id`: the same request again "
        "answers the first override with 200 and `Idempotent-Replayed: true` (not audited; the note is not compared); "
        "a key used for a different request is 409 `idempotency_conflict`, an id 409 `conflict`, naming the stored "
        "override and what differs."
    ),
    responses={
        200: {"model": PriceOverrideOut, "description": "A replay: the override this id or key added; nothing added."},
        **problem_responses(401, 403, 409, 422, 503),
    },
    openapi_extra={"parameters": [_OVERRIDE_KEY_PARAMETER]},
)
def post_price_override(
    body: PriceOverrideIn,
    request: Request,
    response: Response,
    principal: PlatformAdmin,
    session: DbSession,
    audit: Audited,
) -> PriceOverrideOut:
    key = request.headers.get(IDEMPOTENCY_KEY, "").strip(" \t") or None  # as a credit's; blank: none
    adding = overrides.add(
        session,
        provider=body.provider,
        model_pattern=body.model_pattern,
        effective_from=body.effective_from,
        effective_to=body.effective_to,
        input_mtok=body.input_mtok,
        output_mtok=body.output_mtok,
        cache_read_mtok=body.cache_read_mtok,
        cache_write_mtok=body.cache_write_mtok,
        cache_write_1h_mtok=body.cache_write_1h_mtok,
        web_search_per_k=body.web_search_per_k,
        markup_pct=body.markup_pct,
        note=body.note,
        id=body.id,
        idempotency_key=key,
    )
    row = adding.row
    response.headers[REPLAYED] = "true" if adding.replayed else "false"
    if adding.replayed:  # the first request's override: nothing added, nothing audited
        response.status_code = 200
    else:
        after = snap.override_snapshot(row)
        audit.record("price_override.add", snap.override_target(row.id), before=None, after=after)
    return PriceOverrideOut.of(row)


@router.get(
    "/price-overrides",
    summary="List price overrides",
    description="Requires `admin`, unbound. Optionally of one provider (any case), or those active at one moment.",
    responses=problem_responses(401, 403, 422, 503),
)
def list_price_overrides(
    principal: PlatformAdmin,
    session: DbSession,
    provider: Annotated[str | None, Query(max_length=50)] = None,
    active_at: Annotated[UtcDatetime | None, Query(description="E.g. 2026-11-01T00:00:00Z (no offset: UTC).")] = None,
) -> list[PriceOverrideOut]:
    return [PriceOverrideOut.of(r) for r in overrides.list_overrides(session, provider=provider, active_at=active_at)]


@router.post(
    "/price-overrides/{override_id}:end",
    summary="End a price override",
    description=(
        "Requires `admin`, unbound. Closes the override's window at `at` (default: now); it can only be shortened. "
        "Audited as `price_override.end`; ending it at the moment it already ends changes nothing (200, not audited). "
        "An end that would leave billed events (or BYOLLM shadow costs) it priced outside its window is 409 "
        "`override_priced_events` unless `keep_priced_events`; `events_to_rerate` then names them and the re-rate."
    ),
    responses=problem_responses(401, 403, 404, 409, 422, 503),
)
def end_price_override(
    override_id: OverrideId,
    principal: PlatformAdmin,
    session: DbSession,
    audit: Audited,
    body: EndOverrideIn | None = None,
) -> EndedPriceOverrideOut:
    at = body.at if body is not None and body.at is not None else datetime.now(UTC)
    keep = body is not None and body.keep_priced_events
    before = snap.override_snapshot(overrides.get_for_change(session, override_id))
    ending = overrides.end(session, override_id, at, keep_priced_events=keep)
    return _audited_end(audit, before, ending)


@router.post(
    "/price-overrides/{override_id}:withdraw",
    summary="Withdraw a price override",
    description=(
        "Requires `admin`, unbound. Ends the override at its start (`:end` with `at` = `effective_from`): its window "
        "is empty, it prices nothing, before or after its start; it stays listed. Audited as "
        "`price_override.withdraw`; withdrawing a withdrawn override changes nothing (200, not audited). Billed "
        "events it priced make it 409 `override_priced_events` unless `keep_priced_events` (then re-rate them: "
        "`events_to_rerate`)."
    ),
    responses=problem_responses(401, 403, 404, 409, 422, 503),
)
def withdraw_price_override(
    override_id: OverrideId,
    principal: PlatformAdmin,
    session: DbSession,
    audit: Audited,
    body: WithdrawOverrideIn | None = None,
) -> EndedPriceOverrideOut:
    keep = body is not None and body.keep_priced_events
    before = snap.override_snapshot(overrides.get_for_change(session, override_id))
    return _audited_end(audit, before, overrides.withdraw(session, override_id, keep_priced_events=keep))


def _audited_end(audit: Audited, before: snap.Snapshot | None, ending: overrides.Ending) -> EndedPriceOverrideOut:
    if ending.changed:  # ending it when it already ends then: nothing changed, nothing audited
        action, target = snap.override_end_action(ending.row), snap.override_target(ending.row.id)
        audit.record(action, target, before=before, after=snap.override_snapshot(ending.row))
    return EndedPriceOverrideOut.of_ending(ending)


# -- credits --------------------------------------------------------------------------------------------


def _credit_out(result: TransferResult) -> CreditOut:
    return CreditOut(
        transfer_id=result.transfer_id,
        kind=result.kind,
        tenant_id=result.tenant_id,
        user_id=result.user_id,
        amount=decimal_text(result.amount_nanos) or "0",
        amount_nanos=result.amount_nanos,
        idempotency_key=result.idempotency_key,
        memo=result.memo,
        created_at=result.created_at,
        replayed=result.replayed,
    )


_IDEMPOTENCY_PARAMETER = {
    "name": IDEMPOTENCY_KEY,
    "in": "header",
    "required": True,
    "description": (
        "Required (1 to 200 printable ASCII characters; a UUID is a good choice), per tenant. The same key returns the "
        "first result; the same key for a different request is 409 `idempotency_conflict`. Missing: 400 "
        "`idempotency_key_required`; not printable ASCII: 422."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^[\x20-\x7e]+$"},
}


@router.post(
    "/credits",
    status_code=201,
    summary="Credit (or adjust) a user's balance, idempotently",
    description=(
        "Requires `admin`; a tenant-bound token only for its tenant's users (404 for others). `credit` moves "
        "money from `platform:topups` to the user's wallet; `adjustment` credits (> 0) or debits (< 0) it against "
        "`platform:adjustments`. 201 with the transfer; a replay of the same `Idempotency-Key` answers the first "
        "result with 200 and `Idempotent-Replayed: true` (the memo is not compared); the same key for another "
        "amount, user or kind is 409 `idempotency_conflict`; an amount that would take the wallet's or its source "
        "account's balance past ±$9,223,372,036.854775807 is 422 `balance_limit` (nothing posted, key not kept). "
        "Audited as `credit.add` or `adjustment.add`."
    ),
    responses={
        200: {"model": CreditOut, "description": "A replay: the first result of this key; nothing was posted."},
        **problem_responses(400, 401, 403, 404, 409, 422, 503),
    },
    openapi_extra={"parameters": [_IDEMPOTENCY_PARAMETER]},
)
def post_credit(
    body: CreditIn, request: Request, response: Response, principal: Admin, session: DbSession, audit: Audited
) -> CreditOut:
    key = request.headers.get(IDEMPOTENCY_KEY, "").strip(" \t")  # HTTP's whitespace (a Latin-1 NBSP stays: 422)
    if not key:
        raise IdempotencyKeyRequiredError(
            f"POST /v1/admin/credits needs an {IDEMPOTENCY_KEY} header (e.g. a UUID) so a retry cannot post twice"
        )
    ensure_tenant(principal, body.tenant_id, f"user {body.user_id!r}")
    result = add_credit(
        session,
        tenant_id=body.tenant_id,
        user_id=body.user_id,
        amount=body.amount,
        idempotency_key=key,
        kind=body.kind,
        memo=body.memo,
    )
    out = _credit_out(result)
    response.headers[REPLAYED] = "true" if result.replayed else "false"
    if result.replayed:
        response.status_code = 200
    else:
        audit.record(
            snap.credit_action(result),
            snap.user_target(result.tenant_id, result.user_id),
            before=None,
            after=snap.credit_snapshot(result),
            tenant_id=result.tenant_id,
        )
    return out
