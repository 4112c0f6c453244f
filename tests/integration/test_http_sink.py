"""The spool's HTTP sink against a real `metering serve`: a service that is down, or refuses the token,
loses nothing; once it is up, every spooled event is stored exactly once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from metering.events import event_from_record
from metering.spool import Flusher, Spool
from metering.spool.http_sink import HttpSink
from tests.fakes.events import record
from tests.integration.serving import clean_env, create_token, free_port, metering, serving

pytestmark = pytest.mark.slow


def test_a_down_service_loses_nothing_and_a_replay_counts_duplicates(tmp_path: Path) -> None:
    db = tmp_path / "service.db"
    env = clean_env(METERING_DATA_DIR=str(tmp_path / "service"), METERING_DATABASE_URL=f"sqlite:///{db}")
    token = create_token(env, "ingest", name="spool")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    records = [record(i) for i in range(300)]

    with Spool(tmp_path / "spool") as spool:
        wrong = Flusher(spool, HttpSink(base, "mtr_wrong"), interval_s=0.01, max_backoff_s=0.05)
        for rec in records:
            spool.append(orjson.dumps(rec))
        assert wrong.flush(timeout=0.5) is False  # nobody listening: connection refused, retried, kept
        assert wrong.stats.failures >= 1 and wrong.stats.pending == 300
        assert "ConnectionError" in (wrong.stats.last_error or "") or "ConnectError" in (wrong.stats.last_error or "")
        wrong.stop(drain=False)

        with serving(env, tmp_path, port=port):
            refused = Flusher(spool, HttpSink(base, "mtr_wrong"), interval_s=0.01, max_backoff_s=0.05)
            assert refused.flush(timeout=0.5) is False  # 401: kept for when the token is fixed
            assert "401" in (refused.stats.last_error or "") and refused.stats.pending == 300
            refused.stop(drain=False)

            sink = HttpSink(base, token)
            flusher = Flusher(spool, sink, batch_size=120, interval_s=0.01).start()
            assert flusher.flush(timeout=60)
            stats = flusher.stats
            flusher.stop()
            assert (stats.delivered, stats.duplicates, stats.pending) == (300, 0, 0)
            # A replay (e.g. a crash after the service stored a batch but before the cursor moved):
            again = sink.deliver([event_from_record(r) for r in records[:50]])
            assert (again.inserted, again.duplicates) == (0, 50)
            assert token not in repr(sink)
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM usage_events")}
    assert stored == {r["event_id"].replace("-", "") for r in records}


def _drain_into_service(tmp_path: Path, name: str, records: list[dict], **limits: str) -> tuple[object, set[str]]:
    db = tmp_path / f"{name}.db"
    env = clean_env(METERING_DATA_DIR=str(tmp_path / name), METERING_DATABASE_URL=f"sqlite:///{db}", **limits)
    token = create_token(env, "ingest", name="spool")
    port = free_port()
    with serving(env, tmp_path, name=name, port=port), Spool(tmp_path / f"{name}-spool") as spool:
        for rec in records:
            spool.append(orjson.dumps(rec))
        flusher = Flusher(spool, HttpSink(f"http://127.0.0.1:{port}", token), batch_size=250, interval_s=0.01)
        assert flusher.start().flush(timeout=90)
        stats = flusher.stats
        flusher.stop()
        dead = (tmp_path / f"{name}-spool" / "rejected.jsonl").read_text() if stats.rejected else ""
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM usage_events")}
    return (stats, dead), stored


def test_a_batch_the_service_refuses_as_too_large_is_split_and_an_oversized_event_dead_lettered(
    tmp_path: Path,
) -> None:
    """A 413 never passes on retry. The sink splits the batch until the parts pass, and an event too large on its
    own is rejected with the service's reason instead of holding up every event behind it (it used to: the spool
    slot stayed stuck for good)."""
    records = [record(i) for i in range(300)]
    (stats, _), stored = _drain_into_service(tmp_path, "few", records, METERING_API__MAX_BATCH_EVENTS="100")
    assert (stats.delivered, stats.rejected, stats.pending, stats.failures) == (300, 0, 0, 0)  # 250 -> 125 -> 63/62
    assert stored == {r["event_id"].replace("-", "") for r in records}

    oversized = record(300, extension_id="\u00e9" * 200, function="\u00e9" * 200, purpose="\u00e9" * 200)
    mixed = [*records[:20], oversized, *records[20:40]]  # one event alone is 783 bytes as a body, this one 2,300
    (stats, dead), stored = _drain_into_service(tmp_path, "small", mixed, METERING_API__MAX_BODY_BYTES="1024")
    assert (stats.delivered, stats.rejected, stats.pending) == (40, 1, 0)
    assert stored == {r["event_id"].replace("-", "") for r in records[:40]}
    assert oversized["event_id"] in dead and "too large" in dead


def test_spool_drain_with_the_http_sink_never_touches_the_database_setting(tmp_path: Path) -> None:
    """A host that only POSTs its events has no database: `metering spool drain` with the HTTP sink delivers
    without migrating or connecting to METERING_DATABASE_URL (here unreachable; it failed there before)."""
    db = tmp_path / "service.db"
    env = clean_env(METERING_DATA_DIR=str(tmp_path / "service"), METERING_DATABASE_URL=f"sqlite:///{db}")
    token = create_token(env, "ingest", name="spool")
    port = free_port()
    records = [record(i) for i in range(30)]
    with Spool(tmp_path / "host-spool") as spool:
        for rec in records:
            spool.append(orjson.dumps(rec))
    host = clean_env(
        METERING_DATA_DIR=str(tmp_path / "host"),
        METERING_DATABASE_URL="postgresql+psycopg://nobody@127.0.0.1:1/nothing",
        METERING_SPOOL__DIR=str(tmp_path / "host-spool"),
        METERING_SPOOL__SINK="http",
        METERING_SPOOL__HTTP_URL=f"http://127.0.0.1:{port}",
        METERING_SPOOL__HTTP_TOKEN=token,
    )
    with serving(env, tmp_path, name="service", port=port):
        done = metering(host, "spool", "drain", "--timeout", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "delivered=30" in done.stdout and "pending=0" in done.stdout
    assert not (tmp_path / "host").exists() or not list((tmp_path / "host").glob("*.db"))
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM usage_events")}
    assert stored == {r["event_id"].replace("-", "") for r in records}


def test_batches_are_sent_gzipped_and_ingested_once(tmp_path: Path) -> None:
    """The sink gzips each batch (a fraction of its JSON on the wire); the service decodes it."""
    import httpx

    db = tmp_path / "service.db"
    env = clean_env(METERING_DATA_DIR=str(tmp_path / "service"), METERING_DATABASE_URL=f"sqlite:///{db}")
    token = create_token(env, "ingest", name="spool")
    port = free_port()
    records = [record(i) for i in range(200)]
    sent: list[tuple[str | None, int]] = []

    def seen(request: httpx.Request) -> None:
        sent.append((request.headers.get("content-encoding"), len(request.content)))

    with serving(env, tmp_path, port=port), Spool(tmp_path / "spool") as spool:
        for rec in records:
            spool.append(orjson.dumps(rec))
        sink = HttpSink(f"http://127.0.0.1:{port}", token, client=httpx.Client(event_hooks={"request": [seen]}))
        flusher = Flusher(spool, sink, batch_size=200, interval_s=0.01).start()
        assert flusher.flush(timeout=60)
        stats = flusher.stats
        flusher.stop()
    assert (stats.delivered, stats.rejected, stats.pending) == (200, 0, 0)
    assert sink.gzip and [coding for coding, _ in sent] == ["gzip"]
    assert sent[0][1] < len(orjson.dumps({"events": records})) / 3
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM usage_events").fetchone()[0] == 200
