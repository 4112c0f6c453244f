"""GET /metrics on SQLite and PostgreSQL: the exposition parses, its numbers equal the rollup sums, labels are
bounded (no tenant or user id), models beyond the top N fold into "other", ingest is counted after commit."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

import metering.metrics as metrics_module
from metering.api import deps
from metering.api.app import create_app
from metering.auth import Scope, TokenPrincipal, create_token
from metering.billing.ingest import ingest
from metering.db.models import UsageEventRow, UsageRollupRow
from metering.db.usage_totals import OTHER
from metering.events import event_from_record
from tests.fakes.events import record
from tests.integration.api.conftest import app_settings, assert_problem, bearer, post_events

TENANTS = ("tenant-acme-7f3a", "tenant-globex-91b2")
USERS = ("user-alice-0c1d", "user-bob-5e6f", "user-carol-a8b9")
TOKEN_COLUMNS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_read": "cache_read_tokens",
    "cache_write": "cache_write_tokens",
    "cache_write_1h": "cache_write_1h_tokens",
    "reasoning": "reasoning_tokens",
}
LABELS = ("provider", "model", "purpose", "extension", "byollm", "status")


class CommitFails(Session):
    def commit(self) -> None:
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))


def _token(session_factory: sessionmaker, *scopes: Scope) -> str:
    with session_factory() as session:
        _row, secret = create_token(session, "metrics test", scopes)
        session.commit()
    return secret


def _records() -> list[dict[str, Any]]:
    """Known events: three users in two tenants, two providers, four models, BYOLLM, errors, an unpriced model."""
    out: list[dict[str, Any]] = []
    for i in range(12):
        out.append(
            record(
                i,
                tenant_id=TENANTS[i % 2],
                user_id=USERS[i % 3],
                input_tokens=100 + i,
                output_tokens=40 + i,
                cache_read_tokens=i,
                reasoning_tokens=i % 4,
                cache_write_tokens=10 * (i % 3),
                cache_write_1h_tokens=5 * (i % 3),
                web_searches=i % 4,
            )
        )
    for i in range(5):  # BYOLLM on openai: not billed, a shadow cost
        out.append(
            record(
                i,
                tenant_id=TENANTS[0],
                user_id=USERS[1],
                provider="openai",
                model="gpt-4o-mini",
                is_byollm=True,
                purpose="action_items",
                extension_id="chatty",
                function="summarize_thread",
            )
        )
    for i in range(3):  # failed calls
        out.append(
            record(
                i,
                tenant_id=TENANTS[1],
                user_id=USERS[2],
                model="claude-haiku-4-5",
                status="error",
                error_type="server_error",
                input_tokens=0,
                output_tokens=0,
                cache_read_tokens=0,
                usage_completeness="missing",
            )
        )
    for i in range(2):  # a platform model nobody has a price for: held unpriced
        out.append(record(i, provider="openai_compatible", model="house-model-x", tenant_id=TENANTS[0]))
    return out


def _parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value}"""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _rollup_sums(session_factory: sessionmaker) -> dict[tuple[str, ...], dict[str, int]]:
    """Straight from usage_rollups: labels -> summed counters (what /metrics must show)."""
    r = UsageRollupRow
    keys = (r.provider, r.model, r.purpose, r.extension_id, r.is_byollm, r.status)
    columns = ("calls", *TOKEN_COLUMNS.values(), "web_searches", "billed_nanos", "shadow_nanos")
    with session_factory() as session:
        rows = session.execute(select(*keys, *(func.sum(getattr(r, c)) for c in columns)).group_by(*keys)).all()
    return {
        (p, m, pu, e, "true" if b else "false", s): dict(zip(columns, (int(v) for v in values), strict=True))
        for p, m, pu, e, b, s, *values in rows
    }


