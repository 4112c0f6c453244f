"""Idempotency keys of ``POST …:invoke`` (SQL; only flushes, the caller commits).

A key is per tenant. ``claim`` runs, and is committed, before the handler: the first request with a key claims
it (``running``); a concurrent one with the same key and request is ``IdempotencyInProgressError``, one with
another request ``IdempotencyConflictError``. ``complete`` stores the status and body the invocation answered
(``done``); a later request with the key gets them back (``StoredResponse``) and nothing runs. ``release``
drops a claim whose invocation made no metered call, so running it again costs nothing.

Keys are kept ``RETENTION`` (24 h) after their claim; older ones are deleted by the next claim (on PostgreSQL, but
those another transaction is deleting: a claim waits only for its own key, before it holds any row), and the key is
free again. A
claim still ``running`` after ``UNKNOWN_AFTER`` never recorded its outcome (its process died, or the database failed
as it finished): it may have made billed calls, so it is never run again under this key
(``IdempotencyOutcomeUnknownError``, with the invocation id the claim chose: its usage events carry it).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Table, delete, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from metering.db.models import InvokeRequestRow
from metering.errors import IdempotencyConflictError, IdempotencyInProgressError, IdempotencyOutcomeUnknownError

RETENTION = timedelta(hours=24)
CLAIM_ATTEMPTS = 5  # a claim released under us is claimed again, at most this often
UNKNOWN_AFTER = timedelta(minutes=15)  # longer than any invocation runs (the router's INVOKE_DEADLINE: 10 minutes)
RUNNING = "running"
DONE = "done"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    body: dict[str, Any]


def request_sha256(extension_id: str, function: str, user_id: str, params: dict[str, Any]) -> str:
    """What identifies an invocation request (the tenant is part of the key itself)."""
    canonical = json.dumps(
        [extension_id, function, user_id, params], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _key(tenant_id: str, key: str) -> Any:
    return (InvokeRequestRow.tenant_id == tenant_id) & (InvokeRequestRow.idempotency_key == key)


def claim(
    session: Session, *, tenant_id: str, key: str, sha256: str, invocation_id: uuid.UUID, now: datetime
) -> StoredResponse | None:
    """None: the key is this request's now (claimed at ``now`` for ``invocation_id``), run it. A
    ``StoredResponse``: answer it, run nothing."""
    _delete_expired(session, tenant_id, key, now)
    values = {
        "tenant_id": tenant_id,
        "idempotency_key": key,
        "request_sha256": sha256,
        "invocation_id": invocation_id,
        "state": RUNNING,
        "claimed_at": now,
    }
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    table = cast(Table, InvokeRequestRow.__table__)
    stmt = insert(table).values(**values).on_conflict_do_nothing().returning(table.c.tenant_id)
    for _ in range(CLAIM_ATTEMPTS):
        if session.execute(stmt).first() is not None:
            return None
        row = session.execute(select(InvokeRequestRow).where(_key(tenant_id, key))).scalar_one_or_none()
        if row is not None:
            break
        # Released between the two statements (its invocation failed before any billed call): claim it again.
    else:
        raise IdempotencyInProgressError(f"requests with idempotency key {key!r} keep racing; retry later")
    if row.request_sha256 != sha256:
        raise IdempotencyConflictError(
            f"idempotency key {key!r} was already used for a different invocation (extension, function, user or "
            "params); use a new key for a new request"
        )
    if row.state == DONE and row.status_code is not None and isinstance(row.response, dict):
        return StoredResponse(row.status_code, row.response)
    if row.claimed_at <= now - UNKNOWN_AFTER:
        error: IdempotencyInProgressError | IdempotencyOutcomeUnknownError = IdempotencyOutcomeUnknownError(
            f"the invocation with idempotency key {key!r} never recorded its outcome (its process stopped, or the "
            f"database failed as it finished): it may have made billed calls, whose usage events carry invocation "
            f"id {row.invocation_id}; it is not run again under this key (use a new key to run it again)"
        )
    else:
        error = IdempotencyInProgressError(
            f"an invocation with idempotency key {key!r} is still running; retry later for its result"
        )
    error.members["invocation_id"] = str(row.invocation_id)
    raise error


def _delete_expired(session: Session, tenant_id: str, key: str, now: datetime) -> None:
    """Keys past their retention. On PostgreSQL, this claim's own key first (it must be free: the claim waits for a
    transaction holding it), then the others but those another transaction holds (it is deleting them). A DELETE
    locking every expired row waited on them in its plan's order (claimed_at order by the index, or the table's
    physical order), so two claims whose plans differed deadlocked (a 503); and a clean-up that locked other claims'
    keys before waiting on its own key deadlocked with a claim whose clean-up held that key while waiting on one of
    them. Now a claim waits only on its own key, before it holds any row, and a clean-up on none."""
    expired = InvokeRequestRow.claimed_at < now - RETENTION
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            delete(InvokeRequestRow).where(_key(tenant_id, key) & expired).execution_options(synchronize_session=False)
        )
        pk = tuple_(InvokeRequestRow.tenant_id, InvokeRequestRow.idempotency_key)
        free = select(InvokeRequestRow.tenant_id, InvokeRequestRow.idempotency_key).where(expired)
        expired = pk.in_(free.with_for_update(skip_locked=True))
    session.execute(delete(InvokeRequestRow).where(expired).execution_options(synchronize_session=False))


def _mine(tenant_id: str, key: str, claimed_at: datetime) -> Any:
    # Only the request that made the claim settles it.
    return _key(tenant_id, key) & (InvokeRequestRow.state == RUNNING) & (InvokeRequestRow.claimed_at == claimed_at)


def complete(
    session: Session,
    *,
    tenant_id: str,
    key: str,
    claimed_at: datetime,
    status: int,
    body: dict[str, Any],
    now: datetime,
) -> bool:
    """Store the outcome of our running claim; False when it is not running (already settled)."""
    done = session.execute(
        update(InvokeRequestRow)
        .where(_mine(tenant_id, key, claimed_at))
        .values(state=DONE, status_code=status, response=body, completed_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(cast(CursorResult[Any], done).rowcount)


def release(session: Session, *, tenant_id: str, key: str, claimed_at: datetime) -> bool:
    """Drop our running claim; False when it is not running (already settled)."""
    released = session.execute(
        delete(InvokeRequestRow).where(_mine(tenant_id, key, claimed_at)).execution_options(synchronize_session=False)
    )
    return bool(cast(CursorResult[Any], released).rowcount)
