"""The API side of 1-hour cache writes and web searches: ingest, quote, held events and price overrides agree."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from metering.api.app import create_app
from metering.auth import Scope
from metering.config import BillingSettings, Settings
from metering.db.models import AuditLogRow, UsageEventRow
from tests.fakes.events import record
from tests.integration.api.conftest import assert_problem, bearer, post_events


@pytest.fixture
def api(db_url, tmp_path):
    settings = Settings(env="test", database_url=db_url, data_dir=tmp_path, billing=BillingSettings(markup_pct=20))
    with TestClient(create_app(settings)) as client:
        yield client


def test_an_ingested_call_costs_what_the_quote_for_its_counts_says(api, make_token, session_factory) -> None:
    at = datetime.now(UTC) - timedelta(minutes=1)
    counts = {"input_tokens": 90_000, "output_tokens": 2_000, "cache_read_tokens": 10_000,
              "cache_write_tokens": 30_000, "cache_write_1h_tokens": 25_000, "web_searches": 7}  # fmt: skip
    item = record(0, occurred_at=at.isoformat(), **counts)
    response = post_events(api, [item], make_token(Scope.INGEST))
    assert response.status_code == 200 and response.json()["inserted"] == 1, response.text
    params = {"provider": "anthropic", "model": "claude-sonnet-4-6", "at": at.isoformat(), **counts}
    quote = api.get("/v1/prices/quote", params=params, headers=bearer(make_token(Scope.READ)))
    assert quote.status_code == 200, quote.text
    body = quote.json()
    assert (body["cache_write_1h_tokens"], body["web_searches"]) == (25_000, 7)
    with session_factory() as session:
        stored = session.get(UsageEventRow, uuid.UUID(item["event_id"]))
    assert stored is not None
    assert (stored.cost_nanos, stored.charge_nanos) == (body["cost_nanos"], body["price_nanos"])
    # 50,000 uncached input at $3, 10,000 reads at $0.30, 5,000 5-minute writes at $3.75, 25,000 1-hour writes at $6,
    # 2,000 output at $15 (per Mtok) and 7 searches at $10 per 1,000
    assert body["cost_nanos"] == 150_000_000 + 3_000_000 + 18_750_000 + 150_000_000 + 30_000_000 + 70_000_000


def test_quote_refuses_inconsistent_counts_and_searches_without_a_price(api, make_token) -> None:
    reader = bearer(make_token(Scope.READ))
    base = {"provider": "anthropic", "model": "claude-sonnet-4-6", "input_tokens": 100, "cache_write_tokens": 10}
    too_many = api.get("/v1/prices/quote", params={**base, "cache_write_1h_tokens": 11}, headers=reader)
    assert (
        "cache_write_1h_tokens must be within cache_write_tokens"
        in assert_problem(too_many, 422, "invalid_input")["detail"]
    )
    assert_problem(api.get("/v1/prices/quote", params={**base, "web_searches": -1}, headers=reader), 422,
                   "validation_error")  # fmt: skip
    haiku = {"provider": "anthropic", "model": "claude-3-haiku-20240307", "input_tokens": 100}
    assert api.get("/v1/prices/quote", params=haiku, headers=reader).status_code == 200
    held = api.get("/v1/prices/quote", params={**haiku, "web_searches": 1}, headers=reader)
    assert assert_problem(held, 404, "unpriced_model")["detail"].startswith(
        "genai-prices has no price for web searches for provider 'anthropic', model 'claude-3-haiku-20240307'"
    )
    unknown = api.get("/v1/prices/quote", params={**haiku, "model": "nope", "web_searches": 1}, headers=reader)
    assert assert_problem(unknown, 404, "unpriced_model")["detail"].startswith("no price for provider 'anthropic'")


def test_overrides_take_and_show_the_new_prices_and_held_events_show_their_searches(
    api, make_token, session_factory
) -> None:
    admin, reader = bearer(make_token(Scope.ADMIN)), bearer(make_token(Scope.READ))
    at = datetime.now(UTC) - timedelta(minutes=1)
    item = record(0, occurred_at=at.isoformat(), model="claude-3-haiku-20240307", web_searches=2)
    assert post_events(api, [item], make_token(Scope.INGEST)).json()["inserted"] == 1
    [held] = api.get("/v1/events/unpriced", headers=reader).json()["items"]
    assert (held["event_id"], held["web_searches"], held["cache_write_1h_tokens"]) == (item["event_id"], 2, 0)
    body = {"id": "haiku", "provider": "anthropic", "model_pattern": "claude-3-haiku-*",
            "effective_from": "2026-01-01T00:00:00Z", "input_mtok": "0.25", "output_mtok": "1.25",
            "cache_write_1h_mtok": "0.5", "web_search_per_k": "10"}  # fmt: skip
    added = api.post("/v1/admin/price-overrides", json=body, headers=admin)
    assert added.status_code == 201, added.text
    shown = added.json()
    assert (shown["cache_write_1h_mtok"], shown["web_search_per_k"]) == ("0.500000000", "10.000000000")
    [listed] = api.get("/v1/admin/price-overrides", headers=admin).json()
    assert listed == shown
    finer = {**body, "id": "fine", "web_search_per_k": "0.0000000001"}
    detail = assert_problem(api.post("/v1/admin/price-overrides", json=finer, headers=admin), 422, "invalid_input")
    assert "$ per 1,000 searches" in detail["detail"]
    with session_factory() as session:
        audit = session.query(AuditLogRow).filter_by(action="price_override.add").one()
    assert (audit.after["cache_write_1h_mtok"], audit.after["web_search_per_k"]) == ("0.500000000", "10.000000000")
    no_search = {**body, "id": "sonnet", "model_pattern": "claude-sonnet-*", "web_search_per_k": None}
    assert api.post("/v1/admin/price-overrides", json=no_search, headers=admin).status_code == 201
    sonnet = {"provider": "anthropic", "model": "claude-sonnet-4-6", "web_searches": 1}
    detail = assert_problem(api.get("/v1/prices/quote", params=sonnet, headers=reader), 404, "unpriced_model")
    assert detail["detail"].startswith("price override 'sonnet' has no price for web searches")
    quote = api.get("/v1/prices/quote", params={"provider": "anthropic", "model": "claude-3-haiku-20240307",
                                                "web_searches": 2}, headers=reader)  # fmt: skip
    assert quote.status_code == 200 and quote.json()["cost_nanos"] == 20_000_000
