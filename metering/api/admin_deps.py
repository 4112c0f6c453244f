"""Dependencies of the admin endpoints: who may touch what, the audit trail of a request, the secret box.

- ``PlatformAdmin``: an ``admin`` token not bound to a tenant (platform-wide settings); a bound one gets 403.
- ``ensure_tenant``: a tenant-bound ``admin`` token sees only its tenant's users; others are 404, as if absent.
- ``Audited``: records an entry in the request's own session, so it commits (or rolls back) with the change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, Request
from sqlalchemy.orm import Session

from metering import audit
from metering.api.deps import Admin, DbSession
from metering.api.runtime import LazyRuntime
from metering.auth import TokenPrincipal
from metering.crypto import SecretBox
from metering.errors import NotFoundError, PermissionDeniedError

REQUEST_ID_HEADER = "X-Request-ID"
IDEMPOTENCY_KEY = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"


def _not_bound(principal: TokenPrincipal) -> None:
    if principal.tenant_id is not None:
        raise PermissionDeniedError("platform-wide settings need an admin token that is not bound to a tenant")


def platform_admin(principal: Admin) -> TokenPrincipal:
    _not_bound(principal)
    return principal


platform_admin.principal_check = _not_bound  # type: ignore[attr-defined]  # read by deps.refusal_before_body


def ensure_tenant(principal: TokenPrincipal, tenant_id: str, what: str) -> None:
    """404 (not 403) for another tenant's users: a tenant-bound token cannot learn that they exist."""
    if not principal.may_act_for(tenant_id):
        raise NotFoundError(f"no {what} in tenant {tenant_id!r}")


def app_runtime(request: Request) -> LazyRuntime:
    runtime: LazyRuntime = request.app.state.runtime
    return runtime


def secret_box(request: Request) -> SecretBox:
    return app_runtime(request).box


@dataclass
class Auditor:
    """Writes audit entries into the request's session (the same transaction as the change)."""

    session: Session
    principal: TokenPrincipal
    request_id: str | None
    runtime: LazyRuntime
    background: BackgroundTasks

    def record(
        self,
        action: str,
        target: str,
        *,
        before: Any,
        after: Any,
        tenant_id: str | None = None,
        session: Session | None = None,
        secret_changed: bool = False,
    ) -> None:
        """``session``: another transaction than the request's (one the caller commits itself). A write that changed
        nothing (``before`` equals ``after``, unless ``secret_changed``) records none: see ``audit.record``."""
        audit.record(
            session or self.session,
            actor=self.principal,
            action=action,
            target=target,
            before=before,
            after=after,
            tenant_id=tenant_id,
            request_id=self.request_id,
            secret_changed=secret_changed,
        )

    def settings_changed(self) -> None:
        """Have the runtime reload LLM settings once the response is sent (after the commit)."""
        self.background.add_task(self.runtime.invalidate_settings)

    def key_replaced(self, api_key: str | None) -> None:
        """Have the runtime close the adapters of a BYOLLM key that was replaced or deleted, once the response is
        sent (after ``settings_changed``'s reload: no call is resolved to the old key any more)."""
        if api_key is not None:
            self.background.add_task(self.runtime.retire_key, api_key)


def auditor(request: Request, session: DbSession, principal: Admin, background: BackgroundTasks) -> Auditor:
    request_id = request.headers.get(REQUEST_ID_HEADER) or None
    return Auditor(
        session=session,
        principal=principal,
        request_id=request_id[: audit.MAX_REQUEST_ID] if request_id else None,
        runtime=app_runtime(request),
        background=background,
    )


PlatformAdmin = Annotated[TokenPrincipal, Depends(platform_admin)]
Audited = Annotated[Auditor, Depends(auditor)]
Box = Annotated[SecretBox, Depends(secret_box)]
AppRuntime = Annotated[LazyRuntime, Depends(app_runtime)]