def _key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def test_exposition_parses_and_equals_the_rollup_sums(db_url, tmp_path, session_factory):
    records = _records()
    with TestClient(create_app(app_settings(db_url, tmp_path))) as client:
        secret = _token(session_factory, Scope.INGEST)
        body = post_events(client, records, secret).json()
        assert body == {"inserted": len(records), "duplicates": 0, "rejected": []}
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _parse(response.text)

    expected = _rollup_sums(session_factory)
    assert sum(v["calls"] for v in expected.values()) == len(records)
    calls = samples["metering_llm_calls_total"]
    assert len(calls) == len(expected)
    for labels, sums in expected.items():
        key = _key(dict(zip(LABELS, labels, strict=True)))
        assert calls[key] == sums["calls"]
        for kind, column in TOKEN_COLUMNS.items():
            assert samples["metering_llm_tokens_total"][_key({**dict(key), "kind": kind})] == sums[column]
        assert samples["metering_llm_web_searches_total"][key] == sums["web_searches"]
        assert samples["metering_billed_usd_total"][key] == sums["billed_nanos"] / 1e9
        assert samples["metering_shadow_usd_total"][key] == sums["shadow_nanos"] / 1e9

    # Cross-checks against the raw events: BYOLLM is never billed, its shadow cost is there; money as USD floats.
    with session_factory() as session:
        charged, shadow = session.execute(
            select(func.sum(UsageEventRow.charge_nanos), func.sum(UsageEventRow.shadow_nanos))
        ).one()
        unpriced = session.scalar(
            select(func.count()).select_from(UsageEventRow).where(UsageEventRow.billing_status == "unpriced")
        )
    assert sum(samples["metering_billed_usd_total"].values()) == pytest.approx(int(charged) / 1e9, abs=1e-12)
    assert sum(samples["metering_shadow_usd_total"].values()) == pytest.approx(int(shadow) / 1e9, abs=1e-12)
    assert int(charged) > 0 and int(shadow) > 0
    assert sum(samples["metering_llm_web_searches_total"].values()) == 18  # 12 events, i % 4
    assert sum(v for k, v in samples["metering_llm_tokens_total"].items() if ("kind", "cache_write_1h") in k) == 60
    byollm_billed = [v for k, v in samples["metering_billed_usd_total"].items() if ("byollm", "true") in k]
    assert byollm_billed and all(v == 0 for v in byollm_billed)
    assert samples["metering_unpriced_events"][()] == int(unpriced) == 2
    assert samples["metering_ingest_events_total"] == {
        (("result", "inserted"),): len(records),
        (("result", "duplicate"),): 0,
        (("result", "rejected"),): 0,
    }


def test_no_label_value_is_a_tenant_or_user_id(db_url, tmp_path, session_factory):
    records = _records()
    with TestClient(create_app(app_settings(db_url, tmp_path))) as client:
        post_events(client, records, _token(session_factory, Scope.INGEST))
        text = client.get("/metrics").text
    names, values = set(), set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.update(sample.labels)
            values.update(sample.labels.values())
    assert names <= {*LABELS, "kind", "result"}
    assert values.isdisjoint({*TENANTS, *USERS})
    for secret_ish in (*TENANTS, *USERS, str(records[0]["invocation_id"]), str(records[0]["event_id"])):
        assert secret_ish not in text


def test_ingest_counts_inserted_duplicates_and_rejected_after_commit(db_url, tmp_path, session_factory):
    with TestClient(create_app(app_settings(db_url, tmp_path))) as client:
        secret = _token(session_factory, Scope.INGEST)
        batch = [record(i) for i in range(4)]
        post_events(client, batch, secret)
        bad = record(9, input_tokens=-1)
        assert post_events(client, [*batch[:3], bad, 42], secret).json()["duplicates"] == 3
        counts = _parse(client.get("/metrics").text)["metering_ingest_events_total"]
    assert counts == {(("result", "inserted"),): 4, (("result", "duplicate"),): 3, (("result", "rejected"),): 2}


def test_a_batch_whose_commit_fails_is_not_counted(db_url, tmp_path, session_factory, monkeypatch):
    principal = TokenPrincipal(token_id=uuid.uuid4(), name="t", scopes=frozenset({Scope.INGEST}))
    monkeypatch.setattr(deps, "_principal", lambda request, secret: principal)
    app = create_app(app_settings(db_url, tmp_path))
    with TestClient(app, raise_server_exceptions=False) as client:
        sessions = app.state.sessions
        app.state.sessions = sessionmaker(app.state.engine, class_=CommitFails, expire_on_commit=False)
        assert post_events(client, [record(0), record(1)], "mtr_whatever").status_code == 503
        app.state.sessions = sessions
        assert post_events(client, [record(2)], "mtr_whatever").status_code == 200
        counts = _parse(client.get("/metrics").text)["metering_ingest_events_total"]
    assert counts[(("result", "inserted"),)] == 1


