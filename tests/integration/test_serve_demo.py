"""`metering demo` then `metering serve --demo` on a fresh SQLite data dir (what `./scripts/start` runs): the demo
traffic is metered and served on /metrics and /v1/usage with the printed admin token; a second seeding adds
traffic and breaks nothing."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.api.test_docs_ui import loads_of
from tests.integration.serving import assert_clean_shutdown, clean_env, metering, serving

pytestmark = pytest.mark.slow

DEMO_IDS = {"alice", "bob", "carol", "dave", "erin", "frank", "grace", "acme", "globex", "initech"}
CHATTY = re.compile(r"chatty: (\d+) invocations, (\d+) calls")
CALLS = re.compile(r"(\d+) metered LLM calls")
ADDED = re.compile(r"added to the (\d+) usage events this database already held")


def _calls_by_extension(text: str) -> dict[str, float]:
    calls: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert not set(sample.labels.values()) & DEMO_IDS, sample  # no tenant or user id in a label
            if sample.name == "metering_llm_calls_total":
                calls[sample.labels["extension"]] += sample.value
    return calls


def test_demo_then_serve_demo_serves_the_traffic_with_the_printed_token(tmp_path: Path) -> None:
    env = clean_env(METERING_DATA_DIR=str(tmp_path / "data"), COLUMNS="200")
    demo = metering(env, "demo", timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "Metered usage of the first invocations" in demo.stdout and "Traceback" not in demo.stderr
    first = CHATTY.search(demo.stdout)
    assert first is not None, demo.stdout
    first_calls = CALLS.search(demo.stdout)
    assert first_calls is not None and ADDED.search(demo.stdout) is None, demo.stdout  # a fresh database

    with serving(env, tmp_path, "--demo", timeout=180) as server:
        base = server.base
        printed = server.out.read_text()
        token = re.search(r"^  (mtr_\S+)$", printed, re.M)
        assert token is not None, printed
        secret = token.group(1)
        assert f"{base}/docs" in printed and f"{base}/metrics" in printed
        second = CHATTY.search(printed)
        assert second is not None, printed
        added = ADDED.search(printed)  # a second seeding says that it adds to what is there, and how much that is
        assert added is not None and added.group(1) == first_calls.group(1), printed
        assert "earlier demo admin tokens stay valid" in printed

        metrics = httpx.get(f"{base}/metrics", timeout=30)
        assert metrics.status_code == 200
        calls = _calls_by_extension(metrics.text)
        chatty_invocations = int(first.group(1)) + int(second.group(1))
        chatty_calls = int(first.group(2)) + int(second.group(2))
        assert calls["chatty"] == chatty_calls
        assert chatty_calls >= 10 * chatty_invocations  # the loop: many calls per invocation
        assert calls["chatty"] > calls["rewrite"] > 0

        auth = {"Authorization": f"Bearer {secret}"}
        docs = httpx.get(f"{base}/docs", timeout=30)
        assert docs.status_code == 200
        assets = [url for _kind, url in loads_of(docs.text)]  # Swagger UI's script, stylesheet and icon
        assert len(assets) == 3 and all(url.startswith("/docs/assets/") for url in assets), assets  # served here
        for url in assets:
            assert httpx.get(f"{base}{url}", timeout=30).status_code == 200, url
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
    assert_clean_shutdown(server)
