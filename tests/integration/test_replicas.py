"""Several replicas serving one PostgreSQL database (issue 4): two `metering serve --no-migrate` processes, one of
them with `--workers 2`, take the same usage events at once from several clients, in different overlapping
batches. Every request succeeds, each event is stored, charged and rolled up once, the ledger invariants hold,
and a write through one replica is read through the other."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from metering.billing.checks import run_checks
from metering.db.models import TransferRow, UsageEventRow, UsageRollupRow
from tests.fakes.events import mixed_records, record
from tests.integration.serving import Server, clean_env, create_token, serving

# PostgreSQL only (SQLite serialises writers on one file lock: not a replica setup). The conftest's PostgreSQL
# database: skipped when unreachable, a failure under CI=true.
pytestmark = [pytest.mark.slow, pytest.mark.pg, pytest.mark.parametrize("migrated_url", ["postgresql"], indirect=True)]

EVENTS = 1000
CLIENTS_PER_REPLICA = 2
TIMEOUT = 120.0  # per request; the whole race takes a few seconds


@pytest.fixture
def replicas(db_url: str, tmp_path: Path) -> Iterator[tuple[Server, Server, str]]:
    """Two replicas on the test's migrated database, (2 workers, 1 worker), and a token of scopes ingest + read."""
    env = clean_env(METERING_DATABASE_URL=db_url, METERING_DATA_DIR=str(tmp_path / "cli"))
    token = create_token(env, "ingest", "read", name="replicas")
    common = ("--no-migrate",)  # a release step migrated it (conftest)
    env_a = {**env, "METERING_DATA_DIR": str(tmp_path / "a")}
    env_b = {**env, "METERING_DATA_DIR": str(tmp_path / "b")}
    with (
        serving(env_a, tmp_path, *common, "--workers", "2", name="replica-a") as a,
        serving(env_b, tmp_path, *common, "--workers", "1", name="replica-b") as b,
    ):
        yield a, b, token
    for server in (a, b):
        assert "Traceback" not in server.err.read_text(), server.err.read_text()


def _batches(records: list[dict[str, Any]], seed: int) -> list[bytes]:
    """Every record once, in a shuffled order, cut into batches of a random size (20 to 80)."""
    rng = random.Random(seed)
    order = records[:]
    rng.shuffle(order)
    cuts, i = [], 0
    while i < len(order):
        size = rng.randint(20, 80)
        cuts.append(orjson.dumps({"events": order[i : i + size]}))
        i += size
    return cuts


def _race(targets: list[tuple[str, list[bytes]]], token: str) -> list[list[tuple[str, int, dict[str, Any]]]]:
    """One thread per (base URL, batches), released together; each thread's (base, status, body) per request."""
    start = threading.Barrier(len(targets))
    results: list[list[tuple[str, int, dict[str, Any]]]] = [[] for _ in targets]
    errors: list[BaseException] = []
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def client(slot: int, base: str, bodies: list[bytes]) -> None:
        try:
            with httpx.Client(base_url=base, headers=headers, timeout=TIMEOUT) as http:
                start.wait(timeout=TIMEOUT)
                for body in bodies:
                    response = http.post("/v1/events", content=body)
                    is_json = response.headers.get("content-type", "").startswith("application/json")
                    parsed = response.json() if is_json else {"text": response.text}
                    results[slot].append((base, response.status_code, parsed))
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i, *t), daemon=True) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=4 * TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a client thread is still running"
    assert errors == []
    return results


def _hour(at: datetime) -> str:
    return at.replace(minute=0, second=0, microsecond=0).isoformat()


def _usage(http: httpx.Client, **params: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    window = {"from": _hour(now - timedelta(hours=3)), "to": _hour(now + timedelta(hours=1))}
    response = http.get("/v1/usage", params={**window, **params})
    assert response.status_code == 200, response.text
    return response.json()


def _ingest_counters(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {
        s.labels["result"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "metering_ingest_events_total"
    }


def test_two_replicas_ingest_the_same_events_once(
    replicas: tuple[Server, Server, str], session_factory: sessionmaker[Session]
) -> None:
    a, b, token = replicas
    records = mixed_records(EVENTS)
    sent_ids = {uuid.UUID(r["event_id"]) for r in records}
    assert len(sent_ids) == EVENTS
    # Each replica gets every event from each of its clients: 2 x 2 x 400 submissions, in 4 different orders.
    targets = [(server.base, _batches(records, seed)) for seed, server in enumerate([a, b] * CLIENTS_PER_REPLICA)]
    results = [row for rows in _race(targets, token) for row in rows]

    assert [(base, status) for base, status, _ in results if status != 200] == []
    assert all(body["rejected"] == [] for _, _, body in results)
    assert sum(body["inserted"] for _, _, body in results) == EVENTS
    assert sum(body["inserted"] + body["duplicates"] for _, _, body in results) == 2 * CLIENTS_PER_REPLICA * EVENTS
    assert {base for base, _, body in results if body["inserted"]} == {a.base, b.base}  # both replicas wrote

    billed = sum(1 for r in records if not r["is_byollm"])  # every model is priced; BYOLLM is never billed
    with session_factory() as session:
        stored = session.scalars(select(UsageEventRow.event_id)).all()
        billed_events = session.scalar(select(func.count()).where(UsageEventRow.billing_status == "billed"))
        charges = session.scalar(select(func.count()).where(TransferRow.kind == "usage_charge"))
        rollup_calls = session.scalar(select(func.sum(UsageRollupRow.calls)))
        report = run_checks(session)  # what `metering billing check` runs
    assert len(stored) == EVENTS and set(stored) == sent_ids  # each event once
    assert report.problems == [] and report.transfers > 0 and report.rollups > 0
    assert charges == billed_events == billed  # each billed event charged once
    assert rollup_calls == EVENTS

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with (
        httpx.Client(base_url=a.base, headers=headers, timeout=30) as http_a,
        httpx.Client(base_url=b.base, headers=headers, timeout=30) as http_b,
    ):
        for http in (http_a, http_b):
            balances = http.get("/v1/balances")
            assert balances.status_code == 200, balances.text
            assert sum(acc["balance_nanos"] for acc in balances.json()["accounts"]) == 0
            assert any(acc["balance_nanos"] for acc in balances.json()["accounts"])
            assert _usage(http)["totals"]["calls"] == EVENTS

        # A write through one replica is read through the other, right after its 200.
        for writer, reader in ((http_a, http_b), (http_b, http_a)):
            fresh = record(0, user_id=f"fresh-{uuid.uuid4().hex[:8]}")
            written = writer.post("/v1/events", content=orjson.dumps({"events": [fresh]}))
            assert written.json() == {"inserted": 1, "duplicates": 0, "rejected": []}
            charged = reader.get("/v1/transfers", params={"event_id": fresh["event_id"], "kind": "usage_charge"})
            assert charged.status_code == 200 and len(charged.json()["items"]) == 1, charged.text
            assert _usage(reader, user_id=fresh["user_id"])["totals"]["calls"] == 1

    assert a.err.read_text().count("Application startup complete.") == 2  # two workers served replica A
    # The one-worker replica's ingest counters are exactly what its responses said (counted after commit).
    b_results = [body for base, _, body in results if base == b.base]
    assert _ingest_counters(b.base) == {
        "inserted": sum(body["inserted"] for body in b_results) + 1,
        "duplicate": sum(body["duplicates"] for body in b_results),
        "rejected": 0,
    }