def test_models_beyond_the_top_n_fold_into_other(db_url, tmp_path, session_factory):
    per_model = {"claude-sonnet-4-6": 5, "claude-haiku-4-5": 4, "claude-opus-4-1": 2, "claude-3-5-haiku": 1}
    records = [record(i, model=model) for model, n in per_model.items() for i in range(n)]
    settings = app_settings(db_url, tmp_path, metrics_top_models=2)
    with TestClient(create_app(settings)) as client:
        post_events(client, records, _token(session_factory, Scope.INGEST))
        calls = _parse(client.get("/metrics").text)["metering_llm_calls_total"]
    by_model = {dict(k)["model"]: v for k, v in calls.items()}
    assert by_model == {"claude-sonnet-4-6": 5, "claude-haiku-4-5": 4, OTHER: 3}


def test_metrics_can_require_a_read_token(db_url, tmp_path, session_factory):
    settings = app_settings(db_url, tmp_path, metrics_public=False)
    with TestClient(create_app(settings)) as client:
        assert_problem(client.get("/metrics"), 401, "unauthenticated")
        ingest_only = _token(session_factory, Scope.INGEST)
        assert_problem(client.get("/metrics", headers=bearer(ingest_only)), 403, "forbidden")
        ok = client.get("/metrics", headers=bearer(_token(session_factory, Scope.READ)))
        with session_factory() as session:  # every tenant's totals, less its own usage: another tenant's (a hunt)
            _row, bound = create_token(session, "tenant reader", [Scope.READ], tenant_id="tenant-1")
            session.commit()
        body = assert_problem(client.get("/metrics", headers=bearer(bound)), 403, "forbidden")
    assert "bound to no tenant" in body["detail"]
    assert ok.status_code == 200 and "metering_unpriced_events 0.0" in ok.text


