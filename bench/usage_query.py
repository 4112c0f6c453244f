"""GET /v1/usage latency at 10M stored events (issue 4), against the same answers computed from raw events.

A fresh PostgreSQL database (``bench_api_usage_<pid>``, dropped afterwards) migrated to head is loaded, untimed:
  usage_events   ``--events`` synthetic rows generated inside PostgreSQL (``INSERT … SELECT`` over
                 ``generate_series`` + ``random()``, seeded; two loader connections), in time order as ingest
                 would have stored them: ``--days`` days of ``occurred_at``, 50 tenants, 5,000 users (skewed: a
                 few heavy users), 10 extensions / 14 functions, 8 models (7 priced with their genai-prices
                 rates, ollama/llama3.1 unpriced), 20 % BYOLLM, 2 % errors, cache and reasoning tokens, 1-3 calls
                 per invocation; billing columns by Policy A (billed / excluded_byollm / not_billable /
                 unpriced, charge = cost x 1.2). Secondary indexes are dropped during the load and rebuilt.
  usage_rollups  built exactly as ingest would have: ``INSERT INTO usage_rollups SELECT … GROUP BY`` over
                 usage_events with the formulas of ``metering/billing/checks.py``'s recomputation; then
                 the coarse rollups (platform hourly and daily, user daily) summed from them (as migration
                 0005 does).
Then ``VACUUM (ANALYZE)`` + ``CHECKPOINT``. The measured part: ``metering serve --workers 1 --no-migrate``
(uvicorn subprocess) answers ``GET /v1/usage`` over the last 30 whole days for five query shapes, one request
at a time: ``--warmup`` requests per shape first (listed in the JSON, not in the statistics: psycopg prepares a
statement on its 5th execution on a connection and PostgreSQL switches a prepared statement to a generic plan
after 5 more, so the first ~10 requests of a shape do not show the steady state), then ``--rounds`` interleaved
rounds (shape order rotated each round):
  day             group_by=day
  extension       group_by=extension
  model_byollm    group_by=model,byollm
  tenant_user     a tenant-bound token, group_by=user
  extension_hour  extension_id=<the busiest extension>, group_by=hour
Baselines in the same run, interleaved with the API rounds: the very SQL the API runs (captured from
``metering.billing.usage_queries.usage``) on a psycopg connection (what the database costs, without
HTTP/FastAPI/pydantic), with a custom plan (unprepared) and with a generic plan (prepared, ``plan_cache_mode =
force_generic_plan``); ``raw_sql``, the same answer computed from raw ``usage_events`` (GROUP BY over the
window), fewer repeats since it is slow. Every API answer must equal the raw answer (every counter of every
row, and the totals). ``EXPLAIN (ANALYZE, BUFFERS)`` of each shape's rollup query, custom and generic plan, is
included. With ``--what-if``, candidate fixes are then built in this throwaway database only (covering
indexes, platform-level hourly and daily rollups without tenant and user), timed on psycopg (both plan kinds)
and checked against the raw answers. The CPU used by other processes on the machine is sampled throughout.

Run:  .venv/bin/python -m bench.usage_query [--events 10000000] [--rounds 50] [--warmup 12] [--sql-repeats 5]
                                           [--raw-repeats 3] [--what-if] [--out bench/out/usage_query.json]
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
from psycopg import sql as pgsql
from sqlalchemy import event

from bench.api_ingest import (
    ContentionMonitor,
    create_token,
    database,
    environment,
    free_port,
    log,
    percentile,
    serve_cmd,
    server,
    server_env,
)
from bench.report import emit
from metering.billing import batch_sql
from metering.billing.pricing import PriceBook
from metering.billing.rates import RateCards
from metering.billing.rollup import COARSE_ROLLUPS, COUNTER_COLUMNS, KEY_COLUMNS
from metering.billing.store import EVENT_COLUMNS
from metering.billing.usage_queries import UsageFilters, usage
from metering.db.engine import make_engine, make_session_factory

TARGET_P95_MS = 50.0
MARKUP = Decimal(20)
LOAD_BATCH = uuid.UUID("00000000-0000-4000-8000-00000000b0b1")  # ingest_batch of the generated rows

TENANTS = 50
USERS = 5_000
# (extension, function, purpose, action_type, share of calls in %)
WORKLOADS = (
    ("rewrite", "rewrite", "content_rewrite", "read", 14),
    ("rewrite", "tone", "content_rewrite", "read", 6),
    ("summarize", "summarize_thread", "summarization", "read", 10),
    ("summarize", "daily_digest", "summarization", "read", 4),
    ("translate", "translate", "translation", "read", 8),
    ("search", "answer", "rag_answer", "read", 11),
    ("search", "rerank", "rerank", "read", 5),
    ("code_review", "review_diff", "code_review", "read", 6),
    ("assistant", "chat", "chat", "write", 12),
    ("assistant", "tool_step", "agent", "write", 5),
    ("meeting_notes", "notes", "summarization", "read", 6),
    ("email_draft", "draft", "content_rewrite", "write", 5),
    ("sql_helper", "nl_to_sql", "code_generation", "read", 4),
    ("moderation", "classify", "moderation", "read", 4),
)
# (provider, model, share of calls in %); llama3.1 has no price anywhere (unpriced, or excluded when BYOLLM)
MODELS = (
    ("anthropic", "claude-sonnet-4-6", 25),
    ("anthropic", "claude-haiku-4-5", 20),
    ("anthropic", "claude-opus-4-5", 5),
    ("openai", "gpt-4o", 10),
    ("openai", "gpt-4o-mini", 20),
    ("openai", "gpt-4.1", 8),
    ("openai", "o3-mini", 9),
    ("ollama", "llama3.1", 3),
)
ERROR_TYPES = ("rate_limit_error", "overloaded_error", "timeout", "api_connection_error", "invalid_request_error")
BUSIEST_EXTENSION = "rewrite"  # 20 % of the calls: the extension filter's worst case
SHAPES: dict[str, dict[str, Any]] = {
    "day": {"params": {"group_by": "day"}},
    "extension": {"params": {"group_by": "extension"}},
    "model_byollm": {"params": {"group_by": "model,byollm"}},
    "tenant_user": {"params": {"group_by": "user"}, "tenant_bound": True},
    "extension_hour": {"params": {"group_by": "hour", "extension_id": BUSIEST_EXTENSION}},
}
CHUNK_INVOCATIONS = 250_000  # per INSERT … SELECT statement (a multiple of 5: exactly 400,000 events)
DAY_SECONDS = 86_400


# -- database ---------------------------------------------------------------------------------------------


def sql_text_array(values: list[str]) -> str:
    return "ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]::text[]"


def sql_bigint_array(values: list[int]) -> str:
    return "ARRAY[" + ", ".join(str(v) for v in values) + "]::bigint[]"


def bounds(weights: list[int]) -> str:
    """width_bucket thresholds: random() in [0, 1) falls in bucket i (1-based) with probability weight_i / sum."""
    total, acc, out = sum(weights), 0, []
    for w in weights:
        out.append(acc / total)
        acc += w
    return "ARRAY[" + ", ".join(f"{b:.6f}" for b in out) + "]::float8[]"


def model_rates(at: datetime) -> tuple[dict[str, list[Any]], str, str]:
    """Per model (MODELS order): nano-USD per 1M tokens for input, output, cache read, cache write (genai-prices,
    as ingest's rate cards give them; base tier), whether priced; and the price source / version strings."""
    cards = RateCards(PriceBook(overrides=(), markup_pct=MARKUP))
    rates: dict[str, list[Any]] = {"rin": [], "rout": [], "rread": [], "rwrite": [], "priced": []}
    version = "genai-prices"
    for provider, model, _ in MODELS:
        card = cards.card(provider, model, at)
        if card is None:
            for key in ("rin", "rout", "rread", "rwrite"):
                rates[key].append(0)
            rates["priced"].append("false")
            continue
        rin = card.input[0][1]
        rates["rin"].append(rin)
        rates["rout"].append(card.output[0][1])
        rates["rread"].append(rin if card.cache_read is None else card.cache_read[0][1])
        rates["rwrite"].append(rin if card.cache_write is None else card.cache_write[0][1])
        rates["priced"].append("true")
        version = card.source_version
    return rates, "genai-prices", version


def generate_sql(n_invocations: int, start: datetime, span_s: float, at: datetime) -> str:
    """One INSERT … SELECT for invocations [%(lo)s, %(hi)s): 8 events per 5 invocations, in time order."""
    rates, source, version = model_rates(at)
    step = (span_s - 10.0) / n_invocations  # the last invocation's calls still end before the window's end
    z = "sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random())"  # a standard normal draw (Box-Muller)
    stops = {
        "anthropic": ["end_turn", "end_turn", "end_turn", "max_tokens", "tool_use"],
        "openai": ["stop", "stop", "stop", "length", "tool_calls"],
        "ollama": ["stop", "stop", "stop", "length", "stop"],
    }
    stop_case = " ".join(f"WHEN '{p}' THEN ({sql_text_array(v)})[r_stop]" for p, v in stops.items())
    columns = ", ".join(EVENT_COLUMNS)
    return f"""
INSERT INTO usage_events ({columns})
SELECT
  (lpad(to_hex(ms), 12, '0') || '7' || lpad(to_hex(r12), 3, '0') || '8' || lpad(to_hex(i * 4 + c), 15, '0'))::uuid,
  1, occ, occ + interval '2 seconds', 'tenant-' || lpad((u %% {TENANTS})::text, 2, '0'),
  'user-' || lpad(u::text, 4, '0'), ({sql_text_array([w[0] for w in WORKLOADS])})[w],
  ({sql_text_array([w[1] for w in WORKLOADS])})[w], ({sql_text_array([w[3] for w in WORKLOADS])})[w],
  (lpad(to_hex(inv_ms), 12, '0') || '7000' || '9' || lpad(to_hex(i), 15, '0'))::uuid,
  c, ({sql_text_array([w[2] for w in WORKLOADS])})[w], provider, model, byollm, failover, stream,
  inp, outp, rd, wr, 0, reasoning, 0,  -- no 1-hour cache writes, no web searches (migration 0011)
  CASE WHEN err THEN 'missing' WHEN provider = 'ollama' AND r_compl < 0.3 THEN 'estimated' ELSE 'reported' END,
  max_tokens, CASE WHEN err THEN NULL ELSE CASE provider {stop_case} END END,
  CASE WHEN err THEN round((20 + random() * 29980)::numeric, 3)::float8
       ELSE round((exp(6.8 + 0.7 * z3) + outp * 8)::numeric, 3)::float8 END,
  CASE WHEN stream AND NOT err THEN round((150 + random() * 750)::numeric, 3)::float8 END,
  CASE WHEN err THEN 'error' ELSE 'ok' END, CASE WHEN err THEN error_type0 END,
  fingerprint, '[]'::json, '{LOAD_BATCH}'::uuid,
  billing_status,
  CASE WHEN billing_status = 'billed' THEN price ELSE 0 END,
  CASE WHEN billing_status = 'billed' THEN cost ELSE 0 END,
  CASE WHEN billing_status = 'excluded_byollm' THEN price ELSE 0 END,
  CASE WHEN priced THEN '{MARKUP}' END, CASE WHEN priced THEN '{source}' END, CASE WHEN priced THEN '{version}' END,
  CASE WHEN billing_status = 'billed' THEN to_char(occ AT TIME ZONE 'UTC', 'YYYY-MM') END,
  false
FROM (
  SELECT *,
    CASE WHEN byollm THEN 'excluded_byollm' WHEN err THEN 'not_billable'
         WHEN NOT priced THEN 'unpriced' ELSE 'billed' END AS billing_status,
    CASE WHEN priced THEN round(units / 1000000.0)::bigint ELSE 0 END AS cost,
    CASE WHEN priced THEN round(units * 1.2 / 1000000.0)::bigint ELSE 0 END AS price
  FROM (
    SELECT *,
      (inp - rd - wr)::numeric * ({sql_bigint_array(rates["rin"])})[m]
        + rd::numeric * ({sql_bigint_array(rates["rread"])})[m]
        + wr::numeric * ({sql_bigint_array(rates["rwrite"])})[m]
        + outp::numeric * ({sql_bigint_array(rates["rout"])})[m] AS units
    FROM (
      SELECT *,
        CASE WHEN provider = 'anthropic' AND NOT err AND r_write < 0.12
             THEN floor((inp - rd) * (0.2 + 0.7 * r_write_frac))::bigint ELSE 0 END AS wr,
        CASE WHEN err THEN 0
             WHEN model LIKE 'claude-sonnet%%' AND r_reason < 0.15
               THEN floor(outp * (0.2 + 0.6 * r_reason_frac))::bigint
             WHEN model = 'o3-mini' AND r_reason < 0.7 THEN floor(outp * (0.3 + 0.6 * r_reason_frac))::bigint
             ELSE 0 END AS reasoning
      FROM (
        SELECT *,
          CASE WHEN err THEN 0
               WHEN provider = 'anthropic' AND r_read < 0.35 THEN floor(inp * (0.3 + 0.6 * r_read_frac))::bigint
               WHEN provider = 'openai' AND inp >= 1024 AND r_read < 0.3
                 THEN (floor(inp * (0.3 + 0.6 * r_read_frac) / 128) * 128)::bigint
               ELSE 0 END AS rd
        FROM (
          SELECT *,
            CASE WHEN err THEN 0 ELSE least(150000, greatest(12, floor(exp(7.2 + 1.1 * z1))))::bigint END AS inp,
            CASE WHEN err THEN 0 ELSE least(8000, greatest(1, floor(exp(5.6 + 0.9 * z2))))::bigint END AS outp
          FROM (
            SELECT inv.*, c,
              to_timestamp(inv.t0 + c * 2.5) AS occ,
              floor((inv.t0 + c * 2.5) * 1000)::bigint AS ms,
              floor(inv.t0 * 1000)::bigint AS inv_ms,
              floor(random() * 4096)::int AS r12,
              random() < 0.02 AS err,
              random() < 0.01 AS failover,
              random() < 0.4 AS stream,
              ({sql_text_array(list(ERROR_TYPES))})[1 + floor(random() * {len(ERROR_TYPES)})::int] AS error_type0,
              (ARRAY[1024, 1500, 2048, 4096, 8192, NULL])[1 + floor(random() * 6)::int] AS max_tokens,
              1 + floor(random() * 5)::int AS r_stop,
              random() AS r_compl,
              {z} AS z1, {z} AS z2, {z} AS z3,
              random() AS r_read, random() AS r_read_frac, random() AS r_write, random() AS r_write_frac,
              random() AS r_reason, random() AS r_reason_frac
            FROM (
              SELECT *,
                ({sql_text_array([m[0] for m in MODELS])})[m] AS provider,
                ({sql_text_array([m[1] for m in MODELS])})[m] AS model,
                (ARRAY[{", ".join(rates["priced"])}]::boolean[])[m] AS priced
              FROM (
                SELECT i,
                  floor({USERS} * random() ^ 2)::int AS u,
                  width_bucket(random(), {bounds([w[4] for w in WORKLOADS])}) AS w,
                  width_bucket(random(), {bounds([m[2] for m in MODELS])}) AS m,
                  random() < 0.2 AS byollm,
                  {start.timestamp()} + (i + random() * 0.5) * {step} AS t0,
                  (ARRAY[1, 1, 1, 2, 3])[1 + i %% 5] AS n,
                  md5('fp' || floor(random() * 300)::int) AS fingerprint
                FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) AS i
                OFFSET 0
              ) inv0
            ) inv, LATERAL generate_series(0, inv.n - 1) AS c
            OFFSET 0
          ) calls
          OFFSET 0
        ) sized
        OFFSET 0
      ) cached
      OFFSET 0
    ) written
    OFFSET 0
  ) costed
  OFFSET 0
) e
"""


# -- loading (untimed) ------------------------------------------------------------------------------------


def secondary_indexes(conn: psycopg.Connection[Any], table: str) -> list[tuple[str, str]]:
    """(name, DDL) of the table's indexes that do not back a constraint."""
    rows = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s "
        "AND indexname NOT IN (SELECT conname FROM pg_constraint)",
        (table,),
    ).fetchall()
    return [(name, ddl) for name, ddl in rows]


