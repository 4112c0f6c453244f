"""Credits, top-ups and manual adjustments (SQL; only flushes, the edge commits).

Each takes an idempotency key, scoped to the tenant (like the keys of ``POST …:invoke``): the key and its tenant
are stored on the transfer (unique together), so a repeated key can never post twice: it returns the first
transfer, unchanged. Two tenants may use the same key; neither sees nor blocks the other's. The transfer id is
derived from (tenant, key, kind). A repeated key with a different request (amount, user or kind) is an
``IdempotencyConflictError``. The memo is not part of the request's identity (a retry may reword it); the
first memo stays.

- ``credit``: ``platform:topups`` -> the user's wallet (prepaid credit, promotions). Amount > 0.
- ``adjustment``: positive credits the user from ``platform:adjustments``; negative debits the user to it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal, cast

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from metering.billing import store
from metering.billing.ledger import (
    ADJUSTMENT_SOURCE,
    CURRENCY,
    TOPUP_SOURCE,
    AccountKind,
    Posting,
    TransferKind,
    accounts_of,
    balance_deltas,
    transfer_id,
    user_wallet,
)
from metering.billing.money import format_usd
from metering.db.models import AccountRow, TransferRow
from metering.errors import IdempotencyConflictError, InvalidInputError
from metering.events import MAX_NAME

CreditKind = Literal["credit", "adjustment"]
MAX_KEY = 200
MAX_MEMO = 500


@dataclass(frozen=True, slots=True)
class TransferResult:
    transfer_id: uuid.UUID
    kind: str
    tenant_id: str
    user_id: str
    amount_nanos: int  # signed, as seen by the user's wallet: > 0 credits it, < 0 debits it
    idempotency_key: str
    memo: str | None
    created_at: datetime
    replayed: bool  # True: the key was seen before, this is the first result and nothing was posted


def amount_to_nanos(amount: Decimal) -> int:
    """USD as integer nanos, exactly: floats and amounts finer than 1e-9 USD are refused, not rounded."""
    if not isinstance(amount, Decimal) or not amount.is_finite():
        raise InvalidInputError(f"an amount must be a finite Decimal in USD (got {amount!r})")
    nanos = amount.scaleb(9)
    if nanos != nanos.to_integral_value():
        raise InvalidInputError(f"amount {amount} USD is finer than one nano-dollar (1e-9 USD)")
    if abs(nanos) > 2**62:
        raise InvalidInputError(f"amount {amount} USD is too large")
    return int(nanos)


def key_transfer_id(tenant_id: str, idempotency_key: str, kind: str) -> uuid.UUID:
    """The id of the transfer a tenant's key posts: a JSON array names the pair (no separator can be forged).
    Keys posted before 0010 (global keys) kept their ``key:{key}`` ids; they are found by (tenant, key)."""
    return transfer_id("key:" + json.dumps([tenant_id, idempotency_key]), kind)


def check_idempotency_key(idempotency_key: str) -> None:
    """A key both edges read alike (credits, adjustments, price overrides): 1 to ``MAX_KEY`` printable ASCII
    characters, without whitespace at either end."""
    if not idempotency_key or len(idempotency_key) > MAX_KEY:
        raise InvalidInputError(f"an idempotency key is required, at most {MAX_KEY} characters")
    if idempotency_key != idempotency_key.strip():  # the API's header never holds one: HTTP strips it
        raise InvalidInputError(
            "an idempotency key cannot start or end with whitespace (an HTTP header cannot carry it, so a retry "
            "through the API would post a second time)"
        )
    if not all(" " <= c <= "~" for c in idempotency_key):  # printable ASCII, as the keys of `…:invoke`
        raise InvalidInputError(
            "an idempotency key is printable ASCII (an HTTP header carries other characters as Latin-1 bytes: the API "
            "read a UTF-8 'é' as 'Ã©', the CLI as 'é', so a retry through the other edge would post a second time)"
        )


def credit_posting(
    *, tenant_id: str, user_id: str, nanos: int, idempotency_key: str, kind: CreditKind, memo: str | None
) -> Posting:
    """The one transfer a credit or adjustment posts (pure)."""
    if kind not in ("credit", "adjustment"):
        raise InvalidInputError(f"kind must be 'credit' or 'adjustment', not {kind!r}")
    check_idempotency_key(idempotency_key)
    if memo is not None and len(memo) > MAX_MEMO:
        raise InvalidInputError(f"a memo has at most {MAX_MEMO} characters")
    if not tenant_id or not user_id:
        raise InvalidInputError("tenant_id and user_id are required")
    if len(tenant_id) > MAX_NAME or len(user_id) > MAX_NAME:
        raise InvalidInputError(f"tenant_id and user_id have at most {MAX_NAME} characters")
    if nanos == 0:
        raise InvalidInputError("amount must not be zero")
    if kind == "credit" and nanos < 0:
        raise InvalidInputError(
            "amount must be positive for a credit (an adjustment debits a user with a negative amount)"
        )
    wallet = user_wallet(tenant_id, user_id)
    source = TOPUP_SOURCE if kind == "credit" else ADJUSTMENT_SOURCE
    debit, credit = (source, wallet) if nanos > 0 else (wallet, source)
    transfer_kind = TransferKind(kind)
    return Posting(
        key_transfer_id(tenant_id, idempotency_key, transfer_kind),
        debit,
        credit,
        abs(nanos),
        transfer_kind,
        idempotency_key=idempotency_key,
        memo=memo,
    )


def _insert_if_new(session: Session, posting: Posting, tenant_id: str, now: datetime) -> bool:
    """Insert the transfer unless its id or the tenant's key exists (waits for a concurrent insert of the key)."""
    values = {
        "id": posting.id,
        "debit_account_id": posting.debit.id,
        "credit_account_id": posting.credit.id,
        "amount_nanos": posting.amount_nanos,
        "currency": CURRENCY,
        "kind": posting.kind.value,
        "event_id": None,
        "reverses_id": None,
        "idempotency_key": posting.idempotency_key,
        "period": None,
        "memo": posting.memo,
        "created_at": now,
        "idempotency_tenant_id": tenant_id,
    }
    insert = postgresql.insert if store.dialect(session) == "postgresql" else sqlite.insert
    table = cast(Table, TransferRow.__table__)
    stmt = insert(table).values(**values).on_conflict_do_nothing().returning(table.c.id)
    return session.execute(stmt).first() is not None


