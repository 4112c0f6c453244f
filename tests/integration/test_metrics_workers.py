"""`metering serve --workers 2`: a scrape of /metrics is answered by whichever worker accepts it, and every worker
answers with the ingest counts of all of them (each used to answer with its own: the series jumped between the
workers' counts, and Prometheus read every drop as a counter reset)."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.events import record
from tests.integration.serving import assert_clean_shutdown, clean_env, create_token, serving

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