def in_threads(work: Callable[[], None], threads: int) -> None:
    """Run ``work`` in ``threads`` threads and wait for all; the first exception one raised is raised here."""
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as exc:  # reported by the calling thread
            errors.append(exc)

    running = [threading.Thread(target=guarded) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    if errors:
        raise errors[0]


def load_events(conninfo: str, events: int, start: datetime, span_s: float, loaders: int) -> dict[str, Any]:
    """``events`` rows into usage_events (indexes dropped, then rebuilt with the same definitions)."""
    n_invocations = events * 5 // 8
    sql = generate_sql(n_invocations, start, span_s, start + timedelta(seconds=span_s))
    with psycopg.connect(conninfo, autocommit=True) as conn:
        indexes = secondary_indexes(conn, "usage_events")
        pk = conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'usage_events'::regclass AND contype = 'p'"
        ).fetchone()
        assert pk is not None
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        conn.execute(f'ALTER TABLE usage_events DROP CONSTRAINT "{pk[0]}"')
        conn.execute("ALTER TABLE usage_events SET (autovacuum_enabled = false)")
    chunks: queue.Queue[tuple[int, int, int]] = queue.Queue()
    for k, lo in enumerate(range(0, n_invocations, CHUNK_INVOCATIONS)):
        chunks.put((k, lo, min(n_invocations, lo + CHUNK_INVOCATIONS)))
    total_chunks = chunks.qsize()

    def loader() -> None:
        with psycopg.connect(conninfo) as conn:
            while True:
                try:
                    k, lo, hi = chunks.get_nowait()
                except queue.Empty:
                    return
                conn.execute("SELECT setseed(%s)", ((k + 1) / (total_chunks + 1),))
                conn.execute(sql, {"lo": lo, "hi": hi})
                conn.commit()
                log(f"  events chunk {k + 1}/{total_chunks}")

    started = time.perf_counter()
    in_threads(loader, loaders)
    inserted = time.perf_counter() - started
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute(f'ALTER TABLE usage_events ADD CONSTRAINT "{pk[0]}" {pk[1]}')
        for _, ddl in indexes:
            conn.execute(ddl)
        conn.execute("ALTER TABLE usage_events RESET (autovacuum_enabled)")
    return {
        "events": events,
        "invocations": n_invocations,
        "insert_s": round(inserted, 1),
        "index_build_s": round(time.perf_counter() - started - inserted, 1),
        "rows_per_s": round(events / inserted),
    }


