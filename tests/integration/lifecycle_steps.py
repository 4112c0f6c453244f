"""Steps the billing-lifecycle property tests share (test_billing_lifecycle_properties, test_usage_properties)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy.orm import Session

from metering.billing import invoice_store
from metering.billing.overrides import add_override


def finalize_step(session: Session, period: str, now: datetime) -> None:
    """Finalize ``period`` at ``now``, forced (any month that has begun, in any order)."""
    invoice_store.finalize_period(session, period, now, timedelta(hours=72), force=True)


def override_step(session: Session, number: int, provider: str, price: str, markup: Decimal | None) -> None:
    """A catch-all override for ``provider``, output at 4x the input price; a later step's wins (a later start)."""
    start = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=number)
    add_override(session, provider=provider, model_pattern="*", effective_from=start, effective_to=None,
                 input_mtok=Decimal(price), output_mtok=Decimal(price) * 4, markup_pct=markup,
                 id=f"o{number}")  # fmt: skip
