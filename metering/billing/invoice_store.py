"""SQL of invoices: drafts computed from billed events (and re-rate corrections of finalized months),
finalized invoices stored, the period's ledger.

Only flushes inside the caller's transaction; the edge commits.

Concurrency. Finalizing a period must not miss an event that a concurrent ingest is assigning to it.
On PostgreSQL ``finalize_period`` takes ``pg_advisory_xact_lock(hashtext('invoice:' || period))`` as
its first statement; ingest, reprice and re-rate take the shared variant (``lock_billing_periods``) for
every period they may bill into, sorted, *before* they read ``store.finalized_periods``, and hold it to
commit (it is a transaction lock), reading the finalized periods again after taking the locks of late periods.
Then either the ingest commits first and finalization (read committed) sees its events, or finalization commits
first and the ingest sees the month closed (``finalized_periods``) and bills late. On SQLite
``finalize_period`` takes the database write lock (a no-op write) before reading, so it runs alone.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import ColumnElement, Select, and_, case, func, or_, select, text
from sqlalchemy.orm import QueryableAttribute, Session, aliased

from metering.billing.invoices import Invoice, InvoiceLine, build_invoice, invoice_id
from metering.billing.ledger import CURRENCY
from metering.billing.periods import (
    billing_period,
    finalizable,
    finalizable_at,
    parse_period,
    period_bounds,
    period_of,
)
from metering.billing.store import dialect, finalized_periods
from metering.db.models import FinalizedPeriodRow, InvoiceLineRow, InvoiceRow, TransferRow, UsageEventRow
from metering.db.row_lock import lock_sqlite_for_write
from metering.errors import InvalidInputError, NotFoundError, PeriodOpenError

UserKey = tuple[str, str, str]  # (tenant_id, user_id, period)
UserPair = tuple[str, str]  # (tenant_id, user_id)


def check_period(period: str) -> str:
    try:
        parse_period(period)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    return period


# -- locks ----------------------------------------------------------------------------------------


def lock_period_shared(session: Session, period: str) -> None:
    """Ingest side: a shared transaction lock on ``period`` (PostgreSQL; nothing on SQLite). Ingests do
    not block each other; they wait while the period is being finalized, and finalization waits for them."""
    if dialect(session) == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock_shared(hashtext('invoice:' || :period))"), {"period": period}
        )


def lock_for_ingest(session: Session, periods: list[str]) -> None:
    """Before ingest reads finalized invoices: shared period locks (PostgreSQL, in sorted order), or the
    database write lock (SQLite), so no finalization commits between that read and the batch's writes."""
    if dialect(session) == "postgresql":
        for period in periods:
            lock_period_shared(session, period)
    else:
        lock_sqlite_for_write(session)


def lock_billing_periods(session: Session, wanted: Iterable[str]) -> set[str]:
    """For every writer that bills events (ingest, reprice, re-rate): ``wanted`` holds the period of each event
    a billing may land on. Takes the shared locks of those periods, reads the finalized periods, then locks the
    later periods that late billings move to; returns the finalized periods. So a finalization can never commit
    between that read and the writes.

    A late period may be being finalized while we wait for its lock: once we hold it, the finalized periods are
    read again (read committed: a fresh snapshot), until every period a billing lands on is locked and open."""
    locked = set(wanted)
    lock_for_ingest(session, sorted(locked))
    while True:
        finalized = finalized_periods(session)
        late = {billing_period(period, finalized)[0] for period in locked & finalized}
        if late <= locked:
            return finalized
        lock_for_ingest(session, sorted(late - locked))
        locked |= late


def _lock_period_exclusive(session: Session, period: str) -> None:
    if dialect(session) == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext('invoice:' || :period))"), {"period": period})
    else:  # SQLite: take the database write lock now, so nothing commits between our reads and our writes
        lock_sqlite_for_write(session)


# -- drafts ---------------------------------------------------------------------------------------


SelectT = TypeVar("SelectT", bound="Select[*tuple[Any, ...]]")


def _for(stmt: SelectT, *filters: tuple[ColumnElement[Any] | QueryableAttribute[Any], str | None]) -> SelectT:
    """``stmt`` restricted to ``column == value`` for each filter whose value is given (None: any)."""
    for column, value in filters:
        if value is not None:
            stmt = stmt.where(column == value)
    return stmt