def rollup_sql() -> str:
    """Rollups from raw events, exactly the recomputation of metering/billing/checks.py (PostgreSQL)."""
    keys = ", ".join(KEY_COLUMNS[1:])
    hour = "date_trunc('hour', occurred_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    return (
        f"INSERT INTO usage_rollups ({', '.join((*KEY_COLUMNS, *COUNTER_COLUMNS))}) "
        f"SELECT {hour} AS hour, {keys}, count(*) AS calls, sum(input_tokens) AS input_tokens, "
        "sum(output_tokens) AS output_tokens, sum(cache_read_tokens) AS cache_read_tokens, "
        "sum(cache_write_tokens) AS cache_write_tokens, sum(reasoning_tokens) AS reasoning_tokens, "
        "sum(charge_nanos) AS billed_nanos, sum(shadow_nanos) AS shadow_nanos, sum(cost_nanos) AS cost_nanos, "
        "sum(CAST(floor(latency_ms * 1000 + 0.5) AS BIGINT)) AS latency_us_sum, "
        "sum(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS error_count, "
        "sum(CASE WHEN billing_status = 'unpriced' THEN 1 ELSE 0 END) AS unpriced_count, "
        "sum(cache_write_1h_tokens) AS cache_write_1h_tokens, sum(web_searches) AS web_searches "
        "FROM usage_events WHERE occurred_at >= %(lo)s AND occurred_at < %(hi)s "
        f"GROUP BY {hour}, {keys} ORDER BY 1, {keys}"
    )


