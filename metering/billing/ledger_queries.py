"""Read-side SQL of the ledger (reads only): transfer pages, balances, held events, a tenant's ledger CSV.

Pages are keyset pages ordered by (time, id) with an opaque cursor: base64url of the last row's
``<ISO time>|<id hex>``. A tenant's view of the ledger is the transfers that touch one of its users' wallets
(accounts of kind ``user_wallet`` with that ``tenant_id``; matched on the account row, not on the id's text).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from metering.billing import export, invoice_store
from metering.billing.ledger import AccountKind, TransferKind
from metering.billing.policy import BillingStatus
from metering.db.models import AccountRow, TransferRow, UsageEventRow
from metering.errors import InvalidInputError

MAX_PAGE = 1000
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None  # None: this is the last page


def encode_cursor(moment: datetime, ident: uuid.UUID) -> str:
    raw = f"{moment.astimezone(UTC).isoformat()}|{ident.hex}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (time, id) a cursor points after; anything else is a 422."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment_text, ident_text = raw.split("|")
        moment = datetime.fromisoformat(moment_text)
        ident = uuid.UUID(hex=ident_text)
        if moment.tzinfo is None:
            raise ValueError("a naive time")
        moment = moment.astimezone(UTC)  # 0001-01-01T00:00+05:00 is before year 1 in UTC: OverflowError
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise invalid_cursor() from None
    return moment, ident


def invalid_cursor() -> InvalidInputError:
    return InvalidInputError("invalid cursor: pass the next_cursor of a previous page unchanged")


def encode_text_cursor(prefix: str, key: str) -> str:
    """A cursor naming a row by text (an account id, an invoice's key): base64url of ``prefix`` and ``key``."""
    return base64.urlsafe_b64encode(f"{prefix}{key}".encode()).decode().rstrip("=")


def decode_text_cursor(prefix: str, cursor: str) -> str:
    """The key of a cursor of ``encode_text_cursor(prefix, …)``; anything else (another kind of cursor, an empty
    key, a NUL that no stored id holds) is a 422."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    if not raw.startswith(prefix) or len(raw) == len(prefix) or "\x00" in raw:
        raise invalid_cursor()
    return raw[len(prefix) :]


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInputError(f"limit is 1 to {MAX_PAGE}, not {limit}")
    return limit


def _after(
    time_column: InstrumentedAttribute[datetime], id_column: InstrumentedAttribute[uuid.UUID], cursor: str
) -> ColumnElement[bool]:
    moment, ident = decode_cursor(cursor)
    return or_(time_column > moment, and_(time_column == moment, id_column > ident))


def _page(
    session: Session,
    stmt: Select[Any],
    time_column: InstrumentedAttribute[datetime],
    id_column: InstrumentedAttribute[uuid.UUID],
    limit: int,
    cursor: str | None,
) -> Page[Any]:
    limit = check_limit(limit)
    if cursor is not None:
        stmt = stmt.where(_after(time_column, id_column, cursor))
    rows = list(session.scalars(stmt.order_by(time_column, id_column).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows else None
    next_cursor = encode_cursor(getattr(last, time_column.key), getattr(last, id_column.key)) if more else None
    return Page(rows, next_cursor)


# -- transfers ------------------------------------------------------------------------------------


def tenant_wallets(tenant_id: str) -> Select[str]:
    return select(AccountRow.id).where(
        AccountRow.tenant_id == tenant_id, AccountRow.kind == AccountKind.USER_WALLET.value
    )


def touches_tenant(tenant_id: str) -> ColumnElement[bool]:
    """A transfer that debits or credits a wallet of one of ``tenant_id``'s users."""
    wallets = tenant_wallets(tenant_id)
    return or_(TransferRow.debit_account_id.in_(wallets), TransferRow.credit_account_id.in_(wallets))


def check_kind(kind: str | None) -> str | None:
    known = [k.value for k in TransferKind]
    if kind is not None and kind not in known:
        raise InvalidInputError(f"kind is one of {', '.join(known)}, not {kind!r}")
    return kind


def transfers_page(
    session: Session,
    *,
    tenant_id: str | None = None,
    account_id: str | None = None,
    kind: str | None = None,
    event_id: uuid.UUID | None = None,
    period: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page[TransferRow]:
    """Transfers in posting order (created_at, id), a page at a time; ``tenant_id`` restricts them to those
    touching that tenant's wallets."""
    stmt = select(TransferRow)
    if tenant_id is not None:
        stmt = stmt.where(touches_tenant(tenant_id))
    if account_id is not None:
        stmt = stmt.where(or_(TransferRow.debit_account_id == account_id, TransferRow.credit_account_id == account_id))
    if check_kind(kind) is not None:
        stmt = stmt.where(TransferRow.kind == kind)
    if event_id is not None:
        stmt = stmt.where(TransferRow.event_id == event_id)
    if period is not None:
        stmt = stmt.where(invoice_store.in_period(period))
    return _page(session, stmt, TransferRow.created_at, TransferRow.id, limit, cursor)


def ledger_csv(session: Session, period: str, tenant_id: str | None = None) -> str:
    """``export.ledger_csv`` of ``period``; with ``tenant_id``, only the transfers touching its wallets
    (same columns, same order, same formatting)."""
    return "".join(ledger_csv_chunks(session, period, tenant_id))


def ledger_csv_chunks(session: Session, period: str, tenant_id: str | None = None) -> Iterator[str]:
    """``ledger_csv`` a chunk at a time (``export.ledger_csv_chunks``)."""
    where = () if tenant_id is None else (touches_tenant(tenant_id),)
    return export.ledger_csv_chunks(session, period, *where)


# -- balances -------------------------------------------------------------------------------------


def balances_page(
    session: Session, *, tenant_id: str | None = None, limit: int = MAX_PAGE, cursor: str | None = None
) -> Page[AccountRow]:
    """Accounts with their cached balances, by id, a page at a time; with ``tenant_id``, only that tenant's user
    wallets. A keyset on the id: an account opened during a walk is seen unless its id sorts before the cursor."""
    limit = check_limit(limit)
    stmt = _accounts(tenant_id)
    if cursor is not None:
        stmt = stmt.where(AccountRow.id > _decode_account_cursor(cursor))
    rows = list(session.scalars(stmt.order_by(AccountRow.id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, _encode_account_cursor(rows[-1].id) if more else None)


def _accounts(tenant_id: str | None) -> Select[AccountRow]:
    stmt = select(AccountRow)
    if tenant_id is not None:
        stmt = stmt.where(AccountRow.tenant_id == tenant_id, AccountRow.kind == AccountKind.USER_WALLET.value)
    return stmt


_ACCOUNT_CURSOR = "account|"


def _encode_account_cursor(account_id: str) -> str:
    return encode_text_cursor(_ACCOUNT_CURSOR, account_id)


def _decode_account_cursor(cursor: str) -> str:
    return decode_text_cursor(_ACCOUNT_CURSOR, cursor)


# -- held events ----------------------------------------------------------------------------------


def unpriced_page(
    session: Session, *, tenant_id: str | None = None, limit: int = 100, cursor: str | None = None
) -> Page[UsageEventRow]:
    """Events held as ``unpriced``, by (occurred_at, event_id), a page at a time."""
    stmt = select(UsageEventRow).where(UsageEventRow.billing_status == BillingStatus.UNPRICED.value)
    if tenant_id is not None:
        stmt = stmt.where(UsageEventRow.tenant_id == tenant_id)
    return _page(session, stmt, UsageEventRow.occurred_at, UsageEventRow.event_id, limit, cursor)
