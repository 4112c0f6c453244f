"""The spool's database sink on PostgreSQL when the ingest's connection dies mid-batch: cut by a proxy at an exact
statement (before the COPY, after the posting statement ran, before COMMIT, after COMMIT committed but before its
reply reached the client), or its backend terminated while it waits on a lock or sits idle before COMMIT. The
flusher retries the batch: every event is stored once, charged once, the ledger checks pass, nothing is
dead-lettered."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from metering.billing.checks import run_checks
from metering.billing.ledger import REVENUE
from metering.billing.periods import period_of
from metering.db.engine import make_engine, make_session_factory
from metering.spool import DatabaseSink, Flusher, FlusherStats, Spool
from tests.fakes.events import mixed_records
from tests.integration.pg_proxy import COPY_DATA, COPY_DONE, Cut, PgProxy, is_commit, pg_proxy

N = 60


@pytest.fixture
def proxy(backend: str) -> Iterator[PgProxy]:
    if backend != "postgresql":
        pytest.skip("a connection killed mid-batch: PostgreSQL (SQLite has no connection to lose)")
    with pg_proxy() as proxy:
        yield proxy


@pytest.fixture
def app_name() -> str:
    return f"metering-outage-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def proxied(proxy: PgProxy, db_url: str, app_name: str) -> Iterator[sessionmaker[Session]]:
    """Sessions of the code under test, through the proxy, with a name of their own in pg_stat_activity."""
    url = proxy.url(db_url) + f"&application_name={app_name}"
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


def spool_events(tmp_path: Path, records: list[dict[str, object]]) -> Spool:
    spool = Spool(tmp_path / "spool").open()
    for rec in records:
        spool.append(orjson.dumps(rec))
    return spool


def assert_stored_once(engine: Engine, records: list[dict[str, object]], stats: FlusherStats, tmp_path: Path) -> None:
    ids = sorted(str(r["event_id"]) for r in records)
    with engine.connect() as conn:
        stored = sorted(str(i) for i in conn.scalars(text("SELECT event_id FROM usage_events")))
        per_event = conn.execute(
            text("SELECT event_id, kind, count(*) FROM transfers WHERE event_id IS NOT NULL GROUP BY 1, 2")
        ).all()
        charged = conn.scalar(text("SELECT coalesce(sum(charge_nanos), 0) FROM usage_events"))
        revenue = conn.scalar(text("SELECT balance_nanos FROM accounts WHERE id = :id"), {"id": REVENUE.id})
    assert stored == ids
    assert all(count == 1 for _, _, count in per_event)
    assert charged > 0 and revenue == charged
    assert (stats.delivered + stats.duplicates, stats.rejected, stats.pending) == (N, 0, 0)
    assert (
        not (tmp_path / "spool" / "rejected.jsonl").exists() or not (tmp_path / "spool" / "rejected.jsonl").read_text()
    )
    with make_session_factory(engine)() as session:
        report = run_checks(session)
    assert report.ok, report.problems


def deliver(spool: Spool, sessions: sessionmaker[Session]) -> FlusherStats:
    flusher = Flusher(spool, DatabaseSink(sessions), batch_size=N, interval_s=0.05, max_backoff_s=0.2)
    assert flusher.flush(timeout=60)  # inline: a failed pass is retried with backoff
    stats = flusher.stats
    flusher.stop(drain=False)
    assert sessions.kw["bind"].pool.checkedout() == 0  # the dead connection went back to the pool (and was dropped)
    return stats


CUTS = {
    "before the COPY": (lambda sql: sql.startswith("COPY usage_events"), Cut.BEFORE),
    "during the COPY": (lambda sql: sql == COPY_DATA, Cut.BEFORE),
    "after the COPY, before its reply": (lambda sql: sql == COPY_DONE, Cut.AFTER_REPLY),
    "before the posting statement": (lambda sql: "WITH b AS MATERIALIZED" in sql, Cut.BEFORE),
    "after the posting statement ran": (lambda sql: "WITH b AS MATERIALIZED" in sql, Cut.AFTER_REPLY),
    "before COMMIT": (is_commit, Cut.BEFORE),
    "after COMMIT committed, before its reply": (is_commit, Cut.AFTER_REPLY),
}


@pytest.mark.parametrize("where", list(CUTS))
def test_a_batch_whose_connection_dies_is_retried_and_stored_once(
    where: str, proxy: PgProxy, proxied: sessionmaker[Session], engine: Engine, tmp_path: Path
) -> None:
    records = mixed_records(N)
    matches, cut = CUTS[where]
    trap = proxy.trap(matches, cut)
    with spool_events(tmp_path, records) as spool:
        stats = deliver(spool, proxied)
    assert trap.done.is_set(), f"the connection was never cut {where}"
    assert stats.failures >= 1
    assert_stored_once(engine, records, stats, tmp_path)
    if cut is Cut.AFTER_REPLY and matches is is_commit:  # it committed: the retry finds every event stored
        assert (stats.delivered, stats.duplicates) == (0, N)
    else:
        assert (stats.delivered, stats.duplicates) == (N, 0)


def terminate(engine: Engine, app_name: str, waiting_on_lock: bool) -> None:
    """Terminate the one backend named ``app_name``, once it waits on a lock (``waiting_on_lock``) or sits idle in its
    transaction: pg_stat_activity is polled as the barrier (each query a fresh snapshot)."""
    state = "wait_event_type = 'Lock'" if waiting_on_lock else "state = 'idle in transaction'"
    find = text(f"SELECT pid FROM pg_stat_activity WHERE application_name = :name AND {state}")
    with engine.connect() as conn:
        while not (pids := list(conn.scalars(find, {"name": app_name}))):
            conn.rollback()
            threading.Event().wait(0.01)
        assert len(pids) == 1
        assert conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pids[0]})


def test_a_backend_terminated_while_it_waits_on_the_period_lock(
    proxied: sessionmaker[Session], engine: Engine, app_name: str, tmp_path: Path
) -> None:
    """The ingest blocks on its billing period's lock, held by the test: its backend is terminated there."""
    records = mixed_records(N)
    periods = sorted({period_of(r["occurred_at"]) for r in records})  # type: ignore[arg-type]
    result: list[FlusherStats] = []
    with spool_events(tmp_path, records) as spool, engine.connect() as holder:
        for period in periods:
            holder.execute(text("SELECT pg_advisory_xact_lock(hashtext('invoice:' || :p))"), {"p": period})
        worker = threading.Thread(target=lambda: result.append(deliver(spool, proxied)))
        worker.start()
        terminate(engine, app_name, waiting_on_lock=True)
        holder.rollback()  # the retry takes the lock
        worker.join(60)
    [stats] = result
    assert stats.failures >= 1 and (stats.delivered, stats.duplicates) == (N, 0)
    assert_stored_once(engine, records, stats, tmp_path)