def test_openmetrics_when_the_scraper_asks_for_it(db_url, tmp_path, session_factory):
    with TestClient(create_app(app_settings(db_url, tmp_path))) as client:
        post_events(client, [record(0), record(1)], _token(session_factory, Scope.INGEST))
        response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(response.text)}
    assert families["metering_llm_calls"].type == "counter"
    assert sum(s.value for s in families["metering_llm_calls"].samples if s.name.endswith("_total")) == 2


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=abc",
        "application/openmetrics-text; version=1.x.0",
        "application/openmetrics-text; version=1..0",
        "text/plain; version=abc",
        "text/plain; version=1.x, application/openmetrics-text; version=1.0.0",
    ],
)
def test_an_accept_header_with_a_malformed_version_gets_the_text_format(db_url, tmp_path, session_factory, accept):
    """prometheus_client's choose_encoder raised a TypeError on a version that is not dotted numbers: a 500."""
    with TestClient(create_app(app_settings(db_url, tmp_path)), raise_server_exceptions=False) as client:
        post_events(client, [record(0)], _token(session_factory, Scope.INGEST))
        response = client.get("/metrics", headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert _parse(response.text)["metering_llm_calls_total"] != {}


def test_metrics_are_per_app_and_not_in_the_openapi_document(db_url, tmp_path, session_factory):
    secret = _token(session_factory, Scope.INGEST)
    with TestClient(create_app(app_settings(db_url, tmp_path))) as first:
        post_events(first, [record(0)], secret)
        paths = first.get("/openapi.json").json()["paths"]
    with TestClient(create_app(app_settings(db_url, tmp_path))) as second:
        counts = _parse(second.get("/metrics").text)["metering_ingest_events_total"]
    assert counts[(("result", "inserted"),)] == 0  # the second app has its own registry
    assert "/metrics" not in paths


def test_counters_and_unpriced_gauge_come_from_one_snapshot(db_url, tmp_path, session_factory, monkeypatch):
    """An event held unpriced, committed between the scrape's two queries, is in both or in neither."""

    real_totals = metrics_module.folded_usage_totals
    interleaved: list[bool] = []

    def totals_then_a_commit(session: Session, **caps: int) -> Any:
        rows = real_totals(session, **caps)
        if not interleaved:
            interleaved.append(True)
            with session_factory() as writer:
                held = record(90, provider="openai_compatible", model="house-model-snapshot")
                assert ingest(writer, [event_from_record(held)]).inserted == 1
                writer.commit()
        return rows

    with TestClient(create_app(app_settings(db_url, tmp_path))) as client:
        post_events(client, [record(0), record(1)], _token(session_factory, Scope.INGEST))
        client.get("/metrics")  # admits the labels of these events: the next scrape reads once
        monkeypatch.setattr(metrics_module, "folded_usage_totals", totals_then_a_commit)
        first = _parse(client.get("/metrics").text)
        second = _parse(client.get("/metrics").text)
    assert interleaved == [True]
    models = {dict(k)["model"] for k in first["metering_llm_calls_total"]}
    assert "house-model-snapshot" not in models
    assert first["metering_unpriced_events"][()] == 0  # read before the commit, like the counters
    assert {dict(k)["model"] for k in second["metering_llm_calls_total"]} == models | {"house-model-snapshot"}
    assert second["metering_unpriced_events"][()] == 1


def test_label_sets_beyond_the_configured_cap_are_summed_into_other(db_url, tmp_path, session_factory):
    records = _records()
    settings = app_settings(db_url, tmp_path, metrics_max_label_sets=2)
    with TestClient(create_app(settings)) as client:
        post_events(client, records, _token(session_factory, Scope.INGEST))
        samples = _parse(client.get("/metrics").text)
    calls = samples["metering_llm_calls_total"]
    named = [dict(k) for k in calls if dict(k)["model"] != OTHER]
    assert len(named) == 2 and len(_rollup_sums(session_factory)) > 2
    others = {(dict(k)["byollm"], dict(k)["status"]) for k in calls if dict(k)["model"] == OTHER}
    assert others and all(dict(k)["extension"] == OTHER for k in calls if dict(k)["model"] == OTHER)
    assert sum(calls.values()) == len(records)
    charged = sum(v["billed_nanos"] for v in _rollup_sums(session_factory).values())
    assert sum(samples["metering_billed_usd_total"].values()) == pytest.approx(charged / 1e9, abs=1e-12)


def test_a_restart_scrapes_the_same_usage_counters_and_ingest_counters_from_zero(db_url, tmp_path, session_factory):
    """The usage counters are the database's sums, not the process's: a new process (another app on the same
    database) answers exactly what the last scrape before it did, so Prometheus sees neither a reset nor a jump;
    the ingest counters are the process's own and start again at 0 (a real reset, which rate() handles)."""
    records = _records()
    secret = _token(session_factory, Scope.INGEST)
    with TestClient(create_app(app_settings(db_url, tmp_path, metrics_top_models=3))) as before:
        post_events(before, records, secret)
        post_events(before, records[:4], secret)  # replayed: not counted twice
        last = _parse(before.get("/metrics").text)
    with TestClient(create_app(app_settings(db_url, tmp_path, metrics_top_models=3))) as after:
        first = _parse(after.get("/metrics").text)
    usage = [name for name in last if name.startswith("metering_llm_") or "_usd_" in name or "unpriced" in name]
    assert len(usage) == 6 and sum(last["metering_llm_calls_total"].values()) == len(records)
    assert {name: first[name] for name in usage} == {name: last[name] for name in usage}
    assert last["metering_ingest_events_total"][(("result", "duplicate"),)] == 4
    assert set(first["metering_ingest_events_total"].values()) == {0}


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        (
            "text/plain;version=1.0.0;escaping=allow-utf-8",
            "text/plain; version=1.0.0; charset=utf-8; escaping=allow-utf-8",
        ),
        ("text/plain;version=0.0.4", "text/plain; version=0.0.4; charset=utf-8"),
        ("*/*", "text/plain; version=0.0.4; charset=utf-8"),
    ],
)
def test_each_text_format_a_scraper_asks_for_has_the_same_samples(
    db_url, tmp_path, session_factory, accept, content_type
):
    """Prometheus 3 may ask for the text format 1.0.0 (docs/api.md): the samples are those of 0.0.4."""
    with TestClient(create_app(app_settings(db_url, tmp_path))) as client:
        post_events(client, _records(), _token(session_factory, Scope.INGEST))
        classic_response = client.get("/metrics")
        classic, classic_type = _parse(classic_response.text), classic_response.headers["content-type"]
        response = client.get("/metrics", headers={"Accept": accept})
        head = client.head("/metrics")
    assert response.headers["content-type"] == content_type
    samples = _parse(response.text)
    assert {k: v for k, v in samples.items() if not k.endswith("_created")} == {
        k: v for k, v in classic.items() if not k.endswith("_created")
    }
    assert (head.status_code, head.headers["content-type"], head.content) == (200, classic_type, b"")
