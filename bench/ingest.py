"""Ingest throughput: usage events to stored events, prices, ledger transfers and rollups (issue 3).

Per backend (SQLite, PostgreSQL), in one run, on a database that already holds ``--preload`` events:
  ingest            ingest(session, <1,000 validated UsageEvent objects>, markup_pct=20) + session.commit()
                    (events are validated before the clock starts, as the spool / HTTP layers hand them over)
  ingest_from_dicts the same with the raw JSON-decoded dicts: pydantic validation inside the timed region
  raw               the baseline: the very rows ingest writes to usage_events (built untimed with
                    metering.billing.ingest._row from priced events) inserted alone, 1,000 per transaction:
                    PostgreSQL binary ``COPY usage_events (...) FROM STDIN`` (psycopg ``cursor.copy``) + commit,
                    SQLite ``executemany(INSERT ...)`` + commit
  replay            ingest + commit of a batch whose 1,000 events are all already stored (100 % duplicates)
Every batch holds fresh, realistic events (2,000 users over 50 tenants, 6 extensions / 10 functions, Claude,
GPT and unpriced ollama models, ~20 % BYOLLM, ~2 % errors, cache (some 1-hour) and reasoning tokens, a few web
searches, the last hour). The variants run in interleaved rounds (order rotated each round) against the same
database, so drift hits all of them alike. Then a per-stage breakdown of ingest (wrapped, on extra batches), with
``--profile`` cProfile's top functions, on PostgreSQL ``--workers`` concurrent processes per variant (raw and
ingest, each process with its own connection and fresh batches, rounds alternating the order: how far several
ingesters, like uvicorn workers or spool drainers, go on one database), and sanity checks on the final state.

Run:  .venv/bin/python -m bench.ingest [--backend both] [--preload 1000000] [--batches 30]
                                      [--out bench/out/ingest.json] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import multiprocessing
import os
import platform
import pstats
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from bench.report import emit
from metering.billing import ingest as ingest_module
from metering.billing import store
from metering.billing.ingest import IngestResult, ingest
from metering.billing.rates import RateCards
from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory
from metering.events import UsageEvent, event_from_record, uuid7, uuid7_str

PG_ADMIN_URL = os.environ.get("METERING_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MARKUP = Decimal(20)
COLUMNS = store.EVENT_COLUMNS
COL = {name: i for i, name in enumerate(COLUMNS)}
PRELOAD_BATCH = uuid.UUID("00000000-0000-4000-8000-00000000b0a1")  # ingest_batch of the preloaded rows
RAW_BATCH = uuid.UUID("00000000-0000-4000-8000-00000000b0a2")  # ingest_batch of the raw-baseline rows
VARIANTS = ("ingest", "ingest_from_dicts", "raw", "replay")
TARGET_RATIO = 0.40
TARGET_PG_RATE = 25_000

# -- realistic events -----------------------------------------------------------------------------------

TENANTS = 50
USERS = 2_000
# (extension, function, purpose, action_type)
WORKLOADS = (
    ("rewrite", "rewrite", "content_rewrite", "read"),
    ("rewrite", "tone", "content_rewrite", "read"),
    ("summarize", "summarize_thread", "summarization", "read"),
    ("summarize", "daily_digest", "summarization", "read"),
    ("translate", "translate", "translation", "read"),
    ("search", "answer", "rag_answer", "read"),
    ("search", "rerank", "rerank", "read"),
    ("code_review", "review_diff", "code_review", "read"),
    ("assistant", "chat", "chat", "write"),
    ("assistant", "tool_step", "agent", "write"),
)
WORKLOAD_WEIGHTS = (20, 8, 12, 4, 10, 14, 6, 6, 14, 6)
# (provider, model, share of calls)
MODELS = (
    ("anthropic", "claude-sonnet-4-6", 30),
    ("anthropic", "claude-haiku-4-5", 25),
    ("openai", "gpt-4o", 15),
    ("openai", "gpt-4o-mini", 27),
    ("ollama", "llama3.1", 3),  # no price anywhere: unpriced (or excluded when BYOLLM)
)
STOP_REASONS = {
    "anthropic": ("end_turn", "end_turn", "end_turn", "max_tokens", "tool_use"),
    "openai": ("stop", "stop", "stop", "length", "tool_calls"),
    "ollama": ("stop", "stop", "length"),
}
ERROR_TYPES = ("rate_limit_error", "overloaded_error", "timeout", "api_connection_error", "invalid_request_error")


class EventFactory:
    """Realistic usage-event records, JSON-decoded (what a spool line or an HTTP payload item becomes)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fingerprints = [f"{self.rng.getrandbits(128):032x}" for _ in range(300)]
        self.models = [(p, m) for p, m, _ in MODELS]
        self.model_weights = [w for _, _, w in MODELS]

    def records(self, n: int, now: datetime) -> list[dict[str, Any]]:
        rng = self.rng
        out: list[dict[str, Any]] = []
        while len(out) < n:
            # One handler invocation: 1-3 calls by the same user, extension, function and model.
            u = int(USERS * rng.random() ** 2)  # a few heavy users, a long tail
            tenant, user = f"tenant-{u % TENANTS:02d}", f"user-{u:04d}"
            extension, function, purpose, action = rng.choices(WORKLOADS, WORKLOAD_WEIGHTS)[0]
            provider, model = rng.choices(self.models, self.model_weights)[0]
            is_byollm = rng.random() < 0.20
            invocation = str(uuid7())
            fingerprint = rng.choice(self.fingerprints)
            start = now - timedelta(seconds=rng.uniform(5, 3600))
            for call_index in range(rng.choice((1, 1, 1, 2, 3))):
                rec = self._call(provider, model, is_byollm)
                rec.update(
                    event_id=uuid7_str(),
                    occurred_at=(start + timedelta(seconds=call_index * 2.5)).isoformat(),
                    tenant_id=tenant,
                    user_id=user,
                    extension_id=extension,
                    function=function,
                    action_type=action,
                    invocation_id=invocation,
                    call_index=call_index,
                    purpose=purpose,
                    prompt_fingerprint=fingerprint,
                )
                out.append(rec)
        return out[:n]

    def _call(self, provider: str, model: str, is_byollm: bool) -> dict[str, Any]:
        rng = self.rng
        stream = rng.random() < 0.4
        budget = ["calls"] if rng.random() < 0.003 else (["tokens"] if rng.random() < 0.002 else [])
        base: dict[str, Any] = {
            "schema_version": 1,
            "provider": provider,
            "model": model,
            "is_byollm": is_byollm,
            "is_failover": rng.random() < 0.01,
            "is_stream": stream,
            "max_tokens": rng.choice((1024, 1500, 2048, 4096, 8192, None)),
            "budget_exceeded": budget,
        }
        if rng.random() < 0.02:  # failed before any output: nothing known
            return base | {
                "input_tokens": 0,
                "output_tokens": 0,
                "cache_read_tokens": 0,
                "cache_write_tokens": 0,
                "reasoning_tokens": 0,
                "usage_completeness": "missing",
                "stop_reason": None,
                "latency_ms": round(rng.uniform(20, 30_000), 3),
                "time_to_first_token_ms": None,
                "status": "error",
                "error_type": rng.choice(ERROR_TYPES),
            }
        inp = min(150_000, max(12, int(rng.lognormvariate(7.2, 1.1))))
        out = min(8_000, max(1, int(rng.lognormvariate(5.6, 0.9))))
        read = write = write_1h = reasoning = searches = 0
        if provider == "anthropic":
            if rng.random() < 0.35:
                read = int(inp * rng.uniform(0.3, 0.9))
            if rng.random() < 0.12:
                write = int((inp - read) * rng.uniform(0.2, 0.9))
                if rng.random() < 0.3:  # a 1-hour cache (a long-lived system prompt)
                    write_1h = write
            if rng.random() < 0.03:  # the web search tool
                searches = rng.randint(1, 3)
            if model.startswith("claude-sonnet") and rng.random() < 0.15:  # extended thinking
                reasoning = int(out * rng.uniform(0.2, 0.8))
        elif provider == "openai" and inp >= 1024 and rng.random() < 0.3:  # automatic prompt caching
            read = int(inp * rng.uniform(0.3, 0.9)) // 128 * 128
        latency = rng.lognormvariate(6.8, 0.7) + out * 8
        completeness = "estimated" if provider == "ollama" and rng.random() < 0.3 else "reported"
        return base | {
            "input_tokens": inp,
            "output_tokens": out,
            "cache_read_tokens": read,
            "cache_write_tokens": write,
            "cache_write_1h_tokens": write_1h,
            "reasoning_tokens": reasoning,
            "web_searches": searches,
            "usage_completeness": completeness,
            "stop_reason": rng.choice(STOP_REASONS[provider]),
            "latency_ms": round(latency, 3),
            "time_to_first_token_ms": round(rng.uniform(150, 900), 3) if stream else None,
            "status": "ok",
            "error_type": None,
        }

    def events(self, n: int, now: datetime) -> list[UsageEvent]:
        return [event_from_record(r) for r in self.records(n, now)]


