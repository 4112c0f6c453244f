"""`metering serve` on PostgreSQL when a request's connection dies (cut by a proxy at an exact statement, or its
backend terminated before COMMIT): the request is a 503 problem, never a 500; the pool recovers on the next request;
a retry of the same batch or the same Idempotency-Key stores, charges or credits exactly once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from metering.billing.checks import run_checks
from metering.billing.ledger import REVENUE, user_wallet
from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory
from metering.spool import Flusher, Spool
from metering.spool.http_sink import HttpSink
from tests.conftest import temporary_pg_database
from tests.fakes.events import mixed_records
from tests.integration.pg_proxy import Cut, PgProxy, Trap, is_commit, pg_proxy
from tests.integration.serving import Server, clean_env, create_token, metering, serving
from tests.integration.test_outage_spool_pg import terminate

pytestmark = pytest.mark.slow
N = 40


@dataclass(frozen=True)
class Service:
    server: Server
    proxy: PgProxy
    engine: Engine  # straight to the database, not through the proxy
    app_name: str
    ingest: dict[str, str]  # headers
    admin: dict[str, str]
    env: dict[str, str]  # the CLI's, straight to the database


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with temporary_pg_database() as url, pg_proxy() as proxy:
        migrate.upgrade(url)
        app_name = f"metering-outage-{uuid.uuid4().hex[:12]}"
        direct = clean_env(METERING_DATA_DIR=str(tmp_path / "data"), METERING_DATABASE_URL=url)
        ingest, admin = create_token(direct, "ingest", name="ingest"), create_token(direct, "admin", name="admin")
        proxied = {**direct, "METERING_DATABASE_URL": proxy.url(url) + f"&application_name={app_name}"}
        engine = make_engine(url)
        try:
            with serving(proxied, tmp_path) as server:
                yield Service(
                    server, proxy, engine, app_name,
                    {"Authorization": f"Bearer {ingest}"}, {"Authorization": f"Bearer {admin}"}, direct,
                )  # fmt: skip
        finally:
            engine.dispose()


def assert_outage(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "database_unavailable"


def assert_ledger_ok(engine: Engine) -> None:
    with make_session_factory(engine)() as session:
        report = run_checks(session)
    assert report.ok, report.problems


EVENT_CUTS = {
    "before the COPY": (lambda sql: sql.startswith("COPY usage_events"), Cut.BEFORE, None),
    "after the posting statement ran": (lambda sql: "WITH b AS MATERIALIZED" in sql, Cut.AFTER_REPLY, None),
    "before COMMIT": (is_commit, Cut.BEFORE, "COPY usage_events"),
    "after COMMIT committed": (is_commit, Cut.AFTER_REPLY, "COPY usage_events"),
    "backend terminated before COMMIT": (is_commit, Cut.HOLD, "COPY usage_events"),
}


def test_post_events_with_its_connection_killed_is_a_503_and_its_retry_stores_each_event_once(
    service: Service,
) -> None:
    url = f"{service.server.base}/v1/events"
    for where, (matches, cut, after) in EVENT_CUTS.items():
        batch = orjson.loads(orjson.dumps({"events": mixed_records(N)}))
        trap = service.proxy.trap(matches, cut, after=after)
        response = post_cut(service, trap, url, batch, service.ingest)
        assert trap.reached.is_set(), where
        assert_outage(response)
        retry = httpx.post(url, json=batch, headers=service.ingest, timeout=60)  # the pool recovered
        assert retry.status_code == 200, (where, retry.text)
        counts = retry.json()
        committed = where == "after COMMIT committed"
        assert (counts["inserted"], counts["duplicates"], counts["rejected"]) == (
            (0, N, []) if committed else (N, 0, [])
        ), where
        again = httpx.post(url, json=batch, headers=service.ingest, timeout=60).json()
        assert (again["inserted"], again["duplicates"]) == (0, N), where
    with service.engine.connect() as conn:
        stored = conn.scalar(text("SELECT count(*) FROM usage_events"))
        charged = conn.scalar(text("SELECT sum(charge_nanos) FROM usage_events"))
        revenue = conn.scalar(text("SELECT balance_nanos FROM accounts WHERE id = :id"), {"id": REVENUE.id})
        doubled = conn.scalar(
            text("SELECT count(*) FROM (SELECT 1 FROM transfers GROUP BY event_id, kind HAVING count(*) > 1) d")
        )
    assert stored == N * len(EVENT_CUTS) and revenue == charged and doubled == 0
    assert_ledger_ok(service.engine)
    checked = metering(service.env, "billing", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def post_cut(service: Service, trap: Trap, url: str, body: object, headers: dict[str, str]) -> httpx.Response:
    """POST through the trap; a held statement's backend is terminated (pg_stat_activity: idle in its transaction)
    before the statement goes on."""
    if trap.cut is not Cut.HOLD:
        return httpx.post(url, json=body, headers=headers, timeout=60)
    responses: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: responses.append(httpx.post(url, json=body, headers=headers, timeout=60)))
    worker.start()
    assert trap.reached.wait(60)
    terminate(service.engine, service.app_name, waiting_on_lock=False)
    trap.release()
    worker.join(60)
    return responses[0]


@pytest.mark.parametrize("cut", [Cut.BEFORE, Cut.AFTER_REPLY])
@pytest.mark.parametrize("body", [b'{"events": []}', b"not json"])
def test_a_token_lookup_whose_connection_dies_is_a_503(service: Service, cut: Cut, body: bytes) -> None:
    """A token's first use records it (its own short transaction, before the endpoint, or before a body that is not
    JSON is refused): its connection dying there is a 503 too, and the next request goes through."""
    url = f"{service.server.base}/v1/events"
    headers = {"Authorization": f"Bearer {create_token(service.env, 'ingest')}", "Content-Type": "application/json"}
    trap = service.proxy.trap(
        (lambda sql: sql.startswith("UPDATE api_tokens")) if cut is Cut.BEFORE else is_commit,
        cut,
        after=None if cut is Cut.BEFORE else "UPDATE api_tokens",
    )
    assert_outage(httpx.post(url, content=body, headers=headers, timeout=60))
    assert trap.done.is_set()
    after = httpx.post(url, content=body, headers=headers, timeout=60)
    assert after.status_code == (200 if body.startswith(b"{") else 422), after.text


CREDIT_CUTS = {
    "before the transfer": (lambda sql: "INSERT INTO transfers" in sql, Cut.BEFORE, None),
    "before COMMIT": (is_commit, Cut.BEFORE, "INSERT INTO transfers"),
    "after COMMIT committed": (is_commit, Cut.AFTER_REPLY, "INSERT INTO transfers"),
    "backend terminated before COMMIT": (is_commit, Cut.HOLD, "INSERT INTO transfers"),
}


@pytest.mark.parametrize("kind", ["credit", "adjustment"])
def test_a_credit_with_its_connection_killed_is_posted_once_on_its_retry(service: Service, kind: str) -> None:
    url = f"{service.server.base}/v1/admin/credits"
    for i, (where, (matches, cut, after)) in enumerate(CREDIT_CUTS.items()):
        headers = {**service.admin, "Idempotency-Key": f"key-{i}"}
        body = {"tenant_id": "tenant-1", "user_id": f"user-{i}", "amount": "2.50", "kind": kind}
        trap = service.proxy.trap(matches, cut, after=after)
        response = post_cut(service, trap, url, body, headers)
        assert trap.reached.is_set(), where
        assert_outage(response)
        retry = httpx.post(url, json=body, headers=headers, timeout=60)
        committed = where == "after COMMIT committed"
        assert retry.status_code == (200 if committed else 201), (where, retry.text)
        assert retry.headers["Idempotent-Replayed"] == ("true" if committed else "false")
        again = httpx.post(url, json=body, headers=headers, timeout=60)
        assert again.status_code == 200 and again.json()["transfer_id"] == retry.json()["transfer_id"]
        with service.engine.connect() as conn:
            balance = conn.scalar(
                text("SELECT balance_nanos FROM accounts WHERE id = :id"),
                {"id": user_wallet("tenant-1", f"user-{i}").id},
            )
            posted = conn.scalar(text("SELECT count(*) FROM transfers WHERE idempotency_key = :k"), {"k": f"key-{i}"})
        assert (balance, posted) == (int(Decimal("2.50").scaleb(9)), 1), where
    assert_ledger_ok(service.engine)


def test_a_read_only_database_is_a_503_and_the_http_sink_keeps_the_batch(tmp_path: Path) -> None:
    """A primary demoted to a standby in a failover, or a database made read-only for maintenance, refuses every
    write with `cannot execute … in a read-only transaction` (SQLSTATE 25006, an InternalError to psycopg): retrying
    later helps, so a 503, not a 500 (on a 500 the HTTP sink isolates the events and dead-letters them)."""
    with temporary_pg_database() as url:
        migrate.upgrade(url)
        app_name = f"metering-outage-{uuid.uuid4().hex[:12]}"
        env = clean_env(METERING_DATA_DIR=str(tmp_path / "data"), METERING_DATABASE_URL=url)
        token = create_token(env, "ingest", name="ingest")
        database = make_url(url).database
        engine = make_engine(url)
        records = mixed_records(N)
        try:
            with engine.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on'))
                conn.commit()
            served = {**env, "METERING_DATABASE_URL": f"{url}?application_name={app_name}"}
            with serving(served, tmp_path) as server, Spool(tmp_path / "spool") as spool:
                batch = orjson.loads(orjson.dumps({"events": records}))
                headers = {"Authorization": f"Bearer {token}"}
                refused = httpx.post(f"{server.base}/v1/events", json=batch, headers=headers, timeout=60)
                assert_outage(refused)
                for rec in records:
                    spool.append(orjson.dumps(rec))
                flusher = Flusher(spool, HttpSink(server.base, token), interval_s=0.05, max_backoff_s=0.2)
                assert not flusher.flush(timeout=1)  # kept, retried: nothing isolated nor dead-lettered
                assert (flusher.stats.pending, flusher.stats.rejected) == (N, 0)
                assert "503" in (flusher.stats.last_error or "")
                with engine.connect() as conn:  # writable again; the service's connections are replaced
                    conn.execute(text(f'ALTER DATABASE "{database}" RESET default_transaction_read_only'))
                    conn.commit()
                    conn.execute(
                        text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :n"),
                        {"n": app_name},
                    )
                assert flusher.flush(timeout=60)
                stats = flusher.stats
                flusher.stop()
            assert (stats.delivered, stats.duplicates, stats.rejected) == (N, 0, 0)
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM usage_events")) == N
            assert_ledger_ok(engine)
        finally:
            engine.dispose()


def test_a_retry_racing_its_first_request_still_committing_counts_duplicates(service: Service, tmp_path: Path) -> None:
    """The HTTP sink gives up on a request whose COMMIT is held (its read timeout) and retries the batch while the
    first is still in flight: the retry waits on the first's rows (seen in pg_stat_activity), the first commits, and
    the retry counts every event a duplicate. Stored once, charged once."""
    token = service.ingest["Authorization"].removeprefix("Bearer ")
    trap = service.proxy.trap(is_commit, Cut.HOLD, after="COPY usage_events")
    records = mixed_records(N)
    with Spool(tmp_path / "spool") as spool:
        for rec in records:
            spool.append(orjson.dumps(rec))
        sink = HttpSink(service.server.base, token, timeout_s=5)
        flusher = Flusher(spool, sink, batch_size=N, interval_s=0.05, max_backoff_s=0.2).start()
        assert trap.reached.wait(60)
        waiting = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n AND wait_event_type = 'Lock'")
        with service.engine.connect() as conn:  # the retry's COPY waits on the first request's uncommitted rows
            while not conn.scalar(waiting, {"n": service.app_name}):
                conn.rollback()
                threading.Event().wait(0.01)
        trap.release()  # the first request commits
        assert flusher.flush(timeout=60)
        stats = flusher.stats
        flusher.stop()
    assert stats.failures >= 1 and "Timeout" in (stats.last_error or "")
    assert (stats.delivered, stats.duplicates, stats.rejected, stats.pending) == (0, N, 0, 0)
    with service.engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM usage_events")) == N
        doubled = conn.scalar(
            text("SELECT count(*) FROM (SELECT 1 FROM transfers GROUP BY event_id, kind HAVING count(*) > 1) d")
        )
    assert doubled == 0
    assert_ledger_ok(service.engine)


def test_killed_connections_do_not_leak_from_the_pool(service: Service) -> None:
    """More killed requests than the pool holds (5, and 10 more): each dead connection leaves the pool, so the next
    request still gets one (a leak would end in the pool's timeout, a 503 for every later request)."""
    url = f"{service.server.base}/v1/events"
    for _ in range(20):
        batch = orjson.loads(orjson.dumps({"events": mixed_records(2)}))
        trap = service.proxy.trap(lambda sql: sql.startswith("COPY usage_events"), Cut.BEFORE)
        assert_outage(httpx.post(url, json=batch, headers=service.ingest, timeout=60))
        assert trap.done.is_set()
    batch = orjson.loads(orjson.dumps({"events": mixed_records(2)}))
    done = httpx.post(url, json=batch, headers=service.ingest, timeout=60)
    assert done.status_code == 200 and done.json()["inserted"] == 2, done.text
