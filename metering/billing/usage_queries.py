"""Usage aggregates for the read side (SQL; reads only), served from rollups, never raw events.

Rollups are hourly, so a window ``[start, end)`` is made of whole UTC hours and the ``hour`` group is the
rollup's own hour. Each query reads the coarsest rollups that have what it groups and filters by
(``_sources``): per-user daily or hourly rollups for tenants and users, else the platform rollups (per hour, and
per UTC day for the window's whole days). ``day`` is the UTC date of the hour: ``substr(hour, 1, 10)`` of
SQLite's stored text (naive UTC, ``YYYY-MM-DD HH:MM:SS.ffffff``), ``CAST(timezone('UTC', hour) AS DATE)`` of
PostgreSQL's timestamptz (independent of the session time zone), or the daily rollup's own day. ``provider``
is grouped and filtered lowercased: events stored before provider names were lowercased keep their spelling
(``OpenAI``), and are the same provider. Grouping and summing happen in SQL; rows come in group order, text by code
point on both databases (``_in_code_point_order``).
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Date,
    Label,
    Select,
    Table,
    and_,
    cast,
    func,
    literal_column,
    or_,
    select,
    type_coerce,
    union_all,
)
from sqlalchemy.orm import Session

from metering.billing.store import dialect
from metering.db.collation import by_code_point
from metering.db.models import PlatformUsageDailyRow, PlatformUsageHourlyRow, UsageRollupRow, UserUsageDailyRow
from metering.errors import InvalidInputError, TooManyRowsError
from metering.events import Status

# group name -> the field it fills in a result row
GROUPS: dict[str, str] = {
    "tenant": "tenant_id",
    "user": "user_id",
    "extension": "extension_id",
    "function": "function",
    "purpose": "purpose",
    "provider": "provider",
    "model": "model",
    "byollm": "byollm",
    "status": "status",
    "hour": "hour",
    "day": "day",
}
_COLUMNS = {
    "tenant": "tenant_id",
    "user": "user_id",
    "extension": "extension_id",
    "function": "function",
    "purpose": "purpose",
    "provider": "provider",
    "model": "model",
    "byollm": "is_byollm",
    "status": "status",
    "hour": "hour",
}
_STATUSES = tuple(s.value for s in Status)


@dataclass(frozen=True, slots=True)
class UsageFilters:
    """Equality filters on rollup columns; None: any."""

    tenant_id: str | None = None
    user_id: str | None = None
    extension_id: str | None = None
    function: str | None = None
    purpose: str | None = None
    provider: str | None = None
    model: str | None = None
    byollm: bool | None = None
    status: str | None = None


@dataclass(frozen=True, slots=True)
class UsageTotals:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    billed_nanos: int = 0
    shadow_nanos: int = 0
    cost_nanos: int = 0
    latency_us_sum: int = 0
    errors: int = 0
    unpriced: int = 0
    cache_write_1h_tokens: int = 0  # part of cache_write_tokens
    web_searches: int = 0

    @property
    def avg_latency_ms(self) -> float | None:
        return round(self.latency_us_sum / self.calls / 1000, 3) if self.calls else None

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(*(getattr(self, n) + getattr(other, n) for n in _COUNTERS))


_COUNTERS = tuple(UsageTotals.__dataclass_fields__)
# the rollup column summed into each counter (the same name but for two)
_SUMMED = {name: {"errors": "error_count", "unpriced": "unpriced_count"}.get(name, name) for name in _COUNTERS}


@dataclass(frozen=True, slots=True)
class UsageGroup:
    key: dict[str, Any] = field(default_factory=dict)  # result field (GROUPS' values) -> group value
    totals: UsageTotals = UsageTotals()


def parse_group_by(values: Iterable[str]) -> tuple[str, ...]:
    """Group names from repeated and/or comma-separated values, deduplicated in order; unknown -> 422."""
    names: list[str] = []
    for value in values:
        for name in (part.strip() for part in value.split(",")):
            if not name:
                continue
            if name not in GROUPS:
                raise InvalidInputError(f"cannot group usage by {name!r}: group_by takes {', '.join(GROUPS)}")
            if name not in names:
                names.append(name)
    return tuple(names)


def _utc(name: str, moment: datetime) -> datetime:
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if (moment.minute, moment.second, moment.microsecond) != (0, 0, 0):
        raise InvalidInputError(
            f"{name} must be a whole UTC hour (usage is served from hourly rollups), not {moment.isoformat()}"
        )
    return moment


def check_window(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """``[start, end)`` in UTC (naive means UTC); both whole hours, start before end; else 422."""
    start, end = _utc("from", start), _utc("to", end)
    if start >= end:
        raise InvalidInputError(f"from ({start.isoformat()}) must be before to ({end.isoformat()})")
    return start, end


def check_status(status: str | None) -> str | None:
    if status is not None and status not in _STATUSES:
        raise InvalidInputError(f"status is one of {', '.join(_STATUSES)}, not {status!r}")
    return status


def _day(session: Session, hour: ColumnElement[Any]) -> ColumnElement[Any]:
    if dialect(session) == "postgresql":
        # Literals, not bind parameters: the SELECT and GROUP BY expressions must render identically.
        return cast(func.timezone(literal_column("'UTC'"), hour), Date)
    return type_coerce(func.substr(hour, literal_column("1"), literal_column("10")), Date)


_FINE = typing.cast(Table, UsageRollupRow.__table__)
_HOURLY = typing.cast(Table, PlatformUsageHourlyRow.__table__)
_DAILY = typing.cast(Table, PlatformUsageDailyRow.__table__)
_USER_DAILY = typing.cast(Table, UserUsageDailyRow.__table__)
_USER_DAILY_GROUPS = frozenset({"tenant", "user", "day"})
_NOT_TEXT = frozenset({"byollm", "hour", "day"})
_OTHER_FILTERS = ("extension_id", "function", "purpose", "provider", "model", "byollm", "status")


def _sources(
    group_by: Sequence[str], filters: UsageFilters, start: datetime, end: datetime
) -> list[tuple[Table, ColumnElement[bool]]]:
    """The coarsest rollup tables that answer the query, each with its part of the window.

    - a tenant or user (grouped or filtered), nothing but tenant, user and day: ``user_usage_daily`` for the
      window's whole UTC days, ``usage_rollups`` for the hours at its edges;
    - any other query with a tenant or user: ``usage_rollups``;
    - grouped by hour: ``platform_usage_hourly``;
    - otherwise ``platform_usage_daily`` for the whole days, ``platform_usage_hourly`` for the edges."""
    groups = set(group_by)
    personal = bool({"tenant", "user"} & groups) or filters.tenant_id is not None or filters.user_id is not None
    if personal:
        if groups <= _USER_DAILY_GROUPS and all(getattr(filters, name) is None for name in _OTHER_FILTERS):
            return _days_and_edges(_USER_DAILY, _FINE, start, end)
        return [(_FINE, and_(_FINE.c.hour >= start, _FINE.c.hour < end))]
    if "hour" in groups:
        return [(_HOURLY, and_(_HOURLY.c.hour >= start, _HOURLY.c.hour < end))]
    return _days_and_edges(_DAILY, _HOURLY, start, end)


def _days_and_edges(
    daily: Table, hourly: Table, start: datetime, end: datetime
) -> list[tuple[Table, ColumnElement[bool]]]:
    hour = hourly.c.hour
    first_day = start.date()  # the first UTC midnight at or after start (none after one in 9999-12-31)
    if start > datetime.combine(first_day, time(), UTC):
        first_day = first_day + timedelta(days=1) if first_day < date.max else date.max
    last_day = end.date()  # the last UTC midnight at or before end
    if first_day >= last_day:
        return [(hourly, and_(hour >= start, hour < end))]
    edges = or_(
        and_(hour >= start, hour < datetime.combine(first_day, time(), UTC)),
        and_(hour >= datetime.combine(last_day, time(), UTC), hour < end),
    )
    return [(daily, and_(daily.c.day >= first_day, daily.c.day < last_day)), (hourly, edges)]


def _in_code_point_order(session: Session, name: str, key: ColumnElement[Any]) -> ColumnElement[Any]:
    """A group's sort key: text by code point, as SQLite's BINARY collation compares it, on PostgreSQL too (its
    database collation, e.g. en_US.UTF-8, sorted ``ann, Ann, Bob`` where SQLite gives ``Ann, Bob, ann``)."""
    return key if name in _NOT_TEXT else by_code_point(session, key)


def _group_expression(session: Session, table: Table, name: str) -> ColumnElement[Any]:
    if name == "day":
        return table.c.day if "day" in table.c else _day(session, table.c.hour)
    if name == "provider":  # as the filter: events stored before names were lowercased keep their spelling
        return func.lower(table.c.provider)
    return table.c[_COLUMNS[name]]  # type: ignore[no-any-return]


def _part(
    session: Session, table: Table, window: ColumnElement[bool], group_by: Sequence[str], filters: UsageFilters
) -> Select[Any]:
    keys = [_group_expression(session, table, name).label(f"g_{name}") for name in group_by]
    sums = [func.sum(table.c[_SUMMED[counter]]).label(counter) for counter in _COUNTERS]
    stmt = select(*keys, *sums).where(window)
    for name in ("tenant_id", "user_id", "extension_id", "function", "purpose", "model", "status"):
        value = getattr(filters, name)
        if value is not None:
            stmt = stmt.where(table.c[name] == value)
    if filters.provider is not None:  # case-insensitive, as provider names are (events store them lowercase)
        stmt = stmt.where(func.lower(table.c.provider) == filters.provider.lower())
    if filters.byollm is not None:
        stmt = stmt.where(table.c.is_byollm.is_(filters.byollm))
    stmt = stmt.having(func.count() > 0)
    return stmt.group_by(*keys) if keys else stmt


def usage(
    session: Session,
    start: datetime,
    end: datetime,
    group_by: Sequence[str] = (),
    filters: UsageFilters = UsageFilters(),
    *,
    max_rows: int | None = None,
) -> list[UsageGroup]:
    """Summed rollups of ``[start, end)`` per combination of ``group_by`` (validated names), ordered by group
    values; without ``group_by``, one group (none when nothing matched). ``max_rows``: more groups than that are a
    ``TooManyRowsError``; the query stops one row past it (its LIMIT), so no more are ever fetched."""
    start, end = check_window(start, end)
    group_by = parse_group_by(group_by)
    check_status(filters.status)
    parts = [
        _part(session, table, window, group_by, filters) for table, window in _sources(group_by, filters, start, end)
    ]
    order: Sequence[ColumnElement[Any]]
    if len(parts) == 1:
        stmt = parts[0]
        order = [typing.cast(Label[Any], column).element for column in list(stmt.selected_columns)[: len(group_by)]]
    else:  # whole days + edge hours: the same groups summed again over both parts
        both = union_all(*parts).subquery()
        keys = [both.c[f"g_{name}"] for name in group_by]
        stmt = select(*keys, *(func.sum(both.c[counter]).label(counter) for counter in _COUNTERS))
        stmt = stmt.group_by(*keys) if keys else stmt.having(func.count() > 0)
        order = keys
    if order:
        stmt = stmt.order_by(
            *(_in_code_point_order(session, name, key) for name, key in zip(group_by, order, strict=True))
        )
    if max_rows is not None:
        stmt = stmt.limit(max_rows + 1)
    groups = []
    for row in session.execute(stmt):
        values = tuple(row)
        key = {GROUPS[name]: _value(name, value) for name, value in zip(group_by, values, strict=False)}
        # SUM(BIGINT) is NUMERIC on PostgreSQL (a Decimal): exact, made an int again.
        totals = UsageTotals(*(int(v or 0) for v in values[len(group_by) :]))
        groups.append(UsageGroup(key, totals))
    if max_rows is not None and len(groups) > max_rows:
        raise TooManyRowsError(
            f"the answer would hold more than {max_rows} rows, the most one answer holds: narrow the window (from, "
            "to), group_by fewer or coarser dimensions (day rather than hour), or filter (tenant_id=, user_id=, …), "
            "and query the parts one after the other"
        )
    return groups


def _value(name: str, value: Any) -> Any:
    if name == "byollm":
        return bool(value)
    return value


def total(groups: Iterable[UsageGroup]) -> UsageTotals:
    totals = [group.totals for group in groups]
    return UsageTotals(*(sum(getattr(t, name) for t in totals) for name in _COUNTERS))
