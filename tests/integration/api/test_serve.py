"""`metering serve` as a real server (uvicorn subprocess on a free port), fed by httpx, against SQLite."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fakes.events import record

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metering(*args: str) -> list[str]:
    return [sys.executable, "-m", "metering.cli.main", *args]


def _wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"metering serve exited with {server.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout}s")


def test_metering_serve_ingests_a_batch(tmp_path: Path) -> None:
    db = tmp_path / "metering.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERING_", "ANTHROPIC_", "OPENAI_"))}
    env.update(METERING_DATA_DIR=str(tmp_path), METERING_DATABASE_URL=f"sqlite:///{db}")
    created = subprocess.run(
        _metering("tokens", "create", "--name", "sink", "--scope", "ingest"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("mtr_") and secret not in created.stderr and "only once" in created.stderr

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen(_metering("serve", "--port", str(port)), env=env, stdout=log, stderr=log)
        try:
            _wait_ready(f"{base}/readyz", server)
            records = [record(i) for i in range(50)]
            response = httpx.post(
                f"{base}/v1/events",
                content=orjson.dumps({"events": records}),
                headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            assert response.json() == {"inserted": 50, "duplicates": 0, "rejected": []}
            denied = httpx.post(f"{base}/v1/events", json={"events": []}, timeout=30)
            assert denied.status_code == 401 and denied.headers["content-type"] == "application/problem+json"
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    log_text = (tmp_path / "serve.log").read_text()
    # A graceful shutdown; recent uvicorn re-raises the signal afterwards, so -SIGTERM is a clean exit too.
    assert server.returncode in (0, -signal.SIGTERM), log_text
    assert "Application shutdown complete" in log_text and "Traceback" not in log_text
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM usage_events").fetchone() == (50,)
