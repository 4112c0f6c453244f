"""A real Prometheus scrapes `metering serve`'s /metrics (issue 4): the target is up with no scrape error, and what
Prometheus stores (calls, tokens, billed and shadow USD by provider, model, purpose, extension, byollm, status;
unpriced events; ingest counters) is what the API reports and what was sent. Needs /usr/bin/prometheus (Debian's
`prometheus` package): skipped without it, a failure under CI=true (`.ci/run` installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.events import mixed_records, record
from tests.integration.serving import ROOT, Server, clean_env, create_token, free_port, serving, stop

pytestmark = pytest.mark.slow

EVENTS = 120
UNPRICED_EVERY = 11  # events of a model nobody prices: held, never billed
DIMENSIONS = ("provider", "model", "purpose", "extension", "byollm", "status")
GROUP_BY = "provider,model,purpose,extension,byollm,status"  # the same, as /v1/usage names them
TIMEOUT = 60.0


def _prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        message = "prometheus is not installed (apt-get install prometheus)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    """`metering serve` on SQLite with /metrics behind a `read` token, and that token (scopes ingest, read)."""
    env = clean_env(
        METERING_DATA_DIR=str(tmp_path / "data"),
        METERING_DATABASE_URL=f"sqlite:///{tmp_path / 'metering.db'}",
        METERING_API__METRICS_PUBLIC="false",
        METERING_BILLING__MARKUP_PCT="20",
    )
    token = create_token(env, "ingest", "read", name="prometheus")
    with serving(env, tmp_path) as server:
        yield server, token


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str, str], str]]:
    """Starts Prometheus scraping ``<base>/metrics`` every second with a bearer token; returns its base URL."""
    binary = _prometheus_binary()
    procs: list[subprocess.Popen[bytes]] = []

    def start(target_base: str, token: str) -> str:
        (tmp_path / "token").write_text(token)
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: metering\n    metrics_path: /metrics\n"
            f"    authorization:\n      type: Bearer\n      credentials_file: {tmp_path / 'token'}\n"
            f"    static_configs:\n      - targets: ['{target_base.removeprefix('http://')}']\n"
        )
        base = f"http://127.0.0.1:{free_port()}"
        args = [f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--log.level=warn"]
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, *args, f"--web.listen-address={base.removeprefix('http://')}"],
                stdout=out, stderr=out, cwd=ROOT,
            )  # fmt: skip
        procs.append(proc)
        _until(lambda: _get(f"{base}/-/ready") is not None, "Prometheus ready", proc, log)
        return base

    yield start
    for proc in procs:
        stop(proc)


def _get(url: str, **params: str) -> Any:
    try:
        response = httpx.get(url, params=params, timeout=5)
    except httpx.TransportError:
        return None
    if response.status_code != 200:
        return None
    return response.json() if response.headers.get("content-type", "").startswith("application/json") else True


def _until(
    ready: Callable[[], Any], what: str, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> Any:
    """``ready()``'s first truthy value, polled for up to TIMEOUT seconds (fails early if ``proc`` exits)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}: {log.read_text() if log else ''}")
        value = ready()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not {what} after {TIMEOUT}s")


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    body = _get(f"{prom}/api/v1/query", query=expr)
    assert body is not None and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _value(prom: str, expr: str) -> float:
    result = _query(prom, expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def _post(server: Server, token: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    response = httpx.post(
        f"{server.base}/v1/events",
        content=orjson.dumps({"events": records}),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    return response.json()


def _hour(at: datetime) -> str:
    return at.replace(minute=0, second=0, microsecond=0).isoformat()


def _usage_by_labels(server: Server, token: str) -> dict[tuple[str, ...], dict[str, Any]]:
    """GET /v1/usage grouped by every metric label, keyed like Prometheus's label values."""
    now = datetime.now(UTC)
    response = httpx.get(
        f"{server.base}/v1/usage",
        params={"from": _hour(now - timedelta(hours=3)), "to": _hour(now + timedelta(hours=1)), "group_by": GROUP_BY},
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    rows = {}
    for row in response.json()["rows"]:
        labels = (row["provider"], row["model"], row["purpose"], row["extension_id"], str(row["byollm"]).lower())
        rows[(*labels, row["status"])] = row
    return rows


def _by_labels(prom: str, expr: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"][d] for d in DIMENSIONS): float(r["value"][1]) for r in _query(prom, expr)}


def test_prometheus_scrapes_what_the_database_holds(
    prometheus: Callable[[str, str], str], service: tuple[Server, str]
) -> None:
    server, token = service
    assert httpx.get(f"{server.base}/metrics", timeout=TIMEOUT).status_code == 401  # the token in the config matters
    records = mixed_records(EVENTS, unpriced_every=UNPRICED_EVERY)
    assert _post(server, token, records[:80]) == {"inserted": 80, "duplicates": 0, "rejected": []}
    resent = _post(server, token, [*records[60:], {**records[0], "input_tokens": -1}])  # 20 again, 1 invalid
    assert (resent["inserted"], resent["duplicates"], len(resent["rejected"])) == (40, 20, 1)

    prom = prometheus(server.base, token)
    target = _until(
        lambda: next(
            (
                t
                for t in (_get(f"{prom}/api/v1/targets") or {}).get("data", {}).get("activeTargets", [])
                if t["health"] == "up"
            ),
            None,
        ),
        "scraped and up",
    )  # fmt: skip  (a scrape can time out on a loaded CI box: wait for one that succeeds)
    assert (target["health"], target["lastError"], target["scrapeUrl"]) == ("up", "", f"{server.base}/metrics")
    assert _value(prom, 'up{job="metering"}') == 1

    # The usage series, as /v1/usage reports them (the same rollups), and as sent.
    usage = _usage_by_labels(server, token)
    assert _by_labels(prom, "metering_llm_calls_total") == {k: row["calls"] for k, row in usage.items()}
    assert _value(prom, "sum(metering_llm_calls_total)") == EVENTS
    billed = _by_labels(prom, "metering_billed_usd_total")
    shadow = _by_labels(prom, "metering_shadow_usd_total")
    for key, row in usage.items():
        assert billed[key] == pytest.approx(row["billed_nanos"] / 1e9, rel=1e-12, abs=1e-12), key
        assert shadow[key] == pytest.approx(row["shadow_nanos"] / 1e9, rel=1e-12, abs=1e-12), key
    assert _value(prom, 'sum(metering_billed_usd_total{byollm="true"})') == 0  # BYOLLM is never billed
    assert _value(prom, 'sum(metering_billed_usd_total{byollm="false"})') > 0
    assert _value(prom, 'sum(metering_shadow_usd_total{byollm="true", model!="acme-private-7b"})') > 0
    for model in ("gpt-4o-mini", "claude-sonnet-4-6"):
        mine = [r for r in records if r["model"] == model]
        input_tokens = _value(prom, f'sum(metering_llm_tokens_total{{model="{model}", kind="input"}})')
        output_tokens = _value(prom, f'sum(metering_llm_tokens_total{{model="{model}", kind="output"}})')
        assert (input_tokens, output_tokens) == (
            sum(r["input_tokens"] for r in mine),
            sum(r["output_tokens"] for r in mine),
        )
    calls_by_model: dict[str, int] = defaultdict(int)
    for r in records:
        calls_by_model[r["model"]] += 1
    assert {
        r["metric"]["model"]: float(r["value"][1]) for r in _query(prom, "sum by (model) (metering_llm_calls_total)")
    } == calls_by_model
    unpriced = sum(row["unpriced"] for row in usage.values())
    assert unpriced > 0 and _value(prom, "metering_unpriced_events") == unpriced

    ingest = {r["metric"]["result"]: float(r["value"][1]) for r in _query(prom, "metering_ingest_events_total")}
    assert ingest == {"inserted": EVENTS, "duplicate": 20, "rejected": 1}

    # Scraped live: an ingest after Prometheus started shows in its next scrapes.
    more = [record(i, user_id="late", model="gpt-4o-mini", provider="openai") for i in range(5)]
    assert _post(server, token, more)["inserted"] == 5
    _until(lambda: _value(prom, "sum(metering_llm_calls_total)") == EVENTS + 5, "the late events scraped")
    assert _value(prom, 'metering_ingest_events_total{result="inserted"}') == EVENTS + 5
    final = _get(f"{prom}/api/v1/targets")["data"]["activeTargets"]
    assert [(t["health"], t["lastError"]) for t in final] == [("up", "")]


# Label values a client may send (any text up to 200 characters but NUL): the exposition must escape them so that
# Prometheus stores each exactly, and none can end its sample and forge another.
HOSTILE = (
    'q"uote',
    "back\\slash",
    "new\nline",
    "\\n",  # a backslash and an n, not a newline
    "cr\rret",
    "tab\tx",
    'x"} 1\nmetering_forged_total 9\n# ',
    "ünïcödé €😀",
    "\u2028line separator",
    "L" * 200,
)


def test_prometheus_stores_hostile_label_values_exactly(
    prometheus: Callable[[str, str], str], service: tuple[Server, str]
) -> None:
    server, token = service
    records = [
        record(i, model=name, extension_id=name[::-1], purpose=f"p {name}"[:200]) for i, name in enumerate(HOSTILE)
    ]
    assert _post(server, token, records)["inserted"] == len(HOSTILE)
    prom = prometheus(server.base, token)
    _until(lambda: _query(prom, "metering_llm_calls_total"), "scraped")
    stored = {
        (r["metric"]["model"], r["metric"]["extension"], r["metric"]["purpose"])
        for r in _query(prom, "metering_llm_calls_total")
    }
    assert stored == {(name, name[::-1], f"p {name}"[:200]) for name in HOSTILE}
    assert _query(prom, "metering_forged_total") == []
    assert [(t["health"], t["lastError"]) for t in _get(f"{prom}/api/v1/targets")["data"]["activeTargets"]] == [
        ("up", "")
    ]
