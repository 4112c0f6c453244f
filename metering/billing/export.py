"""CSV exports: one invoice, and one period's ledger. Amounts are exact: USD with 9 decimals, and nanos."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from metering.billing import invoice_store
from metering.billing.invoices import Invoice
from metering.billing.money import NANOS_PER_USD

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


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def invoice_csv(invoice: Invoice) -> str:
    """One row per line, then the exact total, the total rounded (half-even) to cents and the residue."""
    who = (invoice.period, invoice.tenant_id, invoice.user_id, invoice.status)
    rows: list[tuple[Any, ...]] = [
        (
            *who,
            "line",
            line.extension_id,
            line.model,
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


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def ledger_csv(session: Session, period: str) -> str:
    """Every transfer of ``period``, ordered by (created_at, id)."""
    rows = (
        (
            _text(t.id),
            _text(t.created_at),
            t.kind,
            t.debit_account_id,
            t.credit_account_id,
            usd(t.amount_nanos),
            t.amount_nanos,
            _text(t.event_id),
            _text(t.reverses_id),
            _text(t.idempotency_key),
            _text(t.memo),
        )
        for t in invoice_store.period_transfers(session, period)
    )
    return _csv(LEDGER_COLUMNS, rows)
