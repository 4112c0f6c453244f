"""The invoice list a page at a time (``GET /v1/invoices``): keyset pages by (period, tenant, user), each read
without going through every billed event.

A page picks its users first, from tables far smaller than the events, then computes only their invoices:

- the candidates of a period P: the (tenant, user) pairs of ``user_usage_daily`` (one row per user and UTC day
  with an event, written by ingest in the events' transaction) from the first day of ``earliest_billed_in(P)`` to
  the end of P, and those of P's finalized invoices. An event billed in P happened in P or, billed late (or
  corrected by a re-rate) in P, in one of the finalized months just before it: every user with an invoice in P is
  a candidate. Not every candidate has one (only unpriced or BYOLLM calls, or events of those months billed in
  their own month): a page examines at most ``limit`` candidates, so it may hold fewer invoices (even none) and
  still have a next cursor;
- their invoices (``invoice_store.invoices_of``): the finalized ones, else drafts from their billed events of that
  window (read through the index on (tenant, user, occurred_at)) and the period's re-rate corrections.

Text is ordered by code point on both databases (PostgreSQL's "C" collation), as ``list_invoices`` sorts: the
pages walked in turn are that list, in its order. The cursor is the last candidate examined, as JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date

from sqlalchemy import func, select, tuple_, union
from sqlalchemy.orm import Session

from metering.billing import invoice_store
from metering.billing.invoice_store import UserPair
from metering.billing.invoices import Invoice
from metering.billing.ledger_queries import Page, check_limit, decode_text_cursor, encode_text_cursor, invalid_cursor
from metering.billing.periods import billing_period, earliest_billed_in, next_period, parse_period, period_bounds
from metering.billing.store import finalized_periods
from metering.db.collation import by_code_point
from metering.db.models import InvoiceRow, UserUsageDailyRow

InvoiceKey = tuple[str, str, str]  # (period, tenant_id, user_id): the list's order
_CURSOR = "invoice|"


def encode_invoice_cursor(key: InvoiceKey) -> str:
    return encode_text_cursor(_CURSOR, json.dumps(list(key), ensure_ascii=False, separators=(",", ":")))


def decode_invoice_cursor(cursor: str) -> InvoiceKey:
    """The (period, tenant, user) a cursor points after; anything else is a 422."""
    try:
        key = json.loads(decode_text_cursor(_CURSOR, cursor))
        if not (isinstance(key, list) and len(key) == 3 and all(isinstance(part, str) and part for part in key)):
            raise ValueError("not an invoice key")
        parse_period(key[0])
        if "\x00" in key[1] + key[2]:  # no stored id holds one (PostgreSQL refuses it)
            raise ValueError("a NUL")
        (key[1] + key[2]).encode()  # a lone surrogate ("\ud800") names no id either, and fails to encode
    except (ValueError, UnicodeEncodeError):
        raise invalid_cursor() from None
    return key[0], key[1], key[2]


def invoices_page(
    session: Session,
    *,
    period: str | None = None,
    tenant_id: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page[Invoice]:
    """Invoices (finalized ones, and the drafts as of now) by (period, tenant, user), of ``period`` (else every
    period) and ``tenant_id`` (else every tenant), at most ``limit`` candidates examined a page."""
    limit = check_limit(limit)
    if period is not None:
        invoice_store.check_period(period)
    after = decode_invoice_cursor(cursor) if cursor is not None else None
    if after is not None and period is not None and after[0] != period:
        raise invalid_cursor()  # the cursor of another period's walk
    finalized = finalized_periods(session)
    months = [period] if period is not None else list(_months(session, tenant_id, finalized))
    if after is not None:
        months = [month for month in months if month >= after[0]]
    items: list[Invoice] = []
    left = limit
    for index, month in enumerate(months):
        since = earliest_billed_in(month, finalized)
        resume = (after[1], after[2]) if after is not None and after[0] == month else None
        users = _candidates(session, month, since, tenant_id, resume, left + 1)
        more = len(users) > left
        users = users[:left]
        items += invoice_store.invoices_of(session, month, users, period_bounds(since)[0])
        left -= len(users)
        if more or (left == 0 and index < len(months) - 1):
            return Page(items, encode_invoice_cursor((month, *users[-1])))
    return Page(items, None)


def _months(session: Session, tenant_id: str | None, finalized: set[str]) -> Iterator[str]:
    """Every period that may hold an invoice (of ``tenant_id``), in order: from the month of the first day with
    usage to the one its last day's events are billed in (a late event or a re-rate correction lands no later),
    widened to the finalized invoices' periods."""
    d, i = UserUsageDailyRow, InvoiceRow
    days = select(func.min(d.day), func.max(d.day))
    issued = select(func.min(i.period), func.max(i.period))
    if tenant_id is not None:
        days, issued = days.where(d.tenant_id == tenant_id), issued.where(i.tenant_id == tenant_id)
    first_day, last_day = session.execute(days).one()
    first_issued, last_issued = session.execute(issued).one()
    firsts = [p for p in (_month(first_day), first_issued) if p is not None]
    lasts = [p for p in (_month(last_day), last_issued) if p is not None]
    if not firsts:
        return
    month, last = min(firsts), max(billing_period(p, finalized)[0] for p in lasts)
    while month <= last:
        yield month
        month = next_period(month)


def _month(day: date | None) -> str | None:
    return None if day is None else f"{day.year:04d}-{day.month:02d}"


def _candidates(
    session: Session, period: str, since: str, tenant_id: str | None, after: UserPair | None, limit: int
) -> list[UserPair]:
    """The first ``limit`` (tenant, user) pairs after ``after`` that may have an invoice in ``period``: those with
    usage from the start of ``since`` to the end of ``period``, and those with a finalized invoice of it."""
    d, i = UserUsageDailyRow, InvoiceRow
    start, end = period_bounds(since)[0].date(), period_bounds(period)[1].date()
    branches = []
    for stmt, tenant, user in (
        (select(d.tenant_id, d.user_id).where(d.day >= start, d.day < end), d.tenant_id, d.user_id),
        (select(i.tenant_id, i.user_id).where(i.period == period), i.tenant_id, i.user_id),
    ):
        if tenant_id is not None:
            stmt = stmt.where(tenant == tenant_id)
        if after is not None:
            stmt = stmt.where(tuple_(by_code_point(session, tenant), by_code_point(session, user)) > tuple_(*after))
        branches.append(stmt)
    pairs = union(*branches).subquery()
    order = (by_code_point(session, pairs.c.tenant_id), by_code_point(session, pairs.c.user_id))
    rows = session.execute(select(pairs.c.tenant_id, pairs.c.user_id).order_by(*order).limit(limit))
    return [(tenant, user) for tenant, user in rows]