def _billed_lines(
    session: Session,
    *,
    period: str | None = None,
    tenant_id: str | None = None,
    user_id: str | None = None,
    users: Sequence[UserPair] = (),
    occurred: tuple[datetime, datetime] | None = None,
) -> dict[UserKey, list[InvoiceLine]]:
    """Billed events grouped per (tenant, user, period) into lines per (extension, model, late); ``users``: only
    theirs, ``occurred``: only events that happened in [start, end) (``invoices_of``)."""
    e = UsageEventRow
    stmt = (
        select(
            e.tenant_id,
            e.user_id,
            e.invoice_period,
            e.extension_id,
            e.model,
            e.is_late,
            func.count(),
            func.sum(e.charge_nanos),
        )
        .where(e.billing_status == "billed", e.invoice_period.is_not(None))
        .group_by(e.tenant_id, e.user_id, e.invoice_period, e.extension_id, e.model, e.is_late)
    )
    stmt = _for(stmt, (e.invoice_period, period), (e.tenant_id, tenant_id), (e.user_id, user_id))
    if users:
        stmt = stmt.where(_pairs(e.tenant_id, e.user_id, users))
    if occurred is not None:
        stmt = stmt.where(e.occurred_at >= occurred[0], e.occurred_at < occurred[1])
    found: dict[UserKey, list[InvoiceLine]] = defaultdict(list)
    for tenant, user, per, extension, model, late, calls, billed in session.execute(stmt):
        # SUM(BIGINT) is NUMERIC on PostgreSQL (a Decimal here): exact, made an int again.
        found[(tenant, user, cast(str, per))].append(
            InvoiceLine(extension, model, bool(late), int(calls), int(billed or 0))
        )
    corrections = _correction_lines(session, period=period, tenant_id=tenant_id, user_id=user_id, users=users)
    for key, lines in corrections.items():
        found[key].extend(lines)
    return found


def _correction_lines(
    session: Session, *, period: str | None, tenant_id: str | None, user_id: str | None, users: Sequence[UserPair]
) -> dict[UserKey, list[InvoiceLine]]:
    """Re-rate corrections posted in a period other than the one that billed their event (its invoice was
    final): the net usage charge they moved (new charges minus reversed ones), per (tenant, user, period,
    extension, model, corrected period). Corrections carry a memo (``rerate:<run>``); nothing else does."""
    t, reversed_, e = aliased(TransferRow), aliased(TransferRow), UsageEventRow
    signed = case((t.kind == "usage_charge", t.amount_nanos), else_=-t.amount_nanos)
    stmt = (
        select(e.tenant_id, e.user_id, t.period, e.extension_id, e.model, e.invoice_period, func.sum(signed))
        .join(e, e.event_id == t.event_id)
        .outerjoin(reversed_, and_(t.kind == "reversal", reversed_.id == t.reverses_id))
        .where(
            t.memo.is_not(None),
            t.period.is_not(None),
            or_(t.kind == "usage_charge", and_(t.kind == "reversal", reversed_.kind == "usage_charge")),
            t.period != e.invoice_period,
        )
        .group_by(e.tenant_id, e.user_id, t.period, e.extension_id, e.model, e.invoice_period)
    )
    stmt = _for(stmt, (t.period, period), (e.tenant_id, tenant_id), (e.user_id, user_id))
    if users:
        stmt = stmt.where(_pairs(e.tenant_id, e.user_id, users))
    found: dict[UserKey, list[InvoiceLine]] = defaultdict(list)
    for tenant, user, per, extension, model, corrected, net in session.execute(stmt):
        if net:
            found[(tenant, user, cast(str, per))].append(InvoiceLine(extension, model, False, 0, int(net), corrected))
    return found


def draft_lines(session: Session, tenant_id: str, user_id: str, period: str) -> list[InvoiceLine]:
    """The lines a draft invoice of ``period`` has now (billed events only; BYOLLM calls are never billed)."""
    check_period(period)
    lines = _billed_lines(session, period=period, tenant_id=tenant_id, user_id=user_id)
    return lines.get((tenant_id, user_id, period), [])


# -- finalized invoices ---------------------------------------------------------------------------


