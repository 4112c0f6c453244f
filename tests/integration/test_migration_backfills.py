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

import pytest

from metering.billing.checks import run_checks
from metering.db import migrate
from metering.db.engine import make_session_factory
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


def test_0002_holds_the_events_of_0001_as_ingest_would_without_a_price_and_rolls_them_up(fresh_url: str) -> None:
    """Events as 0001 stored them (no billing columns, no rollups): each gets Policy A's state without a price (BYOLLM
    excluded even when failed; a failed call with usage missing, or with neither input nor output tokens, not
    billable; any other, a failed one with tokens too, held unpriced), no money, and the hourly rollups count them
    exactly: latencies rounded to whole microseconds per event, errors (not cancellations) and held events counted."""
    noon = datetime(2026, 11, 26, 12, tzinfo=UTC)
    failed = {"status": "error", "error_type": "overloaded", "stop_reason": None}
    cases = [  # (event, the state the upgrade must give it)
        (_event(0, noon, latency_ms=1234.567), "unpriced"),
        (_event(1, noon.replace(minute=59, second=59, microsecond=999_999), latency_ms=12.345), "unpriced"),
        (_event(2, noon, is_byollm=True, latency_ms=0.001), "excluded_byollm"),
        (_event(3, noon, is_byollm=True, usage_completeness="missing", input_tokens=0, output_tokens=0, **failed),
         "excluded_byollm"),
        (_event(4, noon, usage_completeness="missing", **failed), "not_billable"),  # tokens, but usage missing
        (_event(5, noon, input_tokens=0, output_tokens=0, cache_read_tokens=900, **failed), "not_billable"),
        (_event(6, noon, status="cancelled", input_tokens=0, output_tokens=0, latency_ms=0.0), "not_billable"),
        (_event(7, noon, output_tokens=0, usage_completeness="estimated", **failed), "unpriced"),  # input was read
        (_event(8, noon, status="cancelled", output_tokens=3), "unpriced"),
        (_event(9, noon, tenant="globex", model="acme-private-7b", latency_ms=2.5), "unpriced"),
        (_event(10, noon.replace(hour=23), tenant=LONG_TENANT, user="ユーザー" * 50, input_tokens=2**62,
                cache_read_tokens=2**62, latency_ms=9_999_999.999), "unpriced"),
        (_event(11, noon.replace(day=27, hour=0), input_tokens=2**62 - 1, cache_read_tokens=2**62 - 1),
         "unpriced"),
    ]  # fmt: skip
    dropped = (*ADDED_0002, *ADDED_0011)
    with at_revision(fresh_url, "0001") as engine:
        insert(engine, "usage_events", [{k: v for k, v in e.items() if k not in dropped} for e, _ in cases])
        migrate.upgrade(fresh_url, "0002")
        held = [
            {k: v for k, v in e.items() if k not in ADDED_0011}
            | {"ingest_batch": None, "billing_status": state, "charge_nanos": 0, "cost_nanos": 0, "shadow_nanos": 0,
               "markup_pct": None, "price_source": None, "price_version": None, "invoice_period": None,
               "is_late": False}
            for e, state in cases
        ]  # fmt: skip
        stored = rows(engine, "usage_events")
        assert [{**r, "event_id": uuid.UUID(r["event_id"])} for r in stored] == [
            {**e, "event_id": e["event_id"], "occurred_at": naive(e["occurred_at"]),
             "ingested_at": naive(e["ingested_at"]), "invocation_id": e["invocation_id"].hex}
            for e in held
        ]  # fmt: skip
        hourly = _rollup_of(held, COUNTERS)
        assert _sorted(rows(engine, "usage_rollups")) == _sorted(hourly)
        by_status = {
            r["status"]: r
            for r in hourly
            if (r["tenant_id"], r["hour"], r["is_byollm"]) == ("acme", naive(noon), False)
        }
        assert by_status["error"]["error_count"] == 3 and by_status["cancelled"]["error_count"] == 0
        assert by_status["ok"]["latency_us_sum"] == 1_234_567 + 12_345
        migrate.upgrade(fresh_url)  # on to head: the coarse rollups and the later counters agree with the events
        with make_session_factory(engine)() as session:
            report = run_checks(session)
        assert report.ok, report.problems


def _override(id: str, **fields: Any) -> dict[str, Any]:
    """A price override as 0010 stored it."""
    return {
        "id": id, "provider": "anthropic", "model_pattern": "claude-*",
        "effective_from": datetime(2026, 1, 1, tzinfo=UTC), "effective_to": None,
        "input_nanos_per_mtok": 3_000_000_000, "output_nanos_per_mtok": 15_000_000_000,
        "cache_read_nanos_per_mtok": None, "cache_write_nanos_per_mtok": None, "markup_pct": None, "note": None,
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
    } | fields  # fmt: skip


