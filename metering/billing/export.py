"""CSV exports: one invoice, and one period's ledger. Amounts are exact: USD with 9 decimals, and nanos.

Text cells (ids, models, keys, memos: all of them can come from a client) that begin with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return are prefixed with ``'``, so a spreadsheet opening the file shows them as text
and never runs them as a formula (CSV injection). Amounts are numbers and are never prefixed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from itertools import islice
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from metering.billing import invoice_store
from metering.billing.invoices import Invoice
from metering.billing.money import NANOS_PER_USD
from metering.db.models import TransferRow

INVOICE_COLUMNS = (
    "period",
    "tenant_id",
    "user_id",
    "status",
    "row",
    "extension_id",
    "model",
    "is_late",
    "correction_of",
    "calls",
    "amount_usd",
    "amount_nanos",
)
LEDGER_COLUMNS = (
    "id",
    "created_at",
    "kind",
    "debit_account_id",
    "credit_account_id",
    "amount_usd",
    "amount_nanos",
    "event_id",
    "reverses_id",
    "idempotency_key",
    "memo",
)


def usd(nanos: int) -> str:
    """Exact decimal USD, 9 decimals, never an exponent: ``5`` -> ``"0.000000005"`` (``format(from_nanos(nanos),
    "f")``, done with integers: read paths format thousands of amounts per request)."""
    if not isinstance(nanos, int) or isinstance(nanos, bool):
        raise TypeError(f"usd expects an int, got {type(nanos).__name__}")
    whole, fraction = divmod(abs(nanos), NANOS_PER_USD)
    return f"{'-' if nanos < 0 else ''}{whole}.{fraction:09d}"


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def text_cell(value: Any) -> str:
    """A text cell a spreadsheet shows as text: ``"=1+1"`` -> ``"'=1+1"``; ``None`` -> ``""``."""
    if value is None:
        return ""
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    return "".join(csv_chunks(header, rows))


CHUNK_ROWS = 2_000  # rows per chunk of a streamed CSV (≈ 0.5 MB of a ledger)


def csv_chunks(header: Sequence[str], rows: Iterable[Sequence[Any]], chunk_rows: int | None = None) -> Iterator[str]:
    """The CSV text a chunk at a time: the header row with the first ``chunk_rows`` rows (default
    ``CHUNK_ROWS``), then ``chunk_rows`` rows per chunk."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    iterator = iter(rows)
    while True:
        writer.writerows(islice(iterator, chunk_rows))
        text = buffer.getvalue()
        if not text:
            return
        yield text
        buffer.seek(0)
        buffer.truncate()


def invoice_csv(invoice: Invoice) -> str:
    """One row per line, then the exact total, the total rounded (half-even) to cents and the residue."""
    who = (invoice.period, text_cell(invoice.tenant_id), text_cell(invoice.user_id), invoice.status)
    rows: list[tuple[Any, ...]] = [
        (
            *who,
            "line",
            text_cell(line.extension_id),
            text_cell(line.model),
            str(line.is_late).lower(),
            line.correction_of or "",
            line.calls,
            usd(line.billed_nanos),
            line.billed_nanos,
        )
        for line in invoice.lines
    ]
    rows.append((*who, "total", "", "", "", "", invoice.calls, usd(invoice.total_nanos), invoice.total_nanos))
    rows.append((*who, "rounded_total", "", "", "", "", "", usd(invoice.rounded_nanos), invoice.rounded_nanos))
    rows.append((*who, "residue", "", "", "", "", "", usd(invoice.residue_nanos), invoice.residue_nanos))
    return _csv(INVOICE_COLUMNS, rows)


# The columns a ledger export reads (rows, not ORM objects: a period can hold millions of transfers).
LEDGER_SELECT = select(*(TransferRow.__table__.c[name] for name in LEDGER_COLUMNS if name not in ("amount_usd",)))


def transfers_csv(transfers: Iterable[Any]) -> str:
    """Transfers (rows or objects with the ``LEDGER_COLUMNS`` attributes) in ``LEDGER_COLUMNS``, in the order
    given."""
    return "".join(transfers_csv_chunks(transfers))


def transfers_csv_chunks(transfers: Iterable[Any]) -> Iterator[str]:
    """``transfers_csv`` a chunk at a time."""
    rows = (
        (
            text_cell(t.id),
            text_cell(t.created_at),
            text_cell(t.kind),
            text_cell(t.debit_account_id),
            text_cell(t.credit_account_id),
            usd(t.amount_nanos),
            t.amount_nanos,
            text_cell(t.event_id),
            text_cell(t.reverses_id),
            text_cell(t.idempotency_key),
            text_cell(t.memo),
        )
        for t in transfers
    )
    return csv_chunks(LEDGER_COLUMNS, rows)


def ledger_csv(session: Session, period: str) -> str:
    """Every transfer of ``period``, ordered by (created_at, id)."""
    return "".join(ledger_csv_chunks(session, period))


def ledger_csv_chunks(session: Session, period: str, *where: Any) -> Iterator[str]:
    """``ledger_csv`` a chunk at a time, read as it is written (``yield_per``: a server-side cursor on
    PostgreSQL), so an export's memory does not grow with the period; ``where``: more conditions."""
    stmt = (
        LEDGER_SELECT.where(invoice_store.in_period(period), *where)
        .order_by(TransferRow.created_at, TransferRow.id)
        .execution_options(yield_per=CHUNK_ROWS)
    )
    return transfers_csv_chunks(session.execute(stmt))