def coarse_rollup_sql() -> list[str]:
    """The coarse rollups summed from usage_rollups (as migration 0005 fills them; ingest keeps them equal)."""
    counters = ", ".join(COUNTER_COLUMNS)
    sums = ", ".join(f"sum({c})" for c in COUNTER_COLUMNS)
    statements = []
    for rollup in COARSE_ROLLUPS:
        keys = ", ".join(rollup.dimensions)
        grain = "hour" if rollup.grain == "hour" else "CAST(timezone('UTC', hour) AS DATE)"
        statements.append(
            f"INSERT INTO {rollup.table} ({rollup.grain}, {keys}, {counters}) "
            f"SELECT {grain}, {keys}, {sums} FROM usage_rollups GROUP BY 1, {keys} ORDER BY 1, {keys}"
        )
    return statements


def build_rollups(conninfo: str, start: datetime, days: int, loaders: int) -> dict[str, Any]:
    """usage_rollups from usage_events, one day per statement (buckets are hours: days never split one)."""
    started = time.perf_counter()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        indexes = secondary_indexes(conn, "usage_rollups")
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
    days_q: queue.Queue[datetime] = queue.Queue()
    for d in range(days):
        days_q.put(start + timedelta(days=d))
    sql = rollup_sql()

    def worker() -> None:
        with psycopg.connect(conninfo) as conn:
            conn.execute("SET work_mem = '256MB'")
            while True:
                try:
                    lo = days_q.get_nowait()
                except queue.Empty:
                    return
                conn.execute(sql, {"lo": lo, "hi": lo + timedelta(days=1)})
                conn.commit()

    in_threads(worker, loaders)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        for _, ddl in indexes:
            conn.execute(ddl)
        for sql in coarse_rollup_sql():
            conn.execute(sql)
        rows = conn.execute("SELECT count(*) FROM usage_rollups").fetchone()[0]  # type: ignore[index]
        calls = conn.execute("SELECT sum(calls) FROM usage_rollups").fetchone()[0]  # type: ignore[index]
    return {"rollup_rows": int(rows), "rollup_calls": int(calls), "seconds": round(time.perf_counter() - started, 1)}


def settle(conninfo: str) -> float:
    started = time.perf_counter()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) usage_events")
        conn.execute("VACUUM (ANALYZE) usage_rollups")
        conn.execute("VACUUM (ANALYZE) platform_usage_hourly")
        conn.execute("VACUUM (ANALYZE) platform_usage_daily")
        conn.execute("VACUUM (ANALYZE) user_usage_daily")
        conn.execute("CHECKPOINT")
    return round(time.perf_counter() - started, 1)


