"""HttpSink's reading of a ``Retry-After`` header (RFC 9110: delay-seconds or an HTTP date)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from metering.spool.http_sink import retry_after_s

NOW = datetime(2026, 11, 28, 15, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "wait"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("Sat, 28 Nov 2026 15:01:30 GMT", 90.0),
        ("Sat, 28 Nov 2026 14:59:00 GMT", 0.0),  # already past: no wait asked
        (None, None),
        ("", None),
        ("-5", None),
        ("1.5", None),  # not delay-seconds (digits only)
        ("soon", None),
        ("\u0663", None),  # a non-ASCII digit
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value: str | None, wait: float | None) -> None:
    assert retry_after_s(value, now=NOW) == wait