# -- databases ------------------------------------------------------------------------------------------


def pg_conninfo(url: str, database: str | None = None) -> str:
    parsed = make_url(url)
    return (
        f"host={parsed.host or '127.0.0.1'} port={parsed.port or 5432} user={parsed.username or 'postgres'} "
        f"dbname={database or parsed.database or 'test'}" + (f" password={parsed.password}" if parsed.password else "")
    )


@contextmanager
def database(backend: str, workdir: Path) -> Iterator[str]:
    """A fresh database migrated to head; dropped (PostgreSQL) or deleted (SQLite) afterwards."""
    if backend == "sqlite":
        url = f"sqlite:///{workdir / 'ingest.db'}"
        migrate.upgrade(url)
        yield url
        return
    name = f"bench_ingest_{os.getpid()}"
    with psycopg.connect(pg_conninfo(PG_ADMIN_URL), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
        text = url.render_as_string(hide_password=False)
        migrate.upgrade(text)
        yield text
    finally:
        with psycopg.connect(pg_conninfo(PG_ADMIN_URL), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def price_rows(session: Session, events: list[UsageEvent], batch: uuid.UUID, now: datetime) -> list[tuple[Any, ...]]:
    """Exactly the usage_events tuples ingest writes for these events (ingest's own pricing and row builder)."""
    cards = RateCards(store.load_price_book(session, MARKUP))
    priced = ingest_module.price(events, cards, {})
    sqlite = store.dialect(session) == "sqlite"
    return [ingest_module._row(p, batch, now, sqlite) for p in priced]


class RawInserter:
    """The baseline: rows straight into usage_events on a driver connection of the same engine."""

    def __init__(self, engine: Engine, backend: str) -> None:
        self.backend = backend
        self.fairy = engine.raw_connection()
        self.conn: Any = self.fairy.driver_connection
        cols = ", ".join(COLUMNS)
        # Binary COPY with the table's own types: the same (fastest) format ingest uses for the event rows.
        self.copy_sql = f"COPY usage_events ({cols}) FROM STDIN (FORMAT BINARY)"
        self.types: list[str] | None = None
        self.insert_sql = f"INSERT INTO usage_events ({cols}) VALUES ({', '.join('?' * len(COLUMNS))})"

    def insert(self, rows: list[tuple[Any, ...]]) -> float:
        """Insert and commit; returns the perf_counter() at which the commit started."""
        self.insert_without_commit(rows)
        mid = time.perf_counter()
        self.conn.commit()
        return mid

    def insert_without_commit(self, rows: list[tuple[Any, ...]]) -> None:
        if self.backend == "postgresql":
            with self.conn.cursor() as cursor:
                if self.types is None:
                    self.types = store._column_types(cursor, "usage_events")
                with cursor.copy(self.copy_sql) as copy:
                    copy.set_types(self.types)
                    for row in rows:
                        copy.write_row(row)
        else:
            cursor = self.conn.cursor()
            cursor.executemany(self.insert_sql, rows)
            cursor.close()

    def close(self) -> None:
        self.fairy.close()


def drop_secondary_indexes(raw: RawInserter) -> list[str]:
    """Drop usage_events' secondary indexes (the primary key stays); returns the DDL that recreates them."""
    if raw.backend == "sqlite":
        sql = (
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage_events' AND sql IS NOT NULL"
        )
    else:
        sql = (
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'usage_events' "
            "AND indexname NOT IN (SELECT conname FROM pg_constraint)"
        )
    found = raw.conn.execute(sql).fetchall()
    for name, _ in found:
        raw.conn.execute(f'DROP INDEX "{name}"')
    raw.conn.commit()
    return [ddl for _, ddl in found]


def preload(session: Session, raw: RawInserter, factory: EventFactory, total: int, now: datetime) -> dict[str, Any]:
    """``total`` synthetic stored events over the last 30 days: realistic template rows (priced by ingest's
    code) with fresh UUIDv7 ids, invocation ids and times. COPY (PostgreSQL) / executemany (SQLite), 50k rows
    per transaction, secondary indexes dropped meanwhile and rebuilt at the end (the same definitions)."""
    if total <= 0:
        return {"rows": 0, "seconds": 0.0}
    sqlite = raw.backend == "sqlite"
    templates = price_rows(session, factory.events(4096, now), PRELOAD_BATCH, now)
    rng = random.Random(7)
    start = time.perf_counter()
    indexes = drop_secondary_indexes(raw)
    oldest = now - timedelta(days=30)
    span = 30 * 86400 - 3600
    done = 0
    while done < total:
        chunk = []
        for i in range(done, min(total, done + 50_000)):
            row = list(templates[i & 4095])
            occurred = oldest + timedelta(seconds=rng.random() * span)
            ingested = occurred + timedelta(seconds=2)
            if row[COL["invoice_period"]] is not None:
                row[COL["invoice_period"]] = f"{occurred.year:04d}-{occurred.month:02d}"
            if sqlite:
                row[COL["event_id"]], row[COL["invocation_id"]] = uuid7().hex, uuid7().hex
                row[COL["occurred_at"]], row[COL["ingested_at"]] = (
                    store.sqlite_time(occurred),
                    store.sqlite_time(ingested),
                )
            else:
                row[COL["event_id"]], row[COL["invocation_id"]] = uuid7(), uuid7()
                row[COL["occurred_at"]], row[COL["ingested_at"]] = occurred, ingested
            chunk.append(tuple(row))
        raw.insert(chunk)
        done += len(chunk)
    for ddl in indexes:  # built once over the loaded rows: much faster than 1M random index inserts
        raw.conn.execute(ddl)
    raw.conn.commit()
    seconds = time.perf_counter() - start
    # Settle the database so the measured rounds do not pay for the preload (checkpoint, statistics).
    if sqlite:
        raw.conn.execute("ANALYZE")
        raw.conn.commit()
        raw.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    else:
        raw.conn.commit()
        raw.conn.autocommit = True
        raw.conn.execute("VACUUM (ANALYZE) usage_events")
        raw.conn.execute("CHECKPOINT")
        raw.conn.autocommit = False
    return {"rows": total, "seconds": round(seconds, 2), "rows_per_s": round(total / seconds)}


# -- measurement ----------------------------------------------------------------------------------------


def timed_ingest(factory: sessionmaker[Session], items: list[Any]) -> tuple[float, float, IngestResult]:
    """(seconds of ingest + commit, seconds of the commit alone, result)."""
    with factory() as session:
        start = time.perf_counter()
        result = ingest(session, items, markup_pct=MARKUP)
        mid = time.perf_counter()
        session.commit()
        end = time.perf_counter()
    return end - start, end - mid, result


def timed_raw(raw: RawInserter, rows: list[tuple[Any, ...]]) -> tuple[float, float]:
    """(seconds of insert + commit, seconds of the commit alone)."""
    start = time.perf_counter()
    mid = raw.insert(rows)
    end = time.perf_counter()
    return end - start, end - mid


def summary(samples: list[tuple[float, float]], batch_size: int) -> dict[str, Any]:
    ordered = sorted(t for t, _ in samples)
    n = len(ordered)
    return {
        "batches": n,
        "events": n * batch_size,
        "events_per_s": round(n * batch_size / sum(ordered)),
        "median_batch_events_per_s": round(batch_size / statistics.median(ordered)),
        "slowest_batch_events_per_s": round(batch_size / ordered[-1]),
        "batch_ms_p50": round(statistics.median(ordered) * 1000, 2),
        "batch_ms_p90": round(ordered[min(n - 1, int(n * 0.9))] * 1000, 2),
        "batch_ms_max": round(ordered[-1] * 1000, 2),
        "commit_ms_p50": round(statistics.median(c for _, c in samples) * 1000, 2),
        "commit_share": round(sum(c for _, c in samples) / sum(ordered), 3),
    }


class Counts:
    def __init__(self, preload: int) -> None:
        self.preload = preload
        self.ingested = 0  # inserted by ingest (the ledger / rollup side must account for exactly these)
        self.raw = 0
        self.replay_inserted = 0
        self.replay_duplicates = 0
        self.rejected = 0


def run_round(
    variant: str,
    ctx: dict[str, Any],
    counts: Counts,
    batch_size: int,
) -> tuple[float, float]:
    """One batch of ``variant``: (timed seconds, of which commit). Builds its fresh events untimed first."""
    factory: sessionmaker[Session] = ctx["factory"]
    events: EventFactory = ctx["events"]
    now = datetime.now(UTC)
    if variant == "raw":
        with factory() as session:
            rows = price_rows(session, events.events(batch_size, now), RAW_BATCH, now)
        gc.collect()
        sample = timed_raw(ctx["raw"], rows)
        counts.raw += len(rows)
        return sample
    if variant == "replay":
        items: list[Any] = ctx["last_ingested"]
    elif variant == "ingest":
        items = events.events(batch_size, now)
    else:
        items = orjson.loads(orjson.dumps(events.records(batch_size, now)))
    gc.collect()
    elapsed, commit, result = timed_ingest(factory, items)
    counts.rejected += len(result.rejected)
    if variant == "replay":
        counts.replay_inserted += result.inserted
        counts.replay_duplicates += result.duplicates
    else:
        counts.ingested += result.inserted
        ctx["last_ingested"] = items if variant == "ingest" else [event_from_record(r) for r in items]
    return elapsed, commit


# -- per-stage breakdown (wrapping ingest's steps on extra batches) and cProfile --------------------------

# ingest's steps, by the names it calls them (others are reworking ingest: whatever exists is wrapped, the
# rest of the time shows as "other"). Group -> (module, function names).
STAGE_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "validate": ("ingest", ("validate",)),
    # lock_billing_periods takes the period locks and reads the finalized invoices
    "locks_price_book_finalized": ("both", ("lock_billing_periods", "load_price_book")),
    "price": ("ingest", ("price",)),  # SQLite; PostgreSQL prices inside the COPY (insert_events)
    "row_build": ("ingest", ("_row",)),  # SQLite; PostgreSQL builds rows inside the COPY (insert_events)
    "insert_events": ("store", ("insert_new_events", "unstored_events", "insert_new_events_postgresql")),
    "post_batch_server": ("store", ("post_batch_postgresql",)),  # PostgreSQL: transfers, accounts, rollups
    "transfers_build": ("ingest", ("postings_for", "accounts_of", "balance_deltas", "usage_transfer_rows")),
    "insert_transfers": ("store", ("post_transfers", "insert_transfer_rows")),
    "apply_balances": ("store", ("apply_balances",)),
    "rollups_build": ("ingest", ("fold", "fold_priced")),  # fold consumes rollup_input's generator: includes it
    "upsert_rollups": ("store", ("upsert_rollups",)),
}


def _statement_key(query: Any) -> str:
    text = query if isinstance(query, str) else str(getattr(query, "as_string", lambda _c: query)(None))
    return " ".join(text.split())[:72]


@contextmanager
def statement_timers() -> Iterator[dict[str, list[int]]]:
    """PostgreSQL: wall time and count of every statement the ingest connection runs (psycopg ``Cursor``
    execute / executemany / copy, patched on the class; restored after). ``copy`` includes the client-side
    encoding of the rows."""
    acc: dict[str, list[int]] = {}
    cls = psycopg.Cursor
    originals = {name: cls.__dict__[name] for name in ("execute", "executemany", "copy")}
    clock = time.perf_counter_ns

    def add(key: str, start: int) -> None:
        entry = acc.setdefault(key, [0, 0])
        entry[0] += clock() - start
        entry[1] += 1

    def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return originals["execute"](self, query, *args, **kwargs)
        finally:
            add(_statement_key(query), start)

    def executemany(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return originals["executemany"](self, query, *args, **kwargs)
        finally:
            add("executemany: " + _statement_key(query), start)

    @contextmanager
    def copy(self: Any, statement: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        start = clock()
        with originals["copy"](self, statement, *args, **kwargs) as cp:
            yield cp
        add(_statement_key(statement), start)

    cls.execute, cls.executemany, cls.copy = execute, executemany, copy  # type: ignore[method-assign,assignment]
    try:
        yield acc
    finally:
        for name, original in originals.items():
            setattr(cls, name, original)


@contextmanager
def stage_timers(skip: frozenset[str] = frozenset()) -> Iterator[dict[str, int]]:
    """Time every call of ingest's steps but the groups in ``skip`` (by monkeypatching the names ingest looks
    up; restored after)."""
    acc: dict[str, int] = {}
    originals: list[tuple[Any, str, Any]] = []

    def wrap(module: Any, name: str) -> None:
        original = getattr(module, name)
        clock = time.perf_counter_ns
        acc[name] = 0

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                acc[name] += clock() - start

        originals.append((module, name, original))
        setattr(module, name, timed)

    for group, (where, names) in STAGE_GROUPS.items():
        if group in skip:
            continue
        for name in names:
            modules = (ingest_module, store) if where == "both" else (ingest_module if where == "ingest" else store,)
            for module in modules:
                if callable(getattr(module, name, None)) and name not in acc:
                    wrap(module, name)
    try:
        yield acc
    finally:
        for module, name, original in reversed(originals):
            setattr(module, name, original)


def stage_breakdown(ctx: dict[str, Any], variant: str, batches: int, batch_size: int, counts: Counts) -> dict[str, Any]:
    factory: sessionmaker[Session] = ctx["factory"]
    events: EventFactory = ctx["events"]
    total_ns = commit_ns = 0
    # PostgreSQL prices and builds each row inside the COPY: timing _row there would count it twice
    nested = frozenset({"row_build"}) if ctx["raw"].backend == "postgresql" else frozenset()
    with stage_timers(nested) as acc, statement_timers() as statements:
        for _ in range(batches):
            now = datetime.now(UTC)
            if variant == "ingest":
                items: list[Any] = events.events(batch_size, now)
            else:
                items = orjson.loads(orjson.dumps(events.records(batch_size, now)))
            gc.collect()
            with factory() as session:
                start = time.perf_counter_ns()
                result = ingest(session, items, markup_pct=MARKUP)
                mid = time.perf_counter_ns()
                session.commit()
                end = time.perf_counter_ns()
            total_ns += end - start
            commit_ns += end - mid
            counts.ingested += result.inserted
    n = batches * batch_size
    us = {name: ns / 1000 / n for name, ns in acc.items()}
    grouped = {group: sum(us.get(name, 0.0) for name in names) for group, (_, names) in STAGE_GROUPS.items()}
    grouped["commit"] = commit_ns / 1000 / n
    total_us = total_ns / 1000 / n
    grouped["other"] = total_us - sum(grouped.values())
    return {
        "batches": batches,
        "total_us_per_event": round(total_us, 2),
        "events_per_s_while_wrapped": round(1e6 / total_us),
        "us_per_event": {k: round(v, 2) for k, v in grouped.items()},
        "share": {k: round(v / total_us, 3) for k, v in grouped.items()},
        "functions_us_per_event": {k: round(v, 2) for k, v in us.items()},
        **(
            {
                "postgresql_statements": [
                    {"statement": k, "per_batch": round(c / batches, 2), "us_per_event": round(ns / 1000 / n, 2)}
                    for k, (ns, c) in sorted(statements.items(), key=lambda kv: -kv[1][0])
                ],
                "postgresql_statements_us_per_event": round(sum(ns for ns, _ in statements.values()) / 1000 / n, 2),
            }
            if statements
            else {}
        ),
    }


def profile_batches(ctx: dict[str, Any], batches: int, batch_size: int, counts: Counts, top: int) -> dict[str, Any]:
    factory: sessionmaker[Session] = ctx["factory"]
    events: EventFactory = ctx["events"]
    profiler = cProfile.Profile()
    for _ in range(batches):
        items = events.events(batch_size, datetime.now(UTC))
        gc.collect()
        with factory() as session:
            profiler.enable()
            result = ingest(session, items, markup_pct=MARKUP)
            session.commit()
            profiler.disable()
        counts.ingested += result.inserted
    n = batches * batch_size
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(filename).name}:{line}" if line else filename
        rows.append((tottime, cumtime, ncalls, f"{func} ({where})"))
    by_tottime = sorted(rows, reverse=True)[:top]
    by_cumtime = sorted(rows, key=lambda r: r[1], reverse=True)[:top]

    def fmt(r: tuple[float, float, int, str]) -> dict[str, Any]:
        return {
            "function": r[3],
            "calls_per_event": round(r[2] / n, 3),
            "self_us_per_event": round(r[0] * 1e6 / n, 3),
            "cum_us_per_event": round(r[1] * 1e6 / n, 3),
        }

    return {
        "batches": batches,
        "top_self": [fmt(r) for r in by_tottime],
        "top_cumulative": [fmt(r) for r in by_cumtime],
    }


# -- sanity ---------------------------------------------------------------------------------------------


def sanity(engine: Engine, backend: str, counts: Counts) -> dict[str, Any]:
    sqlite = backend == "sqlite"
    fairy = engine.raw_connection()
    try:
        conn: Any = fairy.driver_connection
        cur = conn.cursor()

        def one(sql: str, params: tuple[Any, ...] = ()) -> Any:
            cur.execute(sql.replace("%s", "?") if sqlite else sql, params)
            return cur.fetchone()[0]

        batches = (RAW_BATCH.hex, PRELOAD_BATCH.hex) if sqlite else (RAW_BATCH, PRELOAD_BATCH)
        by_ingest = "ingest_batch NOT IN (%s, %s)"
        billed = f"billing_status = 'billed' AND charge_nanos > 0 AND {by_ingest}"
        stored = one("SELECT count(*) FROM usage_events")
        expected = counts.preload + counts.ingested + counts.raw
        ingested_rows = one(f"SELECT count(*) FROM usage_events WHERE {by_ingest}", batches)
        balance_sum = one("SELECT coalesce(sum(balance_nanos), 0) FROM accounts")
        accounts = one("SELECT count(*) FROM accounts")
        billed_events = one(f"SELECT count(*) FROM usage_events WHERE {billed}", batches)
        not_exactly_one = one(
            "SELECT count(*) FROM (SELECT e.event_id FROM usage_events e LEFT JOIN transfers t "
            "ON t.event_id = e.event_id AND t.kind = 'usage_charge' "
            "WHERE e.billing_status = 'billed' AND e.charge_nanos > 0 AND e.ingest_batch NOT IN (%s, %s) "
            "GROUP BY e.event_id HAVING count(t.id) <> 1) x",
            batches,
        )
        charge_transfers = one("SELECT count(*) FROM transfers WHERE kind = 'usage_charge'")
        charged = one(f"SELECT coalesce(sum(charge_nanos), 0) FROM usage_events WHERE {billed}", batches)
        transferred = one("SELECT coalesce(sum(amount_nanos), 0) FROM transfers WHERE kind = 'usage_charge'")
        rollup_calls = one("SELECT coalesce(sum(calls), 0) FROM usage_rollups")
        platform_calls = [
            one(f"SELECT coalesce(sum(calls), 0) FROM {table}")
            for table in ("platform_usage_hourly", "platform_usage_daily")
        ]
        transfers = one("SELECT count(*) FROM transfers")
        rollup_rows = one("SELECT count(*) FROM usage_rollups")
        cur.close()
        conn.rollback()
    finally:
        fairy.close()
    checks = {
        "usage_events_count_matches": stored == expected,
        "ingest_rows_match_ingest_inserted": ingested_rows == counts.ingested,
        "balances_sum_to_zero": int(balance_sum) == 0,
        "every_billed_event_has_exactly_one_usage_charge": not_exactly_one == 0,
        "no_extra_usage_charges": charge_transfers == billed_events,
        "charged_equals_transferred": int(charged) == int(transferred),
        "rollup_calls_equal_ingested": int(rollup_calls) == counts.ingested,
        "platform_rollup_calls_equal_ingested": all(int(c) == counts.ingested for c in platform_calls),
        "replays_inserted_nothing": counts.replay_inserted == 0,
        "nothing_rejected": counts.rejected == 0,
    }
    return {
        "usage_events": stored,
        "expected_usage_events": expected,
        "preloaded": counts.preload,
        "inserted_by_ingest": counts.ingested,
        "inserted_raw": counts.raw,
        "replay_duplicates": counts.replay_duplicates,
        "replay_inserted": counts.replay_inserted,
        "accounts": accounts,
        "accounts_balance_sum_nanos": int(balance_sum),
        "billed_events_with_charge": billed_events,
        "billed_events_without_exactly_one_usage_charge": not_exactly_one,
        "usage_charge_transfers": charge_transfers,
        "transfers": transfers,
        "rollup_rows": rollup_rows,
        "checks": checks,
        "all_ok": all(checks.values()),
    }


# -- concurrent ingesters (separate processes, like uvicorn workers or spool drainers) -------------------------


def _concurrent_worker(
    url: str, backend: str, kind: str, batches: int, batch_size: int, barrier: Any, results: Any
) -> None:
    """One process: build its batches untimed, wait for the others, then ingest (or raw-insert) them all."""
    engine = make_engine(url)
    factory = make_session_factory(engine)
    events = EventFactory(seed=int.from_bytes(os.urandom(4), "big"))
    now = datetime.now(UTC)
    raw = RawInserter(engine, backend) if kind == "raw" else None
    work: list[Any] = []
    for _ in range(batches):
        if raw is not None:
            with factory() as session:
                work.append(price_rows(session, events.events(batch_size, now), RAW_BATCH, now))
        else:
            work.append(events.events(batch_size, now))
    gc.collect()
    gc.freeze()
    barrier.wait()
    started, inserted = time.monotonic(), 0
    for items in work:
        if raw is not None:
            raw.insert(items)
            inserted += len(items)
        else:
            with factory() as session:
                inserted += ingest(session, items, markup_pct=MARKUP).inserted
                session.commit()
    results.put((kind, started, time.monotonic(), inserted))
    if raw is not None:
        raw.close()
    engine.dispose()


def concurrent_rounds(
    url: str, backend: str, workers: int, rounds: int, batches: int, batch_size: int, counts: Counts
) -> dict[str, Any]:
    """``rounds`` x (raw, ingest) with ``workers`` processes each: events/s = all events / first start to last
    end. Rounds alternate the order of the two kinds."""
    ctx = multiprocessing.get_context("spawn")
    rates: dict[str, list[int]] = {"raw": [], "ingest": []}
    for r in range(rounds):
        for kind in ("raw", "ingest") if r % 2 == 0 else ("ingest", "raw"):
            barrier, results = ctx.Barrier(workers), ctx.Queue()
            procs = [
                ctx.Process(target=_concurrent_worker, args=(url, backend, kind, batches, batch_size, barrier, results))
                for _ in range(workers)
            ]
            for proc in procs:
                proc.start()
            done = [results.get(timeout=600) for _ in procs]
            for proc in procs:
                proc.join(timeout=60)
            if any(proc.exitcode != 0 for proc in procs):
                raise RuntimeError(f"a {kind} worker failed")
            events = sum(d[3] for d in done)
            rates[kind].append(round(events / (max(d[2] for d in done) - min(d[1] for d in done))))
            if kind == "raw":
                counts.raw += events
            else:
                counts.ingested += events
    raw, ing = statistics.median(rates["raw"]), statistics.median(rates["ingest"])
    return {
        "workers": workers,
        "batches_per_worker": batches,
        "events_per_s": rates,
        "median_events_per_s": {"raw": raw, "ingest": ing},
        "ingest_over_raw": round(ing / raw, 3),
    }


# -- one backend ----------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with database(backend, workdir) as url:
        engine = make_engine(url)
        try:
            return measure(backend, engine, args)
        finally:
            engine.dispose()


def measure(backend: str, engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    factory = make_session_factory(engine)
    events = EventFactory(seed=1 if backend == "sqlite" else 2)
    raw = RawInserter(engine, backend)
    counts = Counts(args.preload)
    batch_size = args.batch_size
    try:
        with factory() as session:
            loaded = preload(session, raw, events, args.preload, datetime.now(UTC))
        log(f"[{backend}] preloaded {loaded}")
        ctx: dict[str, Any] = {"factory": factory, "events": events, "raw": raw}
        ctx["last_ingested"] = events.events(batch_size, datetime.now(UTC))
        timed_ingest(factory, ctx["last_ingested"])  # stored, so the first replay has something to replay
        counts.ingested += batch_size
        for _ in range(args.warmup):
            for variant in VARIANTS:
                run_round(variant, ctx, counts, batch_size)
        gc.collect()
        gc.freeze()
        times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        start = time.perf_counter()
        for i in range(args.batches):
            for variant in VARIANTS[i % 4 :] + VARIANTS[: i % 4]:  # rotate the order: no variant always first
                times[variant].append(run_round(variant, ctx, counts, batch_size))
        wall = time.perf_counter() - start
        gc.unfreeze()
        log(f"[{backend}] measured {args.batches} batches per variant in {wall:.1f}s")
        variants = {v: summary(t, batch_size) for v, t in times.items()}
        stages = {
            "ingest": stage_breakdown(ctx, "ingest", args.stage_batches, batch_size, counts),
            "ingest_from_dicts": stage_breakdown(ctx, "ingest_from_dicts", args.stage_batches, batch_size, counts),
        }
        profile = profile_batches(ctx, args.profile_batches, batch_size, counts, 30) if args.profile else None
        concurrent = None
        if backend == "postgresql" and args.workers > 1:
            log(f"[{backend}] {args.workers} concurrent processes per variant")
            url = engine.url.render_as_string(hide_password=False)
            concurrent = concurrent_rounds(
                url, backend, args.workers, args.concurrent_rounds, args.concurrent_batches, batch_size, counts
            )
        checks = sanity(engine, backend, counts)
    finally:
        raw.close()
    rate = {v: s["events_per_s"] for v, s in variants.items()}
    med = {v: s["median_batch_events_per_s"] for v, s in variants.items()}
    ratios = {
        "ingest_over_raw": round(rate["ingest"] / rate["raw"], 3),
        "ingest_over_raw_median_batch": round(med["ingest"] / med["raw"], 3),
        "ingest_from_dicts_over_raw": round(rate["ingest_from_dicts"] / rate["raw"], 3),
        "replay_over_raw": round(rate["replay"] / rate["raw"], 3),
        "validation_us_per_event": round((1 / rate["ingest_from_dicts"] - 1 / rate["ingest"]) * 1e6, 2),
    }
    baseline = "raw COPY" if backend == "postgresql" else "raw executemany"
    targets = [
        {
            "target": f"ingest rate >= {TARGET_RATIO:.0%} of the {baseline} rate",
            "value": ratios["ingest_over_raw"],
            "result": verdict(ratios["ingest_over_raw"] >= TARGET_RATIO),
        }
    ]
    if backend == "postgresql":
        targets += [
            {
                "target": f"ingest rate >= {TARGET_PG_RATE:,} events/s (all measured batches together)",
                "value": rate["ingest"],
                "result": verdict(rate["ingest"] >= TARGET_PG_RATE),
            },
            {
                "target": f"never below {TARGET_PG_RATE:,} events/s (slowest measured batch)",
                "value": variants["ingest"]["slowest_batch_events_per_s"],
                "result": verdict(variants["ingest"]["slowest_batch_events_per_s"] >= TARGET_PG_RATE),
            },
        ]
    if concurrent is not None:
        rate_w = concurrent["median_events_per_s"]["ingest"]
        targets.append(
            {
                "target": f"ingest rate >= {TARGET_PG_RATE:,} events/s with {args.workers} ingest processes",
                "value": rate_w,
                "result": verdict(rate_w >= TARGET_PG_RATE),
            }
        )
    info = [
        {
            "target": f"(info) ingest_from_dicts rate >= {TARGET_RATIO:.0%} of the {baseline} rate",
            "value": ratios["ingest_from_dicts_over_raw"],
            "result": verdict(ratios["ingest_from_dicts_over_raw"] >= TARGET_RATIO),
        }
    ]
    return {
        "batch_size": batch_size,
        "preload": loaded,
        "measured_wall_s": round(wall, 1),
        "variants": variants,
        "ratios": ratios,
        "targets": targets,
        "info": info,
        "sanity": checks,
        "stages": stages,
        **({"concurrent": concurrent} if concurrent else {}),
        **({"profile": profile} if profile else {}),
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def environment(backends: list[str]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
    }
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "metering"], cwd=root, capture_output=True, text=True)
        env["git_head"] = head.stdout.strip()
        env["metering_uncommitted_files"] = len(dirty.stdout.splitlines())
    except OSError:
        pass
    # Others are editing the ingest path: pin which code these numbers belong to.
    for name in ("billing/ingest.py", "billing/store.py", "billing/ledger.py"):
        digest = hashlib.sha256((root / "metering" / name).read_bytes()).hexdigest()[:12]
        env[f"sha256_{name.replace('/', '_').removesuffix('.py')}"] = digest
    if "postgresql" in backends:
        with psycopg.connect(pg_conninfo(PG_ADMIN_URL)) as conn:
            env["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            for setting in ("shared_buffers", "synchronous_commit", "wal_level", "max_wal_size"):
                env[f"pg_{setting}"] = conn.execute(f"SHOW {setting}").fetchone()[0]  # type: ignore[index]
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--preload", type=int, default=1_000_000, help="events stored before measuring")
    parser.add_argument("--batches", type=int, default=30, help="measured batches per variant per backend")
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds (every variant) before measuring")
    parser.add_argument("--stage-batches", type=int, default=5, help="extra batches for the per-stage breakdown")
    parser.add_argument("--profile", action="store_true", help="add cProfile's top functions on extra batches")
    parser.add_argument("--profile-batches", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="PostgreSQL: concurrent processes (0/1: skip)")
    parser.add_argument("--concurrent-rounds", type=int, default=3)
    parser.add_argument("--concurrent-batches", type=int, default=15, help="batches per process per round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python -m bench.ingest " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(backends),
        "markup_pct": str(MARKUP),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            result[backend] = run_backend(backend, args, Path(tmp))
    result["total_wall_s"] = round(time.perf_counter() - started, 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
