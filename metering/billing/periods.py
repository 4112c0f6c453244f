"""Billing periods: calendar months in UTC, named ``YYYY-MM`` (pure)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta


def period_of(moment: datetime) -> str:
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return f"{moment.year:04d}-{moment.month:02d}"


_PERIOD = re.compile(r"[0-9]{4}-[0-9]{2}")  # ASCII digits only (int() would also read other scripts' digits)


def parse_period(period: str) -> tuple[int, int]:
    """(year, month) of ``YYYY-MM``, from 1970-01 to 9999-11 (the last month whose end a datetime can hold)."""
    if not _PERIOD.fullmatch(period):
        raise ValueError(f"a period is written YYYY-MM, not {period!r}")
    year, month = int(period[:4]), int(period[5:])
    if not (1 <= month <= 12 and 1970 <= year <= 9999) or (year, month) > (9999, 11):
        raise ValueError(f"a period is written YYYY-MM (1970-01 to 9999-11), not {period!r}")
    return year, month


def next_period(period: str) -> str:
    year, month = parse_period(period)
    return f"{year + month // 12:04d}-{month % 12 + 1:02d}"


def previous_period(period: str) -> str | None:
    """The month before ``period``, or None before 1970-01 (no period)."""
    year, month = parse_period(period)
    if (year, month) == (1970, 1):
        return None
    return f"{year - (month == 1):04d}-{(month - 2) % 12 + 1:02d}"


def period_bounds(period: str) -> tuple[datetime, datetime]:
    """[start, end) of the month in UTC."""
    year, month = parse_period(period)
    start = datetime(year, month, 1, tzinfo=UTC)
    return start, datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


def finalizable_at(period: str, grace: timedelta) -> datetime | None:
    """When a period's invoices may be finalized: its end plus the grace period (None: past year 9999, never)."""
    try:
        return period_bounds(period)[1] + grace
    except OverflowError:
        return None


def finalizable(period: str, now: datetime, grace: timedelta) -> bool:
    """A period's invoices may be finalized once it has ended and its grace period has passed."""
    at = finalizable_at(period, grace)
    return at is not None and now >= at


def billing_period(occurred: str, finalized: set[str]) -> tuple[str, bool]:
    """Where an event of period ``occurred`` is billed: its own period, or, when that invoice is already
    finalized, the first later period without a finalized invoice (a labelled late line)."""
    period, late = occurred, False
    while period in finalized:
        period, late = next_period(period), True
    return period, late


def earliest_billed_in(period: str, finalized: set[str]) -> str:
    """The earliest month an event billed in ``period`` can have happened in: the first of the finalized months
    just before it, else ``period`` itself. ``billing_period`` moves an event (and a re-rate its correction) only
    across finalized months, and a month stays finalized."""
    earliest = period
    while (before := previous_period(earliest)) is not None and before in finalized:
        earliest = before
    return earliest
