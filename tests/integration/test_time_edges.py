"""Events at the edges of UTC months, days and hours, sent with any offset, land in the same billing period, rollup
hour and day on SQLite (naive UTC text) and PostgreSQL (``timestamptz``, whatever the session's time zone), and are
priced at their own instant across a genai-prices price change."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from metering.billing import usage_queries
from metering.billing.checks import run_checks
from metering.billing.ingest import ingest
from metering.db.engine import make_engine, make_session_factory
from metering.db.models import PlatformUsageDailyRow, UsageEventRow, UsageRollupRow, UserUsageDailyRow
from tests.fakes.events import record

NOW = datetime(2029, 1, 1, tzinfo=UTC)
# occurred_at as sent -> (billing period, UTC hour of its rollup)
EDGES = {
    "2026-01-31T23:59:59.999999Z": ("2026-01", datetime(2026, 1, 31, 23, tzinfo=UTC)),
    "2026-01-31T23:59:59.9999995Z": ("2026-01", datetime(2026, 1, 31, 23, tzinfo=UTC)),  # digits past µs: cut
    "2026-02-01T00:00:00Z": ("2026-02", datetime(2026, 2, 1, tzinfo=UTC)),
    "2028-02-29T23:59:59.999999Z": ("2028-02", datetime(2028, 2, 29, 23, tzinfo=UTC)),
    "2028-03-01T00:00:00Z": ("2028-03", datetime(2028, 3, 1, tzinfo=UTC)),
    "2026-12-31T23:59:59.999999Z": ("2026-12", datetime(2026, 12, 31, 23, tzinfo=UTC)),
    "2027-01-01T00:00:00.000000Z": ("2027-01", datetime(2027, 1, 1, tzinfo=UTC)),
    "2026-03-01T05:29:59.999999+05:30": ("2026-02", datetime(2026, 2, 28, 23, tzinfo=UTC)),
    "2026-03-01T05:30:00+05:30": ("2026-03", datetime(2026, 3, 1, tzinfo=UTC)),
    "2026-02-28T11:59:59.999999-12:00": ("2026-02", datetime(2026, 2, 28, 23, tzinfo=UTC)),
    "2026-02-28T12:00:00-12:00": ("2026-03", datetime(2026, 3, 1, tzinfo=UTC)),
    "2026-04-01T13:59:59.999999+14:00": ("2026-03", datetime(2026, 3, 31, 23, tzinfo=UTC)),
    "2026-04-01T14:00:00+14:00": ("2026-04", datetime(2026, 4, 1, tzinfo=UTC)),
    "2020-01-01T00:00:00Z": ("2020-01", datetime(2020, 1, 1, tzinfo=UTC)),  # the oldest time ingest takes
}


@pytest.fixture(params=["UTC", "Pacific/Chatham"])
def zoned_sessions(request, db_url: str, monkeypatch) -> Iterator[sessionmaker[Session]]:
    """Sessions of a new engine whose PostgreSQL connections are in UTC or in a +13:45 zone (PGTZ, which libpq reads
    on connect; SQLite has no session time zone)."""
    monkeypatch.setenv("PGTZ", request.param)
    engine = make_engine(db_url)
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            assert connection.execute(text("SHOW timezone")).scalar() == request.param
    yield make_session_factory(engine)
    engine.dispose()


def test_an_event_lands_in_the_utc_month_hour_and_day_it_happened(zoned_sessions) -> None:
    session_factory = zoned_sessions
    records = [record(i, user_id=f"u{i}", occurred_at=at) for i, at in enumerate(EDGES)]
    with session_factory() as session:
        result = ingest(session, records, now=NOW)
        session.commit()
    assert result.rejected == [] and result.inserted == len(EDGES)
    expected = {f"u{i}": edge for i, edge in enumerate(EDGES.values())}
    with session_factory() as session:
        periods = dict(session.execute(select(UsageEventRow.user_id, UsageEventRow.invoice_period)).all())
        hours = dict(session.execute(select(UsageRollupRow.user_id, UsageRollupRow.hour)).all())
        days = dict(session.execute(select(UserUsageDailyRow.user_id, UserUsageDailyRow.day)).all())
        platform_days = {day: calls for day, calls in session.execute(select(PlatformUsageDailyRow.day,
                                                                             PlatformUsageDailyRow.calls))}  # fmt: skip
        assert run_checks(session).problems == []
        by_day = usage_queries.usage(session, datetime(2026, 2, 28, 22, tzinfo=UTC),
                                     datetime(2026, 3, 1, 1, tzinfo=UTC), ["day"])  # fmt: skip
    assert periods == {user: period for user, (period, _) in expected.items()}
    assert hours == {user: hour for user, (_, hour) in expected.items()}
    assert days == {user: hour.date() for user, (_, hour) in expected.items()}
    assert platform_days[date(2026, 2, 28)] == 2 and platform_days[date(2026, 3, 1)] == 2
    assert [(g.key["day"], g.totals.calls) for g in by_day] == [(date(2026, 2, 28), 2), (date(2026, 3, 1), 2)]


def test_a_genai_prices_change_applies_from_its_utc_date_whatever_the_offset(session_factory) -> None:
    """claude-sonnet-4-6's input price fell from $6 to $3 per Mtok on 2026-03-13 (UTC): 05:29:59.999999+05:30 that
    day is still 2026-03-12 in UTC. In one batch (one rate-card cache), the later instant first."""
    sent = ["2026-03-13T05:30:00+05:30", "2026-03-13T05:29:59.999999+05:30", "2026-03-12T23:59:59.999999Z"]
    records = [record(i, user_id=f"u{i}", occurred_at=at, input_tokens=1_000_000, output_tokens=0,
                      cache_read_tokens=0) for i, at in enumerate(sent)]  # fmt: skip
    with session_factory() as session:
        assert ingest(session, records, now=NOW).inserted == 3
        session.commit()
        costs = dict(session.execute(select(UsageEventRow.user_id, UsageEventRow.cost_nanos)).all())
    assert costs == {"u0": 3_000_000_000, "u1": 6_000_000_000, "u2": 6_000_000_000}