def test_0011_gives_stored_events_no_1_hour_writes_or_searches_and_overrides_no_price_for_them(fresh_url: str) -> None:
    """Events and overrides as 0010 stored them: every event gets 0 one-hour writes and 0 searches (what it was
    billed for), every override NULL for both prices (the cache-write price; searches held unpriced); nothing else
    changes, money to the nano."""
    noon = datetime(2026, 11, 26, 12, tzinfo=UTC)
    events = [
        _event(0, noon, cache_write_tokens=2**62, charge_nanos=2**62, cost_nanos=2**62 - 1),
        _event(1, noon, is_byollm=True, billing_status="excluded_byollm", charge_nanos=0, cost_nanos=0,
               shadow_nanos=123_456_789_012),
        _event(2, noon, tenant=LONG_TENANT, user="ユーザー" * 50, billing_status="unpriced", charge_nanos=0,
               cost_nanos=0, markup_pct=None, price_source=None, price_version=None, invoice_period="2026-11",
               is_late=True),
    ]  # fmt: skip
    overrides = [
        _override("plain"),
        _override("cached", cache_read_nanos_per_mtok=300_000_000, cache_write_nanos_per_mtok=3_750_000_000,
                  markup_pct="12.5", note="négocié", effective_to=datetime(2027, 1, 1, tzinfo=UTC)),
        _override("max", input_nanos_per_mtok=INT64_MAX, output_nanos_per_mtok=0),
    ]  # fmt: skip
    with at_revision(fresh_url, "0010") as engine:
        insert(engine, "usage_events", [{k: v for k, v in e.items() if k not in ADDED_0011} for e in events])
        insert(engine, "price_overrides", overrides)
        before = {t: rows(engine, t) for t in ("usage_events", "price_overrides")}
        migrate.upgrade(fresh_url, "0011")
        assert rows(engine, "usage_events") == [
            r | {"cache_write_1h_tokens": 0, "web_searches": 0} for r in before["usage_events"]
        ]
        assert rows(engine, "price_overrides") == [
            r | {"cache_write_1h_nanos_per_mtok": None, "web_search_nanos_per_k": None}
            for r in before["price_overrides"]
        ]
        assert {r["id"]: r["input_nanos_per_mtok"] for r in before["price_overrides"]}["max"] == INT64_MAX


def _transfer(n: int, debit: str, credit: str, amount: int, kind: str, key: str | None) -> dict[str, Any]:
    """A transfer as 0009 stored it."""
    return {
        "id": uuid.UUID(int=500 + n), "debit_account_id": debit, "credit_account_id": credit, "amount_nanos": amount,
        "currency": "USD", "kind": kind, "event_id": None, "reverses_id": None, "idempotency_key": key,
        "period": None, "memo": None, "created_at": datetime(2026, 11, 26, 12, n, tzinfo=UTC),
    }  # fmt: skip


def test_0010_gives_each_stored_key_the_tenant_of_its_wallet(fresh_url: str) -> None:
    """Transfers as 0009 stored them: a keyed credit (wallet credited) or negative adjustment (wallet debited) gets
    its wallet's tenant, an escaped or long unicode one too, whatever the users; a transfer without a key none."""
    from metering.billing.ledger import wallet_id

    tenants = [("acme", "alice"), ("globex", "alice"), ("a:b~c", "bob"), (LONG_TENANT, "ユーザー" * 50)]
    accounts = [
        {"id": wallet_id(t, u), "kind": "user_wallet", "tenant_id": t, "user_id": u, "currency": "USD",
         "balance_nanos": 0, "created_at": datetime(2026, 11, 1, tzinfo=UTC)}
        for t, u in tenants
    ] + [
        {"id": name, "kind": kind, "tenant_id": None, "user_id": None, "currency": "USD", "balance_nanos": 0,
         "created_at": datetime(2026, 11, 1, tzinfo=UTC)}
        for name, kind in (("platform:topups", "topups"), ("platform:adjustments", "adjustments"),
                           ("platform:revenue", "platform_revenue"))
    ]  # fmt: skip
    wallets = [a["id"] for a in accounts[:4]]
    transfers = [
        _transfer(0, "platform:topups", wallets[0], 2**62, "credit", "k1"),
        _transfer(1, wallets[1], "platform:adjustments", 1, "adjustment", "k2"),
        _transfer(2, "platform:topups", wallets[2], 5_000_000_000, "credit", "k3"),
        _transfer(3, wallets[3], "platform:adjustments", 999_999_999, "adjustment", "k" * 200),
        _transfer(4, wallets[0], "platform:revenue", 7_200_000, "usage", None),
    ]
    with at_revision(fresh_url, "0009") as engine:
        insert(engine, "accounts", accounts)
        insert(engine, "transfers", transfers)
        before = rows(engine, "transfers")
        migrate.upgrade(fresh_url, "0010")
        tenant_of = {500: "acme", 501: "globex", 502: "a:b~c", 503: LONG_TENANT, 504: None}
        assert rows(engine, "transfers") == [
            r | {"idempotency_tenant_id": tenant_of[uuid.UUID(r["id"]).int]} for r in before
        ]


