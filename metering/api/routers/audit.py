"""GET /v1/audit: the audit log of admin changes, newest first, with keyset pagination (scope `admin`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from metering import audit
from metering.api.admin_schemas import AuditEntry, AuditPage
from metering.api.deps import Admin, DbSession
from metering.api.problems import problem_responses

router = APIRouter(tags=["audit"])


@router.get(
    "/audit",
    summary="Read the audit log",
    description=(
        "Requires the `admin` scope. Entries newest first; pass `next_cursor` back as `cursor` for the next page. "
        "A token bound to a tenant sees only that tenant's entries. Secrets never appear: values of secret-named "
        "fields (`api_key`, `secret`, `token`, `password`, ...) are stored as `***`."
    ),
    responses=problem_responses(401, 403, 422, 503),
)
def get_audit(
    principal: Admin,
    session: DbSession,
    limit: Annotated[int, Query(ge=1, le=audit.MAX_LIMIT, description="Entries per page.")] = 50,
    cursor: Annotated[str | None, Query(max_length=500, description="`next_cursor` of the previous page.")] = None,
    action: Annotated[str | None, Query(max_length=100, description="Only this action, e.g. `byollm.set`.")] = None,
) -> AuditPage:
    page = audit.list_entries(
        session,
        limit=limit,
        cursor=audit.Cursor.decode(cursor) if cursor else None,
        action=action,
        tenant_id=principal.tenant_id,
    )
    return AuditPage(items=[AuditEntry.of(row) for row in page.entries], next_cursor=page.next_cursor)
