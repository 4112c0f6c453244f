"""Monthly invoices (pure): one per (tenant, user, calendar month in UTC).

An invoice is a draft while its period is open and during the grace period after it; then it is
finalized and never changes again (late events go to the next open invoice as labelled late lines, and so do
re-rate corrections of calls it billed, as labelled correction lines).
Lines are per (extension, model, late); the total is their exact sum in nanos, rounded once, half-even,
to cents, and the rounding residue (total - rounded) is shown.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from metering.billing.money import round_cents

InvoiceStatus = Literal["draft", "finalized"]
STATUSES: tuple[InvoiceStatus, ...] = ("draft", "finalized")
_NAMESPACE = uuid.UUID("4d0c8f6e-2b7a-4f0e-9d59-8a1e6c3b7f20")


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    extension_id: str
    model: str
    is_late: bool
    calls: int
    billed_nanos: int
    # A re-rate correction of calls billed on the (finalized) invoice of this period: calls 0, the net change.
    correction_of: str | None = None


@dataclass(frozen=True, slots=True)
class Invoice:
    tenant_id: str
    user_id: str
    period: str
    status: InvoiceStatus
    lines: tuple[InvoiceLine, ...]
    total_nanos: int
    rounded_nanos: int
    residue_nanos: int
    finalized_at: datetime | None

    @property
    def calls(self) -> int:
        return sum(line.calls for line in self.lines)

    @property
    def is_finalized(self) -> bool:
        return self.status == "finalized"


def line_order(line: InvoiceLine) -> tuple[bool, bool, str, str, str]:
    """Regular lines first, then late ones, then corrections of earlier invoices; each by extension, then model."""
    return (line.correction_of is not None, line.is_late, line.correction_of or "", line.extension_id, line.model)


def sort_lines(lines: Iterable[InvoiceLine]) -> tuple[InvoiceLine, ...]:
    return tuple(sorted(lines, key=line_order))


def build_invoice(
    tenant_id: str,
    user_id: str,
    period: str,
    lines: Iterable[InvoiceLine],
    status: InvoiceStatus,
    finalized_at: datetime | None,
) -> Invoice:
    """The invoice of ``lines``: total = their exact sum, rounded once (half-even) to cents, residue kept."""
    if status not in STATUSES:
        raise ValueError(f"an invoice is 'draft' or 'finalized', not {status!r}")
    if (status == "finalized") != (finalized_at is not None):
        raise ValueError("a finalized invoice has a finalized_at, a draft has none")
    ordered = sort_lines(lines)
    total = sum((line.billed_nanos for line in ordered), 0)
    rounded, residue = round_cents(total)
    return Invoice(
        tenant_id=tenant_id,
        user_id=user_id,
        period=period,
        status=status,
        lines=ordered,
        total_nanos=total,
        rounded_nanos=rounded,
        residue_nanos=residue,
        finalized_at=finalized_at,
    )


def invoice_id(tenant_id: str, user_id: str, period: str) -> uuid.UUID:
    """The id of the invoice of (tenant, user, period): derived, so two finalizers can never mint two.

    The parts are joined with ``\x1f``, which ids may hold: then ('a\x1fb', 'c') and ('a', 'b\x1fc') would share
    an invoice (and fail that month's finalization). Such ids are named by their JSON array instead, which holds
    no raw ``\x1f`` and so never equals a join; the ids of all other invoices are unchanged."""
    if "\x1f" in tenant_id or "\x1f" in user_id:
        return uuid.uuid5(_NAMESPACE, json.dumps([tenant_id, user_id, period]))
    return uuid.uuid5(_NAMESPACE, "\x1f".join((tenant_id, user_id, period)))