def _stored(session: Session, rows: list[InvoiceRow]) -> dict[UserKey, Invoice]:
    if not rows:
        return {}
    lines: dict[uuid.UUID, list[InvoiceLine]] = defaultdict(list)
    ids = [row.id for row in rows]
    for start in range(0, len(ids), 500):
        stmt = (
            select(InvoiceLineRow)
            .where(InvoiceLineRow.invoice_id.in_(ids[start : start + 500]))
            .order_by(InvoiceLineRow.invoice_id, InvoiceLineRow.line_no)
        )
        for line in session.scalars(stmt):
            lines[line.invoice_id].append(
                InvoiceLine(
                    line.extension_id, line.model, line.is_late, line.calls, line.billed_nanos, line.correction_of
                )
            )
    found = {}
    for row in rows:
        # Stored totals are authoritative: a finalized invoice is read back exactly as it was issued.
        found[(row.tenant_id, row.user_id, row.period)] = Invoice(
            tenant_id=row.tenant_id,
            user_id=row.user_id,
            period=row.period,
            status="finalized",
            lines=tuple(lines[row.id]),
            total_nanos=row.total_nanos,
            rounded_nanos=row.rounded_nanos,
            residue_nanos=row.residue_nanos,
            finalized_at=row.finalized_at,
        )
    return found


def _finalized(
    session: Session,
    *,
    period: str | None = None,
    tenant_id: str | None = None,
    user_id: str | None = None,
    users: Sequence[UserPair] = (),
) -> dict[UserKey, Invoice]:
    stmt = _for(
        select(InvoiceRow).where(InvoiceRow.status == "finalized"),
        (InvoiceRow.period, period),
        (InvoiceRow.tenant_id, tenant_id),
        (InvoiceRow.user_id, user_id),
    )
    if users:
        stmt = stmt.where(_pairs(InvoiceRow.tenant_id, InvoiceRow.user_id, users))
    return _stored(session, list(session.scalars(stmt)))


def get_invoice(session: Session, tenant_id: str, user_id: str, period: str) -> Invoice:
    """The finalized invoice if there is one, else the draft as of now (empty when nothing was billed)."""
    check_period(period)
    key = (tenant_id, user_id, period)
    finalized = _finalized(session, period=period, tenant_id=tenant_id, user_id=user_id)
    if key in finalized:
        return finalized[key]
    return build_invoice(tenant_id, user_id, period, draft_lines(session, tenant_id, user_id, period), "draft", None)


def existing_invoice(session: Session, tenant_id: str, user_id: str, period: str) -> Invoice:
    """``get_invoice``, or ``NotFoundError`` when there is none: no billed event in the period and not finalized
    (an empty draft is no invoice; a mistyped tenant or user must not export one)."""
    invoice = get_invoice(session, tenant_id, user_id, period)
    if not invoice.lines and not invoice.is_finalized:
        raise NotFoundError(f"no invoice for tenant {tenant_id}, user {user_id}, period {period}")
    return invoice


def list_invoices(session: Session, period: str | None = None, tenant_id: str | None = None) -> list[Invoice]:
    """Every invoice with billed events or a finalized invoice, by period, tenant, user."""
    if period is not None:
        check_period(period)
    invoices = _finalized(session, period=period, tenant_id=tenant_id)
    for key, lines in _billed_lines(session, period=period, tenant_id=tenant_id).items():
        if key not in invoices:
            invoices[key] = build_invoice(*key, lines, "draft", None)
    return [invoices[key] for key in sorted(invoices, key=lambda k: (k[2], k[0], k[1]))]


def invoices_of(session: Session, period: str, users: Sequence[UserPair], since: datetime) -> list[Invoice]:
    """The invoices of ``period`` of ``users`` ((tenant, user) pairs), in their order, leaving out those without
    one: each finalized invoice, else the draft as of now. ``since``: no event billed in ``period`` happened
    before it (``periods.earliest_billed_in``), so only the users' events from then on are read."""
    check_period(period)
    if not users:
        return []
    found = _finalized(session, period=period, users=users)
    occurred = (since, period_bounds(period)[1])  # an event is billed in its month or later, never earlier
    for key, lines in _billed_lines(session, period=period, users=users, occurred=occurred).items():
        if key not in found:
            found[key] = build_invoice(*key, lines, "draft", None)
    return [found[key] for key in ((tenant, user, period) for tenant, user in users) if key in found]


