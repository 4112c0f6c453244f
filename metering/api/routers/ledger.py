"""The ledger read side (scope ``read``): transfers, balances, invoices and CSV exports, held events, quotes.

Tenant-bound tokens see their tenant's user wallets and the transfers touching them, its invoices and its
held events; platform and provider accounts only to unbound tokens. Another tenant's invoice is a 404.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Generator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session, sessionmaker

from metering.api.closing_stream import ClosingStream
from metering.api.deps import AppSettings, DbSession, Reader
from metering.api.problems import problem_responses
from metering.api.read_access import tenant_scope
from metering.api.read_schemas import (
    Balance,
    Balances,
    InvoiceDetail,
    Invoices,
    InvoiceSummary,
    QuoteOut,
    TransferPage,
    UnpricedPage,
)
from metering.api.validators import FilterText, UtcDatetime
from metering.auth import TokenPrincipal
from metering.billing import export, invoice_pages, invoice_store, ledger_queries, store
from metering.billing.invoices import Invoice
from metering.billing.ledger_queries import MAX_PAGE
from metering.billing.pricing import over_call_limit
from metering.billing.rates import RateCards
from metering.db.snapshot import read_snapshot
from metering.errors import InvalidInputError, NotFoundError, TooManyExportsError, UnpricedModelError
from metering.events import MAX_TOKENS, MAX_WEB_SEARCHES

router = APIRouter(tags=["ledger"])

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"Page size, 1 to {MAX_PAGE}.")]
# A cursor names a row: base64url of at most an account id (1,000 characters, 4 UTF-8 bytes each) and a prefix, or
# of an invoice's period, tenant and user as JSON (two ids of 200 characters: under 2,500 bytes, escapes included).
MAX_CURSOR = 6000
Cursor = Annotated[
    str | None, Query(max_length=MAX_CURSOR, description="The `next_cursor` of the previous page (opaque).")
]
Tokens = Annotated[int, Query(ge=0, le=MAX_TOKENS)]
Searches = Annotated[int, Query(ge=0, le=MAX_WEB_SEARCHES)]
TransferKinds = Literal["usage_charge", "provider_cost", "credit", "adjustment", "reversal"]
CSV = "text/csv"
MAX_LEDGER_STREAMS = 4  # ledger exports streamed at once by one process: each holds a pooled connection
_CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {CSV: {"schema": {"type": "string"}}}, "description": "CSV, with a header row."}
}


def _attachment(filename: str) -> dict[str, str]:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename)  # ids are free text: never raw in a header
    return {"Content-Disposition": f'attachment; filename="{safe}"'}


def _csv(text: str, filename: str) -> Response:
    return Response(text, media_type=CSV, headers=_attachment(filename))


@router.get(
    "/transfers",
    summary="Ledger transfers, a page at a time",
    description=(
        "Requires the `read` scope. Transfers in posting order (created_at, id), filtered by account (debit or "
        "credit), kind, event and billing period; keyset pages: pass `next_cursor` back as `cursor` until it is "
        "null. A tenant-bound token sees only the transfers touching its users' wallets."
    ),
    responses=problem_responses(401, 403, 422, 503),
)
def list_transfers(
    principal: Reader,
    session: DbSession,
    account_id: FilterText = None,
    kind: TransferKinds | None = None,
    event_id: uuid.UUID | None = None,
    period: Annotated[
        str | None,
        Query(
            description="YYYY-MM: the billing period a transfer carries, else (credits, adjustments) the UTC month "
            "it was posted in."
        ),
    ] = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> TransferPage:
    page = ledger_queries.transfers_page(
        session,
        tenant_id=principal.tenant_id,
        account_id=account_id,
        kind=kind,
        event_id=event_id,
        period=period,
        limit=limit,
        cursor=cursor,
    )
    return TransferPage.of(page)


@router.get(
    "/balances",
    summary="Account balances",
    description=(
        "Requires the `read` scope. Every account's balance (credits minus debits), or with `tenant_id` that "
        "tenant's user wallets, by account id. A tenant-bound token sees only its tenant's wallets (another tenant "
        "is `403`). Keyset pages of up to `limit` accounts: pass `next_cursor` back as `cursor` until it is null."
    ),
    responses=problem_responses(401, 403, 422, 503),
)
def get_balances(
    principal: Reader,
    session: DbSession,
    tenant_id: FilterText = None,
    limit: Limit = MAX_PAGE,
    cursor: Cursor = None,
) -> Balances:
    page = ledger_queries.balances_page(
        session, tenant_id=tenant_scope(principal, tenant_id), limit=limit, cursor=cursor
    )
    return Balances(accounts=[Balance.of(a) for a in page.items], next_cursor=page.next_cursor)


@router.get(
    "/invoices",
    summary="Invoices (drafts and finalized), a page at a time",
    description=(
        "Requires the `read` scope. Every invoice with billed events or finalized, by period, tenant, user: "
        "totals without lines. A tenant-bound token sees only its tenant (another tenant is `403`). Keyset pages: "
        "pass `next_cursor` back as `cursor` until it is null; a page examines up to `limit` users and may hold "
        "fewer invoices, even none, before the last."
    ),
    responses=problem_responses(401, 403, 422, 503),
)
def get_invoices(
    principal: Reader,
    session: DbSession,
    period: Annotated[str | None, Query(description="Billing period, YYYY-MM.")] = None,
    tenant_id: FilterText = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Invoices:
    tenant_id = tenant_scope(principal, tenant_id)
    read_snapshot(session)
    page = invoice_pages.invoices_page(session, period=period, tenant_id=tenant_id, limit=limit, cursor=cursor)
    return Invoices(invoices=[InvoiceSummary.of(i) for i in page.items], next_cursor=page.next_cursor)


def _invoice(session: Session, principal: TokenPrincipal, tenant_id: str, user_id: str, period: str) -> Invoice:
    """The invoice, or 404 when it has no billed event and is not finalized, or is another tenant's."""
    if not principal.may_act_for(tenant_id):
        invoice_store.check_period(period)  # the same 422 as for an own tenant's malformed period
        raise NotFoundError(f"no invoice for tenant {tenant_id}, user {user_id}, period {period}")
    read_snapshot(session)
    return invoice_store.existing_invoice(session, tenant_id, user_id, period)


