"""SQLite: a long writer holds the database write lock past the busy timeout. The spool's database sink fails the
batch and the flusher retries it; `metering serve` answers POST /v1/events with a 503 problem (never a 500), and the
HTTP sink retries it. Once the lock is released every event is stored once and the ledger checks pass."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import event, text

from metering.billing.checks import run_checks
from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory
from metering.spool import DatabaseSink, Flusher, Spool
from metering.spool.http_sink import HttpSink
from tests.fakes.events import mixed_records
from tests.integration.serving import clean_env, create_token, serving

N = 50


@contextmanager
def write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """The database write lock, held by another connection until the block ends (nothing is written)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def _short_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA busy_timeout=50")  # after the engine's own pragmas: the lock outlasts it


def assert_stored_once(path: Path, records: list[dict[str, Any]]) -> None:
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            stored = sorted(str(i) for i in conn.scalars(text("SELECT event_id FROM usage_events")))
            doubled = conn.scalar(
                text("SELECT count(*) FROM (SELECT 1 FROM transfers GROUP BY event_id, kind HAVING count(*) > 1) d")
            )
        with make_session_factory(engine)() as session:
            report = run_checks(session)
    finally:
        engine.dispose()
    assert stored == sorted(str(r["event_id"]).replace("-", "") for r in records)
    assert doubled == 0 and report.ok, report.problems


def _wait_for_failure(flusher: Flusher) -> None:
    done = threading.Event()
    while flusher.stats.failures == 0:
        done.wait(0.01)


def test_the_spool_sink_retries_a_batch_refused_by_a_locked_database(tmp_path: Path) -> None:
    path = tmp_path / "metering.db"
    migrate.upgrade(f"sqlite:///{path}")
    engine = make_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", _short_busy_timeout)
    records = mixed_records(N)
    try:
        with Spool(tmp_path / "spool") as spool:
            for rec in records:
                spool.append(orjson.dumps(rec))
            flusher = Flusher(spool, DatabaseSink(make_session_factory(engine)), interval_s=0.05, max_backoff_s=0.2)
            with write_lock(path):
                flusher.start()
                _wait_for_failure(flusher)  # the batch met the lock (and no part of it was dead-lettered)
                assert flusher.stats.pending == N and flusher.stats.rejected == 0
            assert flusher.flush(timeout=60)
            stats = flusher.stats
            flusher.stop()
    finally:
        engine.dispose()
    assert "locked" in (stats.last_error or "")
    assert (stats.delivered, stats.duplicates, stats.rejected, stats.pending) == (N, 0, 0, 0)
    assert (
        not (tmp_path / "spool" / "rejected.jsonl").exists() or not (tmp_path / "spool" / "rejected.jsonl").read_text()
    )
    assert_stored_once(path, records)


@pytest.mark.slow
def test_serve_answers_503_while_the_database_is_locked_and_the_http_sink_retries(tmp_path: Path) -> None:
    path = tmp_path / "service.db"
    env = clean_env(METERING_DATA_DIR=str(tmp_path / "data"), METERING_DATABASE_URL=f"sqlite:///{path}")
    token = create_token(env, "ingest", name="spool")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    first, records = mixed_records(1), mixed_records(N)
    with serving(env, tmp_path) as server:
        url = f"{server.base}/v1/events"
        assert httpx.post(url, content=orjson.dumps({"events": first}), headers=headers).status_code == 200
        with write_lock(path):  # past the service's busy timeout: the request waits for it, then gives up
            locked = httpx.post(url, content=orjson.dumps({"events": records}), headers=headers, timeout=120)
        assert locked.status_code == 503, locked.text
        assert locked.json()["code"] == "database_unavailable"
        with Spool(tmp_path / "spool") as spool:
            for rec in records:
                spool.append(orjson.dumps(rec))
            flusher = Flusher(spool, HttpSink(server.base, token), interval_s=0.05, max_backoff_s=0.2)
            with write_lock(path):
                flusher.start()
                _wait_for_failure(flusher)  # a 503: kept and retried, never isolated nor dead-lettered
                assert flusher.stats.pending == N and flusher.stats.rejected == 0
            assert flusher.flush(timeout=60)
            stats = flusher.stats
            flusher.stop()
    assert "503" in (stats.last_error or "")
    assert (stats.delivered, stats.duplicates, stats.rejected, stats.pending) == (N, 0, 0, 0)
    assert_stored_once(path, first + records)