def _invoice(n: int, tenant: str, user: str, period: str, finalized_at: datetime) -> dict[str, Any]:
    """A finalized invoice as 0006 stored it."""
    return {
        "id": uuid.UUID(int=900 + n), "tenant_id": tenant, "user_id": user, "period": period, "status": "finalized",
        "currency": "USD", "total_nanos": 12_345_678_901, "rounded_nanos": 12_340_000_000, "residue_nanos": 5_678_901,
        "finalized_at": finalized_at,
    }  # fmt: skip


def test_0007_closes_each_month_with_a_finalized_invoice_at_its_first_finalization(fresh_url: str) -> None:
    """Invoices as 0006 stored them: each month with a finalized invoice becomes a finalized period, at the earliest
    of its invoices' times (to the microsecond; a later run for late users does not move it), whatever the tenant."""
    first = datetime(2026, 11, 2, 0, 0, 0, 1, tzinfo=UTC)
    invoices = [
        _invoice(0, "acme", "alice", "2026-10", datetime(2026, 11, 20, tzinfo=UTC)),  # a later run (late users)
        _invoice(1, "globex", "alice", "2026-10", first),
        _invoice(2, LONG_TENANT, "ユーザー" * 50, "2026-10", first.replace(microsecond=2)),
        _invoice(3, "acme", "alice", "2025-12", datetime(2026, 1, 1, 23, 59, 59, 999_999, tzinfo=UTC)),
    ]
    with at_revision(fresh_url, "0006") as engine:
        insert(engine, "invoices", invoices)
        migrate.upgrade(fresh_url, "0007")
        assert rows(engine, "finalized_periods") == [
            {"period": "2025-12", "finalized_at": datetime(2026, 1, 1, 23, 59, 59, 999_999)},
            {"period": "2026-10", "finalized_at": naive(first)},
        ]


def test_0009_keeps_every_account_and_transfer_as_it_was(fresh_url: str) -> None:
    """Accounts and transfers as 0008 stored them (SQLite recreates both tables to widen the ids): every row, the
    balances near the ±2^62 limit and the unicode ids, is the same afterwards."""
    from metering.billing.ledger import wallet_id

    wallet = wallet_id(LONG_TENANT[:100], "ユーザー" * 10)  # under 300 characters, as 0008 allowed
    accounts = [
        {"id": wallet, "kind": "user_wallet", "tenant_id": LONG_TENANT[:100], "user_id": "ユーザー" * 10,
         "currency": "USD", "balance_nanos": 2**62, "created_at": datetime(2026, 11, 1, tzinfo=UTC)},
        {"id": "platform:topups", "kind": "topups", "tenant_id": None, "user_id": None, "currency": "USD",
         "balance_nanos": -(2**62), "created_at": datetime(2026, 11, 1, 0, 0, 0, 1, tzinfo=UTC)},
    ]  # fmt: skip
    transfers = [_transfer(0, "platform:topups", wallet, 2**62, "credit", "k1")]
    with at_revision(fresh_url, "0008") as engine:
        insert(engine, "accounts", accounts)
        insert(engine, "transfers", transfers)
        before = {t: rows(engine, t) for t in ("accounts", "transfers")}
        migrate.upgrade(fresh_url, "0009")
        assert {t: rows(engine, t) for t in before} == before
        assert before["accounts"][1]["balance_nanos"] == 2**62 and len(before["transfers"]) == 1


def test_0002_names_the_events_whose_names_postgresql_cannot_index_as_a_rollup_key(fresh_url: str) -> None:
    """0001 stored an event whose seven names take more bytes together than PostgreSQL indexes (200 CJK characters
    each; ingest rejects such events since): rolling it up failed the whole upgrade with the database's bare
    'index row size 3072 exceeds btree version 4 maximum 2704'. It now fails naming the event and what to do, and
    changes nothing; SQLite (no such limit) rolls it up. An upgrade that succeeded before is unchanged."""
    import random

    draw = random.Random(7)
    wide = ["".join(chr(draw.randrange(0x4E00, 0x9FFF)) for _ in range(200)) for _ in range(5)]  # incompressible
    names = dict(zip(("tenant_id", "user_id", "extension_id", "function", "purpose"), wide, strict=True))
    noon = datetime(2026, 11, 26, 12, tzinfo=UTC)
    events = [_event(0, noon), _event(1, noon, **names), _event(2, noon, **names)]
    dropped = (*ADDED_0002, *ADDED_0011)
    with at_revision(fresh_url, "0001") as engine:
        insert(engine, "usage_events", [{k: v for k, v in e.items() if k not in dropped} for e in events])
        if engine.dialect.name == "sqlite":
            migrate.upgrade(fresh_url, "0002")
            assert [r["calls"] for r in rows(engine, "usage_rollups")] == [1, 2]
            return
        wide_id = str(uuid.UUID(int=2))
        with pytest.raises(
            RuntimeError, match=r"cannot upgrade to 0002: 2 stored events .* 3\d\d\d bytes .*" + wide_id
        ):
            migrate.upgrade(fresh_url, "0002")
        assert migrate.current_revision(engine) == "0001"
        assert len(rows(engine, "usage_events")) == 3
