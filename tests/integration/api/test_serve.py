"""`metering serve` as a real server (uvicorn subprocess on a free port), fed by httpx, against SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fakes.events import record
from tests.integration.serving import assert_clean_shutdown, clean_env, metering, serving

pytestmark = pytest.mark.slow


def test_metering_serve_ingests_a_batch(tmp_path: Path) -> None:
    db = tmp_path / "metering.db"
    env = clean_env(METERING_DATA_DIR=str(tmp_path), METERING_DATABASE_URL=f"sqlite:///{db}")
    created = metering(env, "tokens", "create", "--name", "sink", "--scope", "ingest")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("mtr_") and secret not in created.stderr and "only once" in created.stderr

    with serving(env, tmp_path) as server:
        records = [record(i) for i in range(50)]
        response = httpx.post(
            f"{server.base}/v1/events",
            content=orjson.dumps({"events": records}),
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"inserted": 50, "duplicates": 0, "rejected": []}
        denied = httpx.post(f"{server.base}/v1/events", json={"events": []}, timeout=30)
        assert denied.status_code == 401 and denied.headers["content-type"] == "application/problem+json"
    assert_clean_shutdown(server)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (50,)
