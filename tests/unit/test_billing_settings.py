"""The platform markup setting: refused at startup when the ledger could not store it on every priced event."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from metering.config import BillingSettings


@pytest.mark.parametrize("text", ["20", "33.333333333", "-100", "0.000000001", "999999999.999999999", "1E+2"])
def test_markups_the_ledger_stores_are_accepted(text: str) -> None:
    markup = BillingSettings(markup_pct=text).markup_pct  # type: ignore[arg-type]
    assert markup == Decimal(text) and len(str(markup)) <= 32  # usage_events.markup_pct is VARCHAR(32)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("33.33333333333333333333333333333333", "no more than 18 digits"), ("0.0000000001", "no more than 9 decimal"),
     ("1E+30", "no more than 18 digits"), ("-100.5", "greater than or equal to -100"), ("NaN", "finite number"),
     ("Infinity", "finite number")],
)  # fmt: skip
def test_markups_it_could_not_store_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        BillingSettings(markup_pct=text)  # type: ignore[arg-type]
