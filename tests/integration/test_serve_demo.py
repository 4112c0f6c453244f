"""`metering demo` then `metering serve --demo` on a fresh SQLite data dir (what `./scripts/start` runs): the demo
traffic is metered and served on /metrics and /v1/usage with the printed admin token; a second seeding adds
traffic and breaks nothing."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

DEMO_IDS = {"alice", "bob", "carol", "dave", "erin", "frank", "grace", "acme", "globex", "initech"}
CHATTY = re.compile(r"chatty: (\d+) invocations, (\d+) calls")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metering(*args: str) -> list[str]:
    return [sys.executable, "-m", "metering.cli.main", *args]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERING_", "ANTHROPIC_", "OPENAI_"))}
    env.update(METERING_DATA_DIR=str(tmp_path / "data"), COLUMNS="200")
    return env


def _wait_ready(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"metering serve --demo exited with {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout}s")


def _calls_by_extension(text: str) -> dict[str, float]:
    calls: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert not set(sample.labels.values()) & DEMO_IDS, sample  # no tenant or user id in a label
            if sample.name == "metering_llm_calls_total":
                calls[sample.labels["extension"]] += sample.value
    return calls


def test_demo_then_serve_demo_serves_the_traffic_with_the_printed_token(tmp_path: Path) -> None:
    env = _env(tmp_path)
    demo = subprocess.run(_metering("demo"), env=env, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "Metered usage of the first invocations" in demo.stdout and "Traceback" not in demo.stderr
    first = CHATTY.search(demo.stdout)
    assert first is not None, demo.stdout

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        server = subprocess.Popen(
            _metering("serve", "--demo", "--port", str(port)), env=env, stdout=stdout, stderr=stderr
        )
        try:
            _wait_ready(f"{base}/readyz", server, err)
            printed = out.read_text()
            token = re.search(r"^  (mtr_\S+)$", printed, re.M)
            assert token is not None, printed
            secret = token.group(1)
            assert f"{base}/docs" in printed and f"{base}/metrics" in printed
            second = CHATTY.search(printed)
            assert second is not None, printed

            metrics = httpx.get(f"{base}/metrics", timeout=30)
            assert metrics.status_code == 200
            calls = _calls_by_extension(metrics.text)
            chatty_invocations = int(first.group(1)) + int(second.group(1))
            chatty_calls = int(first.group(2)) + int(second.group(2))
            assert calls["chatty"] == chatty_calls
            assert chatty_calls >= 10 * chatty_invocations  # the loop: many calls per invocation
            assert calls["chatty"] > calls["rewrite"] > 0

            auth = {"Authorization": f"Bearer {secret}"}
            assert httpx.get(f"{base}/docs", timeout=30).status_code == 200
            ingest = httpx.post(f"{base}/v1/events", json={"events": []}, headers=auth, timeout=30)
            assert ingest.status_code == 200, ingest.text  # the admin token has every scope
            if "/v1/usage" in httpx.get(f"{base}/openapi.json", timeout=30).json()["paths"]:
                example = re.search(r"curl -H 'Authorization: Bearer (\S+)' '(\S+/v1/usage\?\S+)'", printed)
                assert example is not None and example.group(1) == secret, printed
                usage = httpx.get(example.group(2), headers=auth, timeout=30)
                assert usage.status_code == 200, usage.text
                rows = {row["extension_id"]: row["calls"] for row in usage.json()["rows"]}
                assert rows["chatty"] == chatty_calls
                assert httpx.get(example.group(2), timeout=30).status_code == 401
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    log = err.read_text()
    assert server.returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log and "Traceback" not in log
