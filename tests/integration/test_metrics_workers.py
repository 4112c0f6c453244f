"""`metering serve --workers 2`: a scrape of /metrics is answered by whichever worker accepts it, and every worker
answers with the ingest counts of all of them (each used to answer with its own: the series jumped between the
workers' counts, and Prometheus read every drop as a counter reset)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.events import record
from tests.integration.serving import Server, assert_clean_shutdown, clean_env, create_token, serving

pytestmark = pytest.mark.slow

REQUESTS = 12  # each on a connection of its own: the two workers take them as they accept them


def _ingest_counts(text: str) -> dict[str, float]:
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "metering_ingest_events_total"
    }


def test_every_worker_answers_a_scrape_with_the_ingest_counts_of_all_workers(db_url: str, tmp_path: Path) -> None:
    env = clean_env(METERING_DATABASE_URL=db_url, METERING_DATA_DIR=str(tmp_path / "data"))
    headers = {"Authorization": f"Bearer {create_token(env, 'ingest')}", "Content-Type": "application/json"}
    with serving(env, tmp_path, "--workers", "2") as server:
        for i in range(REQUESTS):
            body = orjson.dumps({"events": [record(i), {"not": "an event"}]})
            sent = httpx.post(f"{server.base}/v1/events", content=body, headers=headers, timeout=60)
            assert sent.status_code == 200 and sent.json()["inserted"] == 1, sent.text
        for _ in range(REQUESTS):
            scraped = httpx.get(f"{server.base}/metrics", timeout=60)
            assert scraped.status_code == 200, scraped.text
            assert _ingest_counts(scraped.text) == {"inserted": REQUESTS, "duplicate": 0, "rejected": REQUESTS}
    assert server.err.read_text().count("Application startup complete.") == 2  # two workers served
    assert_clean_shutdown(server)


def _workers(server: Server) -> list[int]:
    """The pids of the workers that started and completed their startup, in the order uvicorn logged them."""
    log = server.err.read_text()
    started = re.findall(r"Started server process \[(\d+)\]", log)
    return [int(pid) for pid in started[: log.count("Application startup complete.")]]


def _until_replaced(server: Server, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while len(_workers(server)) < count:
        assert time.monotonic() < deadline, server.err.read_text()
        time.sleep(0.1)


def test_counts_survive_a_worker_killed_and_restarted(db_url: str, tmp_path: Path) -> None:
    """uvicorn replaces a worker that dies; what the dead worker counted stays in its file and in every scrape.
    Both first workers are killed in turn, so whichever took the batches, their counts outlive them."""
    env = clean_env(METERING_DATABASE_URL=db_url, METERING_DATA_DIR=str(tmp_path / "data"))
    headers = {"Authorization": f"Bearer {create_token(env, 'ingest')}", "Content-Type": "application/json"}
    with serving(env, tmp_path, "--workers", "2") as server:
        records = [record(i) for i in range(REQUESTS)]
        for event in records:
            body = orjson.dumps({"events": [event, {"not": "an event"}]})
            sent = httpx.post(f"{server.base}/v1/events", content=body, headers=headers, timeout=60)
            assert sent.status_code == 200 and sent.json()["inserted"] == 1, sent.text
        resent = httpx.post(f"{server.base}/v1/events", content=orjson.dumps({"events": records[:1]}), headers=headers)
        assert resent.json()["duplicates"] == 1, resent.text
        _until_replaced(server, 2)
        first = _workers(server)
        for n, pid in enumerate(first, start=1):
            os.kill(pid, signal.SIGKILL)
            _until_replaced(server, 2 + n)
        assert set(_workers(server)[2:]).isdisjoint(first)  # two new workers answer the scrapes
        for _ in range(REQUESTS):
            scraped = httpx.get(f"{server.base}/metrics", timeout=60)
            assert scraped.status_code == 200, scraped.text
            assert _ingest_counts(scraped.text) == {"inserted": REQUESTS, "duplicate": 1, "rejected": REQUESTS}