# Registered before the JSON route: "{period}" alone would also match "2026-11.csv".
@router.get(
    "/invoices/{tenant_id}/{user_id}/{period}.csv",
    summary="One invoice as CSV",
    description=(
        "Requires the `read` scope. The lines, then the exact total, the total rounded to cents and the residue "
        "(`text/csv`). `404` when there is no such invoice or it is another tenant's."
    ),
    response_class=Response,
    responses=_CSV_RESPONSE | problem_responses(401, 403, 404, 422, 503),
)
def get_invoice_csv(principal: Reader, session: DbSession, tenant_id: str, user_id: str, period: str) -> Response:
    invoice = _invoice(session, principal, tenant_id, user_id, period)
    return _csv(export.invoice_csv(invoice), f"invoice-{tenant_id}-{user_id}-{period}.csv")


@router.get(
    "/invoices/{tenant_id}/{user_id}/{period}",
    summary="One invoice, with its lines",
    description=(
        "Requires the `read` scope. The finalized invoice, or the draft as of now: lines per extension and model "
        "(late lines apart), the exact total, the total rounded once (half-even) to cents and the residue. `404` "
        "when the user has no billed event in the period and no finalized invoice, or it is another tenant's."
    ),
    responses=problem_responses(401, 403, 404, 422, 503),
)
def get_invoice(principal: Reader, session: DbSession, tenant_id: str, user_id: str, period: str) -> InvoiceDetail:
    return InvoiceDetail.of(_invoice(session, principal, tenant_id, user_id, period))


_EXPORT_503 = (
    "The database is unreachable or locked (`database_unavailable`), or as many exports as a process streams at "
    "once are under way (`too_many_exports`): retry later."
)


@router.get(
    "/ledger/{period}.csv",
    summary="A billing period's ledger as CSV",
    description=(
        "Requires the `read` scope. Every transfer of the period in posting order (`text/csv`, streamed); for a "
        "tenant-bound token, only the transfers touching its users' wallets. Each export holds a database "
        "connection while it is read: at most 4 at once per process, more are `503` `too_many_exports`."
    ),
    response_class=Response,
    responses=_CSV_RESPONSE | problem_responses(401, 403, 422, 503, described={503: _EXPORT_503}),
)
def get_ledger_csv(principal: Reader, request: Request, period: str) -> Response:
    invoice_store.check_period(period)
    suffix = f"-{principal.tenant_id}" if principal.tenant_id else ""
    state = request.app.state
    chunks = _ledger_chunks(state.sessions, state.ledger_streams, period, principal.tenant_id)
    first = next(chunks)  # the query runs here: a database that fails it is a problem answer, not a cut-off CSV
    return ClosingStream(first, chunks, media_type=CSV, headers=_attachment(f"ledger-{period}{suffix}.csv"))


