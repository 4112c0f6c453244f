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
from tests.integration.serving import clean_env, create_token, free_port, serving

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