def table_facts(conninfo: str, start: datetime, end: datetime) -> dict[str, Any]:
    with psycopg.connect(conninfo) as conn:

        def one(sql: str, params: tuple[Any, ...] = ()) -> Any:
            return conn.execute(sql, params).fetchone()[0]  # type: ignore[index]

        window = (start, end)
        facts = {
            "usage_events": one("SELECT count(*) FROM usage_events"),
            "usage_events_in_window": one(
                "SELECT count(*) FROM usage_events WHERE occurred_at >= %s AND occurred_at < %s", window
            ),
            "usage_rollups": one("SELECT count(*) FROM usage_rollups"),
            "usage_rollups_in_window": one("SELECT count(*) FROM usage_rollups WHERE hour >= %s AND hour < %s", window),
            "usage_events_size": one("SELECT pg_size_pretty(pg_total_relation_size('usage_events'))"),
            "usage_rollups_size": one("SELECT pg_size_pretty(pg_total_relation_size('usage_rollups'))"),
            "platform_usage_hourly": one("SELECT count(*) FROM platform_usage_hourly"),
            "platform_usage_daily": one("SELECT count(*) FROM platform_usage_daily"),
            "user_usage_daily": one("SELECT count(*) FROM user_usage_daily"),
            "occurred_at_min": str(one("SELECT min(occurred_at) FROM usage_events")),
            "occurred_at_max": str(one("SELECT max(occurred_at) FROM usage_events")),
            "tenants": one("SELECT count(DISTINCT tenant_id) FROM usage_events"),
            "users": one("SELECT count(DISTINCT user_id) FROM usage_events"),
            "extensions": one("SELECT count(DISTINCT extension_id) FROM usage_events"),
            "models": one("SELECT count(DISTINCT model) FROM usage_events"),
            "byollm_share": round(float(one("SELECT avg(is_byollm::int) FROM usage_events")), 4),
            "error_share": round(float(one("SELECT avg((status = 'error')::int) FROM usage_events")), 4),
            "billing_status": dict(
                conn.execute("SELECT billing_status, count(*) FROM usage_events GROUP BY 1 ORDER BY 1").fetchall()
            ),
        }
        facts["events_per_rollup_row"] = round(facts["usage_events"] / max(1, facts["usage_rollups"]), 2)
    return facts


# -- the measured queries ---------------------------------------------------------------------------------

RAW_KEYS = {
    "day": ("(occurred_at AT TIME ZONE 'UTC')::date", "day"),
    "hour": ("date_trunc('hour', occurred_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'", "hour"),
    "extension": ("extension_id", "extension_id"),
    "model": ("model", "model"),
    "byollm": ("is_byollm", "byollm"),
    "user": ("user_id", "user_id"),
}
RAW_COUNTERS = batch_sql.COUNTER_SUMS  # the rollup counters, summed over raw events (as ingest posts them)
COMPARED = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "billed_nanos",
    "shadow_nanos",
    "cost_nanos",
    "errors",
    "unpriced",
    "cache_write_1h_tokens",
    "web_searches",
    "avg_latency_ms",
)


def shape_groups(shape: dict[str, Any]) -> list[str]:
    return [g for g in str(shape["params"]["group_by"]).split(",") if g]


def raw_query(shape: dict[str, Any], tenant: str | None, start: datetime, end: datetime) -> tuple[str, dict[str, Any]]:
    """The same answer from raw usage_events: GROUP BY over the window (and the same filters)."""
    groups = shape_groups(shape)
    keys = [RAW_KEYS[g][0] for g in groups]
    where = ["occurred_at >= %(start)s", "occurred_at < %(end)s"]
    params: dict[str, Any] = {"start": start, "end": end}
    if tenant is not None:
        where.append("tenant_id = %(tenant)s")
        params["tenant"] = tenant
    if "extension_id" in shape["params"]:
        where.append("extension_id = %(extension)s")
        params["extension"] = shape["params"]["extension_id"]
    order = ", ".join(str(i + 1) for i in range(len(keys)))
    sql = (
        f"SELECT {', '.join(keys + list(RAW_COUNTERS))} FROM usage_events WHERE {' AND '.join(where)} "
        f"GROUP BY {order} ORDER BY {order}"
    )
    return sql, params