def _pairs(tenant_column: Any, user_column: Any, users: Sequence[UserPair]) -> ColumnElement[bool]:
    """Rows of one of ``users``: per tenant, its users' ids in one ``IN`` (an index range each on PostgreSQL)."""
    by_tenant: dict[str, list[str]] = defaultdict(list)
    for tenant, user in users:
        by_tenant[tenant].append(user)
    return or_(*(and_(tenant_column == tenant, user_column.in_(ids)) for tenant, ids in by_tenant.items()))


@dataclass(frozen=True, slots=True)
class Finalization:
    closed_now: bool  # this transaction closed the period (False: it was closed already, e.g. by a concurrent run)
    issued: list[Invoice]  # the invoices it finalized


def finalize_period(
    session: Session, period: str, now: datetime, grace: timedelta, *, force: bool = False
) -> list[Invoice]:
    """Finalize every not-yet-finalized invoice of ``period`` that has billed events; return those it
    finalized (empty when run again: idempotent). Refuses before the period's end + ``grace`` unless ``force``."""
    return finalize(session, period, now, grace, force=force).issued


def finalize(session: Session, period: str, now: datetime, grace: timedelta, *, force: bool = False) -> Finalization:
    """``finalize_period``, also telling whether the period was closed by this call, as read under the period's lock
    (read before it, a finalization that waited for a concurrent one would take the close for its own)."""
    check_period(period)
    if period_of(now) < period:  # "2027-11" for "2026-11": every later event of that month would be billed late
        raise PeriodOpenError(
            f"period {period} has not started (it is {period_of(now)}): a month cannot be finalized before it "
            "begins, even with --force"
        )
    if not force and not finalizable(period, now, grace):
        at = finalizable_at(period, grace)
        raise PeriodOpenError(
            f"period {period} cannot be finalized before its end plus the grace period of "
            f"{grace.total_seconds() / 3600:g} h, at {at.isoformat() if at else 'a time past the year 9999'} "
            "(use --force to finalize it anyway)"
        )
    _lock_period_exclusive(session, period)
    closed_now = session.get(FinalizedPeriodRow, period) is None
    if closed_now:  # from now on the month is closed for every user
        session.add(FinalizedPeriodRow(period=period, finalized_at=now))
    done = set(_finalized(session, period=period))
    issued = []
    for key, lines in sorted(_billed_lines(session, period=period).items()):
        if key in done:
            continue
        invoice = build_invoice(*key, lines, "finalized", now)
        _insert(session, invoice)
        issued.append(invoice)
    session.flush()
    return Finalization(closed_now, issued)


def _insert(session: Session, invoice: Invoice) -> None:
    ident = invoice_id(invoice.tenant_id, invoice.user_id, invoice.period)
    session.add(
        InvoiceRow(
            id=ident,
            tenant_id=invoice.tenant_id,
            user_id=invoice.user_id,
            period=invoice.period,
            status="finalized",
            currency=CURRENCY,
            total_nanos=invoice.total_nanos,
            rounded_nanos=invoice.rounded_nanos,
            residue_nanos=invoice.residue_nanos,
            finalized_at=invoice.finalized_at,
        )
    )
    session.add_all(
        InvoiceLineRow(
            invoice_id=ident,
            line_no=number,
            extension_id=line.extension_id,
            model=line.model,
            is_late=line.is_late,
            calls=line.calls,
            billed_nanos=line.billed_nanos,
            correction_of=line.correction_of,
        )
        for number, line in enumerate(invoice.lines, start=1)
    )


# -- ledger ---------------------------------------------------------------------------------------


def in_period(period: str) -> ColumnElement[bool]:
    """The transfers of ``period``: those billed in it (usage and their reversals carry it), and those without a
    billing period (credits, top-ups, adjustments) posted during it, so that the periods' exports add up to the
    balances."""
    start, end = period_bounds(check_period(period))
    undated = and_(TransferRow.period.is_(None), TransferRow.created_at >= start, TransferRow.created_at < end)
    return or_(TransferRow.period == period, undated)
