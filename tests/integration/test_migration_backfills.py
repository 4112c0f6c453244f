"""Upgrades over data written the old way: each migration that fills or changes existing rows gets a database at
the revision before it, rows inserted with plain SQL into that revision's tables (edge cases: several tenants, long
unicode ids, BYOLLM, unpriced, failed calls, zeros, values near the int64 limit, moments on hour and UTC day
boundaries, a PostgreSQL server in local time), and every derived value checked exactly (money to the nano).

Revisions that only create tables or add nullable columns fill nothing: 0003, 0004, 0006 (``correction_of`` NULL:
a usage line), 0008.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from typing import Any

from metering.db import migrate
from tests.integration.old_schema import at_revision, insert, naive, rows

DIMENSIONS = ("extension_id", "function", "purpose", "provider", "model", "is_byollm", "status")
COUNTERS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "billed_nanos",
    "shadow_nanos",
    "cost_nanos",
    "latency_us_sum",
    "error_count",
    "unpriced_count",
)
INT64_MAX = 2**63 - 1
LONG_TENANT = "租户-" + "ü" * 197  # 200 characters, 397 bytes
REWRITE = {"extension_id": "rewrite", "function": "rewrite", "purpose": "content_rewrite", "provider": "anthropic",
           "model": "claude-sonnet-4-6", "is_byollm": False, "status": "ok"}  # fmt: skip


def _rollup(hour: datetime, tenant: str, user: str, counters: dict[str, int], **dims: Any) -> dict[str, Any]:
    return {"hour": hour, "tenant_id": tenant, "user_id": user, **(REWRITE | dims)} | {
        c: counters.get(c, 0) for c in COUNTERS
    }


def _fold(source: Iterable[dict[str, Any]], keys: Sequence[str], counters: Sequence[str]) -> dict[tuple[Any, ...], Any]:
    """``source`` summed per ``keys`` (``day``: the UTC date of ``hour``), as {key: {counter: sum}}."""
    sums: dict[tuple[Any, ...], dict[str, int]] = defaultdict(lambda: dict.fromkeys(counters, 0))
    for row in source:
        values = {**row, "day": naive(row["hour"]).date(), "hour": naive(row["hour"])}
        total = sums[tuple(values[k] for k in keys)]
        for c in counters:
            total[c] += row[c]
    return dict(sums)


def _keyed(table: list[dict[str, Any]], keys: Sequence[str], counters: Sequence[str]) -> dict[tuple[Any, ...], Any]:
    return {tuple(r[k] for k in keys): {c: r[c] for c in counters} for r in table}


def test_0005_fills_the_coarse_rollups_from_the_hourly_rollups_exactly(fresh_url: str) -> None:
    """``usage_rollups`` rows as 0004 stored them; the upgrade's three coarse tables hold exactly their sums:
    tenants merged per platform hour and UTC day (23:00 and 00:00 are two days), a user's dimensions merged per day,
    sums reaching int64's maximum exact (no float on the way)."""
    late, midnight = datetime(2026, 11, 26, 23, tzinfo=UTC), datetime(2026, 11, 27, 0, tzinfo=UTC)
    money = {"calls": 3, "input_tokens": 3_600, "output_tokens": 1_200, "cache_read_tokens": 600,
             "cache_write_tokens": 300, "reasoning_tokens": 50, "billed_nanos": 1_234_567_891,
             "cost_nanos": 987_654_321, "latency_us_sum": 37_500}  # fmt: skip
    source = [
        _rollup(late, "acme", "alice", money),
        _rollup(late, "globex", "alice", money | {"billed_nanos": 9}),  # same user id, other tenant
        _rollup(midnight, "acme", "alice", money),  # the next UTC day
        _rollup(
            late,
            "acme",
            "alice",
            {"calls": 2, "input_tokens": 10, "shadow_nanos": 555_555_555_555, "latency_us_sum": 1},
            is_byollm=True,
        ),
        _rollup(late, "acme", "bob", {"calls": 2, "input_tokens": 7, "unpriced_count": 2}, model="acme-private-7b"),
        _rollup(late, "acme", "bob", {"calls": 1, "error_count": 1, "latency_us_sum": 3}, status="error"),
        _rollup(midnight, "acme", "bob", {"calls": 1}, status="cancelled"),  # a call that used nothing
        _rollup(
            late,
            LONG_TENANT,
            "ユーザー" * 50,
            {
                "calls": 1,
                "billed_nanos": INT64_MAX - 7,
                "cost_nanos": 2**62,
                "input_tokens": 2**62,
                "latency_us_sum": 2**62,
            },
            model="big",
        ),
        _rollup(
            late,
            "globex",
            "carol",
            {
                "calls": 1,
                "billed_nanos": 7,
                "cost_nanos": 2**62 - 1,
                "input_tokens": 2**62 - 1,
                "latency_us_sum": 2**62 - 1,
            },
            model="big",
        ),
    ]
    with at_revision(fresh_url, "0004") as engine:
        insert(engine, "usage_rollups", source)
        migrate.upgrade(fresh_url, "0005")
        platform_keys = ("hour", *DIMENSIONS)
        expected = {
            "platform_usage_hourly": (platform_keys, _fold(source, platform_keys, COUNTERS)),
            "platform_usage_daily": (("day", *DIMENSIONS), _fold(source, ("day", *DIMENSIONS), COUNTERS)),
            "user_usage_daily": (
                ("day", "tenant_id", "user_id"),
                _fold(source, ("day", "tenant_id", "user_id"), COUNTERS),
            ),
        }
        for table, (keys, sums) in expected.items():
            assert _keyed(rows(engine, table), keys, COUNTERS) == sums, table
        big = expected["platform_usage_hourly"][1][(naive(late), *(REWRITE | {"model": "big"}).values())]
        assert (big["billed_nanos"], big["cost_nanos"], big["input_tokens"]) == (INT64_MAX, INT64_MAX, INT64_MAX)
        assert len(expected["platform_usage_daily"][1]) == 7  # 23:00 and 00:00 apart
        assert [naive(r["hour"]) for r in rows(engine, "usage_rollups")] == sorted(naive(r["hour"]) for r in source)