def _result(row: TransferRow, tenant_id: str, user_id: str, replayed: bool) -> TransferResult:
    wallet = user_wallet(tenant_id, user_id).id
    signed = row.amount_nanos if row.credit_account_id == wallet else -row.amount_nanos
    return TransferResult(
        row.id, row.kind, tenant_id, user_id, signed, row.idempotency_key or "", row.memo, row.created_at, replayed
    )


def add_credit(
    session: Session,
    *,
    tenant_id: str,
    user_id: str,
    amount: Decimal,
    idempotency_key: str,
    kind: CreditKind = "credit",
    memo: str | None = None,
    now: datetime | None = None,
) -> TransferResult:
    """Post a credit or adjustment once per idempotency key; a repeated key returns the first result."""
    now = now or datetime.now(UTC)
    posting = credit_posting(
        tenant_id=tenant_id,
        user_id=user_id,
        nanos=amount_to_nanos(amount),
        idempotency_key=idempotency_key,
        kind=kind,
        memo=memo,
    )
    inserted = _insert_if_new(session, posting, tenant_id, now)
    if inserted:
        store.apply_balances(session, accounts_of([posting]), balance_deltas([posting]), now)
    row = session.scalars(
        select(TransferRow).where(
            TransferRow.idempotency_tenant_id == tenant_id, TransferRow.idempotency_key == idempotency_key
        )
    ).one_or_none()
    if row is None:  # the id existed without this key: cannot happen unless the ledger was tampered with
        raise IdempotencyConflictError(f"transfer {posting.id} exists without idempotency key {idempotency_key!r}")
    # Not the id: a key posted before keys were per tenant has the old id, and the key alone identifies it.
    same = (row.kind, row.debit_account_id, row.credit_account_id, row.amount_nanos) == (
        posting.kind.value,
        posting.debit.id,
        posting.credit.id,
        posting.amount_nanos,
    )
    if not same:
        raise IdempotencyConflictError(
            f"idempotency key {idempotency_key!r} was already used for a different request ({_describe(session, row)})"
        )
    return _result(row, tenant_id, user_id, replayed=not inserted)


def _describe(session: Session, row: TransferRow) -> str:
    """The first request of a key, to its own tenant: kind, signed amount and user (the wallet's side)."""
    sides = session.scalars(
        select(AccountRow).where(
            AccountRow.id.in_((row.debit_account_id, row.credit_account_id)),
            AccountRow.kind == AccountKind.USER_WALLET.value,
        )
    ).all()
    debited = bool(sides) and sides[0].id == row.debit_account_id
    amount = format_usd(-row.amount_nanos if debited else row.amount_nanos)
    user = f" for user {sides[0].user_id!r}" if sides else ""
    article = "an" if row.kind[0] in "aeiou" else "a"
    return f"{article} {row.kind} of {amount}{user}"


def balances(session: Session, tenant_id: str | None = None) -> list[tuple[str, str, int]]:
    """(account id, kind, cached balance in nanos) by account id; with ``tenant_id``, only that tenant's."""
    stmt = select(AccountRow.id, AccountRow.kind, AccountRow.balance_nanos).order_by(AccountRow.id)
    if tenant_id is not None:
        stmt = stmt.where(AccountRow.tenant_id == tenant_id)
    return [(account_id, kind, balance) for account_id, kind, balance in session.execute(stmt)]
