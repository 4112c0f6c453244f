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


def test_the_grace_period_is_at_most_a_year_and_a_finalize_time_past_9999_is_never() -> None:
    from datetime import UTC, datetime, timedelta

    from metering.billing.periods import finalizable, finalizable_at

    assert BillingSettings(invoice_grace_hours=8784).invoice_grace_hours == 8784
    with pytest.raises(ValidationError, match="less than or equal to 8784"):
        BillingSettings(invoice_grace_hours=1e9)
    assert finalizable_at("9999-11", timedelta(days=40)) is None  # past what a datetime holds: was an OverflowError
    assert not finalizable("9999-11", datetime(9999, 12, 31, tzinfo=UTC), timedelta(days=40))
    assert finalizable_at("2026-10", timedelta(hours=72)) == datetime(2026, 11, 4, tzinfo=UTC)


@pytest.mark.parametrize(
    ("model", "field"),
    [("SpoolSettings", "max_backoff_s"), ("SpoolSettings", "flush_interval_s"), ("SpoolSettings", "http_timeout_s"),
     ("PlatformLLMSettings", "timeout_s")],
)  # fmt: skip
@pytest.mark.parametrize("value", ["inf", "nan", "1e300"])
def test_waits_and_timeouts_are_finite_and_bounded(model: str, field: str, value: str) -> None:
    """A sleep of inf or 1e300 s raises OverflowError (the spool's flusher thread died and stopped delivering)."""
    import metering.config

    settings = getattr(metering.config, model)
    with pytest.raises(ValidationError, match=r"finite number|less than or equal to 3600"):
        settings(**{field: value})
    assert getattr(settings(**{field: "3600"}), field) == 3600


@pytest.mark.parametrize("value", ["inf", "1e15", "nan"])
def test_the_token_touch_interval_is_finite_and_bounded(value: str) -> None:
    """Every authenticated request makes a timedelta of it: inf or 1e15 passed and then raised OverflowError on
    every request (a 500 for every token)."""
    from datetime import timedelta

    from metering.config import ApiSettings

    with pytest.raises(ValidationError, match=r"finite number|less than or equal to"):
        ApiSettings(token_touch_interval_s=value)
    year = ApiSettings(token_touch_interval_s=366 * 86_400).token_touch_interval_s
    assert timedelta(seconds=year) == timedelta(days=366)


@pytest.mark.parametrize("value", ["inf", "nan", "3601"])
def test_the_settings_cache_ttl_is_finite_and_at_most_an_hour(value: str) -> None:
    """``inf`` cached BYOLLM, per-purpose and budget settings forever: an admin's change never reached a process."""
    from metering.config import Settings

    with pytest.raises(ValidationError, match=r"finite number|less than or equal to 3600"):
        Settings(env="test", settings_cache_ttl_s=value)
    assert Settings(env="test", settings_cache_ttl_s="3600").settings_cache_ttl_s == 3600