ADDED_0002 = ("ingest_batch", "billing_status", "charge_nanos", "cost_nanos", "shadow_nanos", "markup_pct",
              "price_source", "price_version", "invoice_period", "is_late")  # fmt: skip
ADDED_0011 = ("cache_write_1h_tokens", "web_searches")


def _event(n: int, at: datetime, tenant: str = "acme", user: str = "alice", **fields: Any) -> dict[str, Any]:
    """A usage event as 0011 stored it (billed at $3/$15 per Mtok + 20 %: the money is only carried here)."""
    event = {
        "event_id": uuid.UUID(int=n + 1), "schema_version": 1, "occurred_at": at, "ingested_at": at,
        "tenant_id": tenant, "user_id": user, "action_type": "read", "invocation_id": uuid.UUID(int=10_000 + n),
        "call_index": n, "is_failover": False, "is_stream": False, "input_tokens": 1_000, "output_tokens": 200,
        "cache_read_tokens": 0, "cache_write_tokens": 0, "reasoning_tokens": 0, "usage_completeness": "reported",
        "max_tokens": 1500, "stop_reason": "end_turn", "latency_ms": 12.5, "time_to_first_token_ms": None,
        "error_type": None, "prompt_fingerprint": "f" * 32, "budget_exceeded": [],
        "ingest_batch": uuid.UUID(int=99), "billing_status": "billed", "charge_nanos": 7_200_000,
        "cost_nanos": 6_000_000, "shadow_nanos": 0, "markup_pct": "20", "price_source": "builtin",
        "price_version": "anthropic-2026-11", "invoice_period": None, "is_late": False,
        "cache_write_1h_tokens": 0, "web_searches": 0,
    } | REWRITE  # fmt: skip
    return event | fields