def test_a_backend_terminated_idle_just_before_commit(
    proxy: PgProxy, proxied: sessionmaker[Session], engine: Engine, app_name: str, tmp_path: Path
) -> None:
    """COMMIT is held at the proxy (the backend idle in its transaction, every write done): the backend is
    terminated, then COMMIT goes on to a server that is gone."""
    records = mixed_records(N)
    trap = proxy.trap(is_commit, Cut.HOLD)
    result: list[FlusherStats] = []
    with spool_events(tmp_path, records) as spool:
        worker = threading.Thread(target=lambda: result.append(deliver(spool, proxied)))
        worker.start()
        assert trap.reached.wait(60)
        terminate(engine, app_name, waiting_on_lock=False)
        trap.release()
        worker.join(60)
    [stats] = result
    assert stats.failures >= 1 and (stats.delivered, stats.duplicates) == (N, 0)
    assert_stored_once(engine, records, stats, tmp_path)


def test_a_read_only_database_keeps_the_batch_until_it_is_writable(
    proxied: sessionmaker[Session], engine: Engine, tmp_path: Path
) -> None:
    """A primary demoted to a standby, or a database made read-only, refuses the batch's writes (SQLSTATE 25006, an
    InternalError): an outage, so the batch is kept and retried, never isolated nor dead-lettered."""
    read_only = threading.Event()
    read_only.set()

    def mode(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:  # each checkout: as the database is now
        dbapi_connection.execute(f"SET default_transaction_read_only = {'on' if read_only.is_set() else 'off'}")
        dbapi_connection.commit()

    bind = proxied.kw["bind"]
    event.listen(bind, "checkout", mode)
    records = mixed_records(N)
    with spool_events(tmp_path, records) as spool:
        flusher = Flusher(spool, DatabaseSink(proxied), batch_size=N, interval_s=0.05, max_backoff_s=0.2).start()
        while flusher.stats.failures < 2:  # refused twice: retried as it is, not isolated
            threading.Event().wait(0.01)
        assert (flusher.stats.pending, flusher.stats.rejected) == (N, 0)
        assert "read-only" in (flusher.stats.last_error or "")
        read_only.clear()
        assert flusher.flush(timeout=60)
        stats = flusher.stats
        flusher.stop()
    assert (stats.delivered, stats.duplicates) == (N, 0)
    assert_stored_once(engine, records, stats, tmp_path)
