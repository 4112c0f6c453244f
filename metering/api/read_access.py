"""Tenant isolation on the read side: a tenant-bound token sees only its tenant's data.

- A list filtered by ``tenant_id`` for another tenant is refused (403 ``forbidden``, naming the token's
  tenant); without the filter, the list is restricted to the token's tenant.
- An object of another tenant (an invoice by path) is answered exactly like a missing one (404): the
  answer never tells whether it exists.
"""

from __future__ import annotations

from metering.auth import TokenPrincipal
from metering.errors import PermissionDeniedError


def tenant_scope(principal: TokenPrincipal, tenant_id: str | None) -> str | None:
    """The tenant a read is restricted to: the token's tenant, else the requested one (None: all)."""
    bound = principal.tenant_id
    if bound is None:
        return tenant_id
    if tenant_id is not None and tenant_id != bound:
        raise PermissionDeniedError(f"token bound to tenant {bound}: it cannot read tenant {tenant_id}")
    return bound