def _ledger_chunks(
    sessions: sessionmaker[Session], slots: threading.BoundedSemaphore, period: str, tenant_id: str | None
) -> Generator[str, None, None]:
    """The export streamed from its own session (the request's commits before the body is sent). A failure
    mid-stream ends the response without its last chunk: the client sees an incomplete transfer, never a short
    CSV that looks whole. A client that goes away mid-stream ends it too (``ClosingStream``): the session and its
    connection are released at once.

    Each export holds a connection for as long as its client takes to read it: at most ``MAX_LEDGER_STREAMS`` at
    once (of a pool of 15), else ``TooManyExportsError``; unbounded, a few slow downloads took every connection
    and every other request waited 30 s for one, then failed (ingest included)."""
    if not slots.acquire(blocking=False):
        raise TooManyExportsError(
            f"{MAX_LEDGER_STREAMS} ledger exports are under way (each holds a database connection); retry later"
        )
    try:
        with sessions() as session:
            yield from ledger_queries.ledger_csv_chunks(session, period, tenant_id)
    finally:
        slots.release()


@router.get(
    "/events/unpriced",
    summary="Events held without a price",
    description=(
        "Requires the `read` scope. Events stored as `unpriced` (no override and no genai-prices price when "
        "ingested; never billed at $0), by (occurred_at, event_id), a keyset page at a time. `metering billing "
        "reprice` prices them once an override exists. A tenant-bound token sees only its tenant's."
    ),
    responses=problem_responses(401, 403, 422, 503),
)
def list_unpriced_events(
    principal: Reader, session: DbSession, limit: Limit = 100, cursor: Cursor = None
) -> UnpricedPage:
    return UnpricedPage.of(
        ledger_queries.unpriced_page(session, tenant_id=principal.tenant_id, limit=limit, cursor=cursor)
    )


@router.get(
    "/prices/quote",
    summary="Price a call",
    description=(
        "Requires the `read` scope. What a call with these token counts costs and would be charged, with the "
        "current price book (admin overrides, then genai-prices) at `at` (default: now; a time without offset "
        "is UTC) and the platform markup, exactly as ingest prices it. Token counts follow OpenTelemetry: "
        "`input_tokens` includes the cache reads and writes, `cache_write_tokens` the 1-hour cache writes "
        "(`cache_write_1h_tokens`); `web_searches` are priced per search. An unknown model, or a call with web "
        "searches whose price has none for them, is `404` `unpriced_model`; a call "
        "priced above the per-call limit ($10,000), which ingest rejects, is `422` `invalid_input`."
    ),
    responses=problem_responses(401, 403, 404, 422, 503),
)
def get_quote(
    principal: Reader,
    session: DbSession,
    settings: AppSettings,
    provider: Annotated[str, Query(min_length=1)],  # no event has an empty provider or model: none is priced
    model: Annotated[str, Query(min_length=1)],
    input_tokens: Tokens = 0,
    output_tokens: Tokens = 0,
    cache_read_tokens: Tokens = 0,
    cache_write_tokens: Tokens = 0,
    cache_write_1h_tokens: Tokens = 0,
    web_searches: Searches = 0,
    at: UtcDatetime | None = None,
) -> QuoteOut:
    if cache_read_tokens + cache_write_tokens > input_tokens:
        raise InvalidInputError(
            "cache_read_tokens + cache_write_tokens must be within input_tokens (input_tokens includes them)"
        )
    if cache_write_1h_tokens > cache_write_tokens:
        raise InvalidInputError(
            "cache_write_1h_tokens must be within cache_write_tokens (cache_write_tokens includes them)"
        )
    at = datetime.now(UTC) if at is None else at
    cards = RateCards(store.load_price_book(session, settings.billing.markup_pct))
    tokens = (input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, web_searches)
    quote = cards.quote(provider, model, at, *tokens)
    if quote is None:
        card = cards.card(provider, model, at) if web_searches else None
        if card is not None:  # the tokens have a price, the searches none
            source = f"price override {card.source_version!r}" if card.source == "override" else "genai-prices"
            raise UnpricedModelError(
                f"{source} has no price for web searches for provider {provider!r}, model {model!r} at "
                f"{at.isoformat()}: calls with searches are held as unpriced (add a price override with "
                "web_search_per_k)"
            )
        raise UnpricedModelError(
            f"no price for provider {provider!r}, model {model!r} at {at.isoformat()}: calls to it are held as "
            "unpriced (add a price override)"
        )
    too_much = over_call_limit(quote)
    if too_much is not None:  # such an event is rejected at ingest: never charged what a 200 would say
        raise InvalidInputError(f"ingest rejects a call {too_much}")
    return QuoteOut.of(quote, provider=provider, model=model, at=at, tokens=tokens)