def _rollup_of(events: Iterable[dict[str, Any]], counters: Sequence[str]) -> list[dict[str, Any]]:
    """The hourly rollup rows ingest wrote for ``events`` (``counters`` of them), as plain rows."""
    renamed = [
        {**e, "hour": naive(e["occurred_at"]).replace(minute=0, second=0, microsecond=0), "calls": 1,
         "billed_nanos": e["charge_nanos"], "latency_us_sum": int(e["latency_ms"] * 1000 + 0.5),
         "error_count": int(e["status"] == "error"), "unpriced_count": int(e["billing_status"] == "unpriced")}
        for e in events
    ]  # fmt: skip
    keys = ("hour", "tenant_id", "user_id", *DIMENSIONS)
    return [dict(zip(keys, key, strict=True)) | sums for key, sums in _fold(renamed, keys, counters).items()]


def _coarse_of(hourly: list[dict[str, Any]], counters: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    tables = {"platform_usage_hourly": ("hour", *DIMENSIONS), "platform_usage_daily": ("day", *DIMENSIONS),
              "user_usage_daily": ("day", "tenant_id", "user_id")}  # fmt: skip
    return {
        table: [dict(zip(keys, key, strict=True)) | sums for key, sums in _fold(hourly, keys, counters).items()]
        for table, keys in tables.items()
    }


def _sorted(table: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(table, key=repr)


def test_0012_sums_the_1_hour_writes_and_searches_of_stored_events_into_every_rollup(fresh_url: str) -> None:
    """Events and their rollups as 0011 stored them (the rollups without the two counters); after the upgrade every
    rollup row of every table holds exactly its events' 1-hour writes and searches, and its other counters as they
    were: events at 12:00:00 and 12:59:59.999999 share an hour, 23:59:59.999999 and 00:00 do not share a day; a
    failed call with searches, a BYOLLM call, an unpriced one, tenants sharing a user id, counts near int64."""
    noon, night = datetime(2026, 11, 26, 12, tzinfo=UTC), datetime(2026, 11, 26, 23, 59, 59, 999_999, tzinfo=UTC)
    events = [
        _event(0, noon, cache_write_tokens=5_000, cache_write_1h_tokens=3_000, web_searches=2),
        _event(1, noon.replace(minute=59, second=59, microsecond=999_999), cache_write_tokens=10,
               cache_write_1h_tokens=10, web_searches=1),
        _event(2, noon),  # neither: its bucket's sums still include 0 and 1
        _event(3, noon, tenant="globex", web_searches=4),  # same user id, other tenant
        _event(4, night, cache_write_tokens=2**62, cache_write_1h_tokens=2**62, web_searches=2**31 - 1),
        _event(5, night.replace(day=27, hour=0, minute=0, second=0, microsecond=0), web_searches=3),
        _event(6, noon, status="error", error_type="overloaded", output_tokens=0, web_searches=1),
        _event(7, noon, is_byollm=True, billing_status="excluded_byollm", charge_nanos=0, cost_nanos=0,
               shadow_nanos=7_200_000, web_searches=5),
        _event(8, noon, model="acme-private-7b", billing_status="unpriced", charge_nanos=0, cost_nanos=0,
               markup_pct=None, price_source=None, price_version=None, cache_write_tokens=7,
               cache_write_1h_tokens=7),
        _event(9, night, tenant=LONG_TENANT, user="ユーザー" * 50, web_searches=6),
        _event(10, datetime(2026, 11, 25, 8, tzinfo=UTC), user="dora"),  # a day with none
    ]  # fmt: skip
    old = (*COUNTERS[:12],)
    hourly = _rollup_of(events, old)
    with at_revision(fresh_url, "0011") as engine:
        insert(engine, "usage_events", events)
        insert(engine, "usage_rollups", hourly)
        for table, table_rows in _coarse_of(hourly, old).items():
            insert(engine, table, table_rows)
        migrate.upgrade(fresh_url, "0012")
        new = (*old, *ADDED_0011)
        expected = {"usage_rollups": _rollup_of(events, new), **_coarse_of(_rollup_of(events, new), new)}
        for table, table_rows in expected.items():
            assert _sorted(rows(engine, table)) == _sorted(table_rows), table
        daily = {(r["day"], r["web_searches"]) for r in expected["platform_usage_daily"]}
        assert {(date(2026, 11, 26), 2**31 - 1 + 2 + 1 + 4 + 6), (date(2026, 11, 27), 3)} <= daily
