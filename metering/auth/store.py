"""API token repository. Only flushes: the edge (CLI command, API dependency) commits."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from metering.auth.tokens import (
    Scope,
    TokenPrincipal,
    check_name,
    check_tenant,
    digest,
    digests_equal,
    new_secret,
    parse_scopes,
    prefix_of,
    well_formed,
)
from metering.db.models import ApiTokenRow
from metering.errors import NotFoundError

_KNOWN_SCOPES = frozenset(s.value for s in Scope)


def create_token(
    session: Session,
    name: str,
    scopes: Iterable[str | Scope],
    tenant_id: str | None = None,
    *,
    now: datetime | None = None,
) -> tuple[ApiTokenRow, str]:
    """A new token and its secret. The secret is returned once and never stored (only its digest)."""
    secret = new_secret()
    row = ApiTokenRow(
        id=uuid.uuid4(),
        name=check_name(name),
        token_hash=digest(secret),
        prefix=prefix_of(secret),
        scopes=[s.value for s in parse_scopes(scopes)],
        tenant_id=check_tenant(tenant_id),
        created_at=now or datetime.now(UTC),
    )
    session.add(row)
    session.flush()
    return row, secret


def authenticate(
    session: Session,
    secret: str,
    *,
    now: datetime | None = None,
    touch_after: timedelta | None = timedelta(minutes=1),
) -> TokenPrincipal | None:
    """The principal of a live token, else None (unknown, malformed or revoked: callers cannot tell which).

    Candidates are found by their non-secret prefix; digests are compared in constant time. ``last_used_at``
    is written only when older than ``touch_after``, so busy tokens do not turn every request into a write;
    never with ``touch_after=None`` (a lookup only: the database refuses writes).
    """
    if not well_formed(secret):
        return None
    wanted = digest(secret)
    match: ApiTokenRow | None = None
    for row in session.scalars(select(ApiTokenRow).where(ApiTokenRow.prefix == prefix_of(secret))):
        if digests_equal(row.token_hash, wanted):
            match = row
    if match is None or match.revoked_at is not None:
        return None
    now = now or datetime.now(UTC)
    if touch_after is not None and (match.last_used_at is None or now - match.last_used_at >= touch_after):
        match.last_used_at = now
        session.flush()
    return principal_of(match)


def principal_of(row: ApiTokenRow) -> TokenPrincipal:
    return TokenPrincipal(
        token_id=row.id,
        name=row.name,
        # A scope this version does not know (written by a newer one) grants nothing.
        scopes=frozenset(Scope(s) for s in row.scopes if s in _KNOWN_SCOPES),
        tenant_id=row.tenant_id,
    )


def list_tokens(session: Session, *, include_revoked: bool = True) -> list[ApiTokenRow]:
    stmt = select(ApiTokenRow).order_by(ApiTokenRow.created_at, ApiTokenRow.id)
    if not include_revoked:
        stmt = stmt.where(ApiTokenRow.revoked_at.is_(None))
    return list(session.scalars(stmt))


def get_token(session: Session, token_id: uuid.UUID) -> ApiTokenRow:
    row = session.get(ApiTokenRow, token_id)
    if row is None:
        raise NotFoundError(f"no API token with id {token_id}")
    return row


def revoke_token(session: Session, token_id: uuid.UUID, *, now: datetime | None = None) -> ApiTokenRow:
    """Revoke a token (idempotent: a revoked token keeps its first revocation time)."""
    return revoke(session, token_id, now=now)[0]


def revoke(session: Session, token_id: uuid.UUID, *, now: datetime | None = None) -> tuple[ApiTokenRow, bool]:
    """``revoke_token``, also telling whether this call revoked it. One conditional ``UPDATE``: a revocation that
    waited for a concurrent one finds the token revoked and keeps its time (read before, it overwrote it)."""
    get_token(session, token_id)  # NotFoundError
    stmt = (
        update(ApiTokenRow)
        .where(ApiTokenRow.id == token_id, ApiTokenRow.revoked_at.is_(None))
        .values(revoked_at=now or datetime.now(UTC))
        .execution_options(synchronize_session=False)
    )
    revoked_now = bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]
    row = session.get(ApiTokenRow, token_id, populate_existing=True)
    assert row is not None  # a token is never deleted
    return row, revoked_now