def normal_raw(rows: list[tuple[Any, ...]], groups: list[str]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    out = {}
    for row in rows:
        key = tuple(row[: len(groups)])
        key = tuple(v.isoformat() if isinstance(v, date) and not isinstance(v, datetime) else v for v in key)
        key = tuple(v.astimezone(UTC) if isinstance(v, datetime) else v for v in key)
        c = [int(v) for v in row[len(groups) :]]
        latency_sum = c[9]
        avg = round(latency_sum / c[0] / 1000, 3) if c[0] else None
        out[key] = (*c[:9], *c[10:14], avg)  # without the latency sum (c[9]), compared as the mean
    return out


def normal_api(answer: dict[str, Any], groups: list[str]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    out = {}
    for row in answer["rows"]:
        key = []
        for g in groups:
            value = row[RAW_KEYS[g][1]]
            if g == "hour":
                value = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
            key.append(value)
        out[tuple(key)] = tuple(row[c] for c in COMPARED)
    return out


def capture_rollup_sql(
    db_url: str, start: datetime, end: datetime, shape: dict[str, Any], tenant: str | None
) -> tuple[str, Any]:
    """The statement (and parameters) ``usage_queries.usage`` runs for this shape, as the API calls it."""
    engine = make_engine(db_url)
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        captured.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    filters = UsageFilters(tenant_id=tenant, extension_id=shape["params"].get("extension_id"))
    with make_session_factory(engine)() as session:
        usage(session, start, end, shape_groups(shape), filters)
    engine.dispose()
    return captured[-1]


def stats(seconds: list[float]) -> dict[str, Any]:
    ordered = sorted(seconds)
    return {
        "n": len(ordered),
        "p50_ms": round(percentile(ordered, 0.50) * 1000, 2),
        "p95_ms": round(percentile(ordered, 0.95) * 1000, 2),
        "p99_ms": round(percentile(ordered, 0.99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def explain(conn: psycopg.Connection[Any], sql: str, params: Any) -> list[str]:
    """EXPLAIN ANALYZE with the values bound: a custom plan (what a statement executed unprepared gets)."""
    return [row[0] for row in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).fetchall()]


def explain_generic(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any]) -> list[str]:
    """EXPLAIN ANALYZE of the generic plan: what a prepared statement gets once PostgreSQL's plan cache switches
    to it (psycopg prepares a statement on its 5th execution on a connection; PostgreSQL plans the first 5
    executions of a prepared statement with the values, then compares with a generic plan)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    numbered = re.sub(r"%\((\w+)\)s", number, sql)
    conn.execute(f"PREPARE bench_generic AS {numbered}")
    try:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        args = pgsql.SQL(", ").join(pgsql.Literal(params[n]) for n in names)
        query = pgsql.SQL("EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_generic ({})").format(args)
        return [row[0] for row in conn.execute(query).fetchall()]
    finally:
        conn.execute("RESET plan_cache_mode")
        conn.execute("DEALLOCATE bench_generic")


class SqlRunner:
    """Timed SQL on one connection that never prepares on its own (``prepare_threshold=None``): ``custom`` runs
    it unprepared (planned with the values every time), ``generic`` as a prepared statement under
    ``plan_cache_mode = force_generic_plan`` (what the API's pooled connections end up running)."""

    def __init__(self, conninfo: str) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True, prepare_threshold=None)

    def run(self, sql: str, params: Any, generic: bool = False) -> tuple[float, list[tuple[Any, ...]]]:
        if generic:
            self.conn.execute("SET plan_cache_mode = force_generic_plan")
        try:
            began = time.perf_counter()
            rows = self.conn.execute(sql, params, prepare=generic).fetchall()
            return time.perf_counter() - began, rows
        finally:
            if generic:
                self.conn.execute("RESET plan_cache_mode")

    def close(self) -> None:
        self.conn.close()


def measure_queries(
    args: argparse.Namespace,
    db_url: str,
    conninfo: str,
    base: str,
    secrets: dict[str, str],
    tenant: str,
    start: datetime,
    end: datetime,
) -> tuple[dict[str, Any], dict[str, tuple[str, Any]], dict[str, Any]]:
    names = list(SHAPES)
    clients = {
        kind: httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=300)
        for kind, secret in secrets.items()
    }
    window = {"from": start.isoformat().replace("+00:00", "Z"), "to": end.isoformat().replace("+00:00", "Z")}
    plans: dict[str, Any] = {}
    for name in names:
        shape = SHAPES[name]
        bound = tenant if shape.get("tenant_bound") else None
        plans[name] = {
            "rollup": capture_rollup_sql(db_url, start, end, shape, bound),
            "raw": raw_query(shape, bound, start, end),
            "client": clients["tenant" if bound else "all"],
        }
    api_t: dict[str, list[float]] = {n: [] for n in names}
    warm_t: dict[str, list[float]] = {n: [] for n in names}
    custom_t: dict[str, list[float]] = {n: [] for n in names}
    generic_t: dict[str, list[float]] = {n: [] for n in names}
    raw_t: dict[str, list[float]] = {n: [] for n in names}
    answers: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    raw_answers: dict[str, Any] = {}
    raw_every = max(1, args.rounds // max(1, args.raw_repeats))
    sql_every = max(1, args.rounds // max(1, args.sql_repeats))
    runner = SqlRunner(conninfo)

    def api(name: str) -> float:
        plan = plans[name]
        began = time.perf_counter()
        response = plan["client"].get("/v1/usage", params=window | SHAPES[name]["params"])
        elapsed = time.perf_counter() - began
        if response.status_code != 200:
            raise RuntimeError(f"GET /v1/usage ({name}) answered {response.status_code}: {response.text[:500]}")
        answers[name].append(orjson.loads(response.content))
        return elapsed

    try:
        log(f"warm-up: {args.warmup} requests per shape (the server's connections reach their steady-state plans)")
        for _ in range(args.warmup):
            for name in names:
                warm_t[name].append(api(name))
        measured_start = time.perf_counter()
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                api_t[name].append(api(name))
                if r % sql_every == 0 and len(custom_t[name]) < args.sql_repeats:
                    custom_t[name].append(runner.run(*plans[name]["rollup"])[0])
                    generic_t[name].append(runner.run(*plans[name]["rollup"], generic=True)[0])
                if r % raw_every == 0 and len(raw_t[name]) < args.raw_repeats:
                    elapsed, rows = runner.run(*plans[name]["raw"])
                    raw_t[name].append(elapsed)
                    raw_answers[name] = rows
            if (r + 1) % 10 == 0:
                p50s = {n: round(stats(api_t[n])["p50_ms"]) for n in names}
                log(f"round {r + 1}/{args.rounds}: api p50 ms {p50s}")
        measured = time.perf_counter() - measured_start
        explains = {}
        for name in names:
            explains[name] = {
                "rollup_query_custom_plan": explain(runner.conn, *plans[name]["rollup"]),
                "rollup_query_generic_plan": explain_generic(runner.conn, *plans[name]["rollup"]),
            }
            if args.explain_raw:
                explains[name]["raw_query"] = explain(runner.conn, *plans[name]["raw"])
    finally:
        runner.close()
        for client in clients.values():
            client.close()

    shapes: dict[str, Any] = {}
    for name in names:
        groups = shape_groups(SHAPES[name])
        expected = normal_raw(raw_answers[name], groups)
        equal = all(normal_api(a, groups) == expected for a in answers[name])
        totals_equal = all(
            tuple(a["totals"][c] for c in COMPARED[:-1])
            == tuple(sum(v[i] for v in expected.values()) for i in range(len(COMPARED) - 1))
            for a in answers[name]
        )
        api_s, raw_s = stats(api_t[name]), stats(raw_t[name])
        custom_s, generic_s = stats(custom_t[name]), stats(generic_t[name])
        first, last = sorted(api_t[name][:10]), sorted(api_t[name][-10:])
        shapes[name] = {
            "query": SHAPES[name]["params"] | ({"token_tenant": tenant} if SHAPES[name].get("tenant_bound") else {}),
            "rows": len(expected),
            "api": api_s,
            "api_warmup_ms": [round(t * 1000, 1) for t in warm_t[name]],
            "api_steady": {  # the first and last 10 measured requests: the same plan all along?
                "first10_p50_ms": round(first[5] * 1000, 1),
                "last10_p50_ms": round(last[5] * 1000, 1),
            },
            "rollup_sql_custom_plan": custom_s,
            "rollup_sql_generic_plan": generic_s,
            "raw_sql": raw_s,
            "api_p50_minus_generic_sql_p50_ms": round(api_s["p50_ms"] - generic_s["p50_ms"], 1),
            "api_p50_over_custom_sql_p50": round(api_s["p50_ms"] / custom_s["p50_ms"], 2),
            "raw_p50_over_api_p50": round(raw_s["p50_ms"] / api_s["p50_ms"], 2),
            "api_equals_raw": equal and totals_equal,
            "target": f"api p95 <= {TARGET_P95_MS:g} ms",
            "result": "PASS" if api_s["p95_ms"] <= TARGET_P95_MS else "FAIL",
            "rollup_sql_text": " ".join(plans[name]["rollup"][0].split()),
            "raw_sql_text": " ".join(plans[name]["raw"][0].split()),
        }
    result = {"measured_wall_s": round(measured, 1), "shapes": shapes, "explain_analyze": explains}
    return result, {name: plans[name]["rollup"] for name in names}, raw_answers


# -- what if: candidate indexes and coarser rollups, in this throwaway database only -----------------------

SUMS = ", ".join(f"sum({c}) AS {c}" for c in COUNTER_COLUMNS)
PLATFORM_KEYS = "extension_id, function, purpose, provider, model, is_byollm, status"  # no tenant, no user


def what_if(
    conninfo: str,
    start: datetime,
    end: datetime,
    rollup_plans: dict[str, tuple[str, Any]],
    raw_answers: dict[str, Any],
    repeats: int,
) -> dict[str, Any]:
    """Not the project's schema: candidate fixes built here, timed on a psycopg connection (no HTTP), every
    answer checked against the raw-events answer."""
    out: dict[str, Any] = {"build_s": {}, "queries": {}}
    counters = ", ".join(COUNTER_COLUMNS)
    first_day = start.date() + timedelta(days=0 if start.hour == 0 else 1)
    last_day = end.date()  # the window's whole days: [first_day, last_day)
    edges = {
        "start": start,
        "end": end,
        "d1": first_day,
        "d2": last_day,
        "t1": datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC),
        "t2": datetime(last_day.year, last_day.month, last_day.day, tzinfo=UTC),
    }
    runner = SqlRunner(conninfo)
    conn = runner.conn

    def build(label: str, *statements: str) -> None:
        began = time.perf_counter()
        conn.execute("SET maintenance_work_mem = '1GB'")
        for statement in statements:
            conn.execute(statement)
        out["build_s"][label] = round(time.perf_counter() - began, 1)

    def bench(label: str, shape: str, sql: str, params: Any, jit: bool = True) -> None:
        conn.execute(f"SET jit = {'on' if jit else 'off'}")
        entry: dict[str, Any] = {"shape": shape, "jit": jit}
        groups = shape_groups(SHAPES[shape])
        equal = True
        for plan in ("custom", "generic"):
            times: list[float] = []
            for i in range(1 + repeats):
                elapsed, rows = runner.run(sql, params, generic=plan == "generic")
                if i:
                    times.append(elapsed)
            equal = equal and normal_raw(rows, groups) == normal_raw(raw_answers[shape], groups)
            entry[f"{plan}_plan"] = stats(times)
        conn.execute("RESET jit")
        entry["equals_raw"] = equal
        entry["sql"] = " ".join(sql.split())
        out["queries"][label] = entry
        p95 = (entry["custom_plan"]["p95_ms"], entry["generic_plan"]["p95_ms"])
        log(f"  what-if {label}: p95 custom {p95[0]} / generic {p95[1]} ms")

    try:
        bench("tenant_user: today's query, jit off", "tenant_user", *rollup_plans["tenant_user"], jit=False)
        build(
            "ix (tenant_id, hour) INCLUDE (user_id, counters)",
            f"CREATE INDEX wi_tenant_cover ON usage_rollups (tenant_id, hour) INCLUDE (user_id, {counters})",
            "VACUUM (ANALYZE) usage_rollups",
        )
        bench("tenant_user: today's query + covering tenant index", "tenant_user", *rollup_plans["tenant_user"])
        build(
            "ix (extension_id, hour) INCLUDE (counters)",
            f"CREATE INDEX wi_extension_cover ON usage_rollups (extension_id, hour) INCLUDE ({counters})",
            "VACUUM (ANALYZE) usage_rollups",
        )
        bench(
            "extension_hour: today's query + covering extension index",
            "extension_hour",
            *rollup_plans["extension_hour"],
        )
        build(
            "platform hourly rollup (no tenant, no user) from usage_rollups",
            f"CREATE TABLE wi_platform_hourly AS SELECT hour, {PLATFORM_KEYS}, {SUMS} FROM usage_rollups "
            f"GROUP BY hour, {PLATFORM_KEYS}",
            "CREATE INDEX ON wi_platform_hourly (hour)",
            "CREATE INDEX ON wi_platform_hourly (extension_id, hour)",
            "VACUUM (ANALYZE) wi_platform_hourly",
        )
        build(
            "platform daily rollup from the hourly one",
            f"CREATE TABLE wi_platform_daily AS SELECT (timezone('UTC', hour))::date AS day, {PLATFORM_KEYS}, {SUMS} "
            f"FROM wi_platform_hourly GROUP BY 1, {PLATFORM_KEYS}",
            "CREATE INDEX ON wi_platform_daily (day)",
            "VACUUM (ANALYZE) wi_platform_daily",
        )
        out["platform_hourly_rows"] = conn.execute("SELECT count(*) FROM wi_platform_hourly").fetchone()[0]  # type: ignore[index]
        out["platform_daily_rows"] = conn.execute("SELECT count(*) FROM wi_platform_daily").fetchone()[0]  # type: ignore[index]
        bench(
            "extension_hour: platform hourly rollup",
            "extension_hour",
            f"SELECT hour, {SUMS} FROM wi_platform_hourly WHERE hour >= %(start)s AND hour < %(end)s "
            "AND extension_id = %(extension)s GROUP BY 1 ORDER BY 1",
            edges | {"extension": BUSIEST_EXTENSION},
        )
        keys = {
            "day": ("day", "(timezone('UTC', hour))::date"),
            "extension": ("extension_id", "extension_id"),
            "model_byollm": ("model, is_byollm", "model, is_byollm"),
        }
        for shape, (daily_keys, hourly_keys) in keys.items():
            width = len(daily_keys.split(","))
            order = ", ".join(str(i + 1) for i in range(width))
            sql = (
                f"SELECT {', '.join(f'k{i}' for i in range(width))}, {SUMS} FROM ("
                f"SELECT {daily_keys}, {counters} FROM wi_platform_daily WHERE day >= %(d1)s AND day < %(d2)s "
                f"UNION ALL SELECT {hourly_keys}, {counters} FROM wi_platform_hourly "
                "WHERE (hour >= %(start)s AND hour < %(t1)s) OR (hour >= %(t2)s AND hour < %(end)s)"
                f") u ({', '.join(f'k{i}' for i in range(width))}, {counters}) GROUP BY {order} ORDER BY {order}"
            )
            bench(f"{shape}: platform daily rollup + hourly edges", shape, sql, edges)
    finally:
        runner.close()
    return out


# -- the run ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    name = f"bench_api_usage_{os.getpid()}"
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)  # data end = window end: a whole hour
    data_start = end - timedelta(days=args.days)
    window_start = end - timedelta(days=30)
    result: dict[str, Any] = {}
    with database(name, keep=args.keep_db) as (db_url, conninfo):
        result["environment"] = environment(conninfo) | {"loadavg_at_start": os.getloadavg()}
        log(f"database {name}: generating {args.events:,} events over {args.days} days")
        started = time.perf_counter()
        loaded = load_events(conninfo, args.events, data_start, args.days * DAY_SECONDS, args.loaders)
        log(f"events loaded {loaded}; building rollups")
        rollups = build_rollups(conninfo, data_start, args.days, args.loaders)
        log(f"rollups {rollups}; vacuum analyze")
        settled = settle(conninfo)
        result["data_generation"] = {
            "events": loaded,
            "rollups": rollups,
            "vacuum_analyze_checkpoint_s": settled,
            "total_s": round(time.perf_counter() - started, 1),
            "note": "untimed: none of this is in the measured numbers",
        }
        result["data"] = table_facts(conninfo, window_start, end)
        log(f"data {result['data']}")
        if result["data"]["usage_events"] != args.events or rollups["rollup_calls"] != args.events:
            raise RuntimeError("generated data does not add up")
        env = server_env(db_url, workdir)
        secrets = {
            "all": create_token(env, "usage-bench", ("read",)),
            "tenant": create_token(env, "usage-bench-tenant", ("read",), tenant=args.tenant),
        }
        port = free_port()
        with server(serve_cmd(port), env, port, workdir / "serve.log") as base:
            measured, rollup_plans, raw_answers = measure_queries(
                args, db_url, conninfo, base, secrets, args.tenant, window_start, end
            )
        result |= measured
        result["loadavg_after_measuring"] = os.getloadavg()
        if args.what_if:
            log("what-if: candidate indexes and rollups (not the project's schema)")
            result["what_if"] = what_if(conninfo, window_start, end, rollup_plans, raw_answers, args.what_if_repeats)
    result["window"] = {"from": window_start.isoformat(), "to": end.isoformat()}
    result["targets"] = [
        {"shape": n, "target": s["target"], "value_p95_ms": s["api"]["p95_ms"], "result": s["result"]}
        for n, s in result["shapes"].items()
    ]
    result["all_api_answers_equal_raw"] = all(s["api_equals_raw"] for s in result["shapes"].values())
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000, help="a multiple of 8 (8 events per 5 invocations)")
    parser.add_argument("--days", type=int, default=35, help="days of data ending at the window's end (>= 30)")
    parser.add_argument("--rounds", type=int, default=50, help="API requests per shape")
    parser.add_argument(
        "--sql-repeats", type=int, default=5, help="rollup SQL runs per shape and plan kind (psycopg, no API)"
    )
    parser.add_argument("--raw-repeats", type=int, default=3, help="raw-events GROUP BY runs per shape")
    parser.add_argument(
        "--warmup", type=int, default=12, help="requests per shape before measuring (listed, not in the statistics)"
    )
    parser.add_argument("--tenant", default="tenant-07", help="the tenant of the tenant-bound token")
    parser.add_argument("--loaders", type=int, default=2, help="loader connections for the data generation")
    parser.add_argument("--explain-raw", action="store_true", help="also EXPLAIN ANALYZE the raw-events queries")
    parser.add_argument("--what-if", action="store_true", help="then time candidate indexes / coarser rollups")
    parser.add_argument("--what-if-repeats", type=int, default=10)
    parser.add_argument("--keep-db", action="store_true", help="keep the database (to investigate); drop it by hand")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.events % 8 or args.days < 30:
        parser.error("--events must be a multiple of 8 and --days at least 30")
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python -m bench.usage_query " + " ".join(sys.argv[1:] if argv is None else argv)
    }
    with tempfile.TemporaryDirectory() as tmp, ContentionMonitor() as monitor:
        result |= run(args, Path(tmp))
        result["other_processes"] = monitor.summary()
    result["total_wall_s"] = round(time.perf_counter() - started, 1)
    emit(result, args.out, default=str)


if __name__ == "__main__":
    main()
