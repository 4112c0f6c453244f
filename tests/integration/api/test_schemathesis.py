"""Schemathesis over every operation of /openapi.json, in-process (ASGI), with a token of every scope.

Each operation gets its documented examples, the coverage phase's boundary and negative cases and up to
``MAX_EXAMPLES`` generated ones (valid and invalid), derandomized so a run is reproducible. Every answer must
be: no 5xx, a documented status code, a documented content type and headers, and a body matching the
documented schema (problem+json for errors). Runs on SQLite and PostgreSQL, on a little ingested data so the
read side has something to answer.

Nothing is excluded. The invoke endpoint runs the bundled extensions offline: without provider keys the
simulated provider answers, and its usage events go to this test's own spool directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.python import asgi
from sqlalchemy.orm import Session, sessionmaker

from metering.api.app import create_app
from metering.auth import Scope
from metering.config import Settings
from tests.fakes.events import record
from tests.integration.api.admin_helpers import offline_settings
from tests.integration.api.conftest import bearer
from tests.integration.api.read_data import ALPHA, seed

MAX_EXAMPLES = 25
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture
def app(db_url: str, tmp_path: Path, session_factory: sessionmaker[Session]) -> Iterator[FastAPI]:
    seed(session_factory, n=20)
    yield create_app(offline_settings(db_url, tmp_path))
    asgi.shutdown_lifespans()  # the lifespan schemathesis started (engine, runtime) ends before the tables are emptied


@pytest.fixture
def auth_headers(make_token: Callable[..., str]) -> dict[str, str]:
    return bearer(make_token(Scope.INGEST, Scope.READ, Scope.ADMIN, name="schemathesis"))


# The document /openapi.json serves; it depends on no database, so it is loaded once, at collection. (Not
# `schemathesis.pytest.from_fixture`: with pytest 9.2 it fails on the removed `Node._nodeid`.)
schema = schemathesis.openapi.from_dict(create_app(Settings(env="test")).openapi())


# The app and the token are built once per operation and backend, and shared by every generated case (function-
# scoped on purpose: the tables are emptied after each test). A case's request goes through the whole stack,
# database included, so it is slower than Hypothesis expects of an example.
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@schema.parametrize()
def test_every_operation_conforms_to_the_openapi_document(
    case: schemathesis.Case, app: FastAPI, auth_headers: dict[str, str]
) -> None:
    case.call_and_validate(app=app, headers=auth_headers, checks=CHECKS)


# Random inputs rarely name an existing invoice, extension or override, so the success answers of several
# operations would go unchecked: one known-good request per operation (on the seeded data, in an order that
# creates before it reads, ends or deletes) is validated with the same checks.
PERIOD = "2026-09"  # the seeded events' billing period
USER = {"tenant_id": ALPHA, "user_id": "user-0"}
INVOICE = {"path_parameters": {**USER, "period": PERIOD}}
SIMULATED = {"provider": "simulated", "model": "sim-1"}
OVERRIDE = {
    "id": "ovr_known",
    "provider": "anthropic",
    "model_pattern": "claude-*",
    "effective_from": "2020-01-01T00:00:00Z",
    "input_mtok": "3.00",
    "output_mtok": "15.00",
    "cache_write_1h_mtok": "6.00",
    "web_search_per_k": "10.00",
}
KEYED_OVERRIDE = {
    "headers": {"Idempotency-Key": "known-good"},
    "body": {k: v for k, v in OVERRIDE.items() if k != "id"},
}
CREDIT = {"headers": {"Idempotency-Key": "known-good"}, "body": {**USER, "amount": "10.00"}}
INVOKE = {
    "path_parameters": {"extension_id": "rewrite", "function": "rewrite"},
    "body": {"user_id": "alice", "tenant_id": "acme", "params": {"text": "Send me the doc.", "tone": "formal"}},
}
WINDOW = {"from": "2026-09-29T00:00:00Z", "to": "2026-10-01T00:00:00Z", "group_by": "model"}
QUOTE = {"provider": "anthropic", "model": "claude-sonnet-4-6", "input_tokens": 1000, "cache_write_tokens": 500,
         "cache_write_1h_tokens": 200, "web_searches": 2}  # fmt: skip
SEARCHED = record(
    1, tenant_id=ALPHA, input_tokens=1000, cache_write_tokens=500, cache_write_1h_tokens=200, web_searches=2
)
KNOWN_GOOD: list[tuple[str, dict[str, Any], int]] = [
    ("GET /healthz", {}, 200),
    ("GET /readyz", {}, 200),
    (
        "POST /v1/events",
        {"body": {"events": [orjson.loads(orjson.dumps(r)) for r in (record(1, tenant_id=ALPHA), SEARCHED)]}},
        200,
    ),
    ("GET /v1/usage", {"query": WINDOW}, 200),
    ("GET /v1/transfers", {"query": {"limit": 5}}, 200),
    ("GET /v1/balances", {}, 200),
    ("GET /v1/invoices", {"query": {"period": PERIOD}}, 200),
    ("GET /v1/invoices/{tenant_id}/{user_id}/{period}", INVOICE, 200),
    ("GET /v1/invoices/{tenant_id}/{user_id}/{period}.csv", INVOICE, 200),
    ("GET /v1/ledger/{period}.csv", {"path_parameters": {"period": PERIOD}}, 200),
    ("GET /v1/events/unpriced", {}, 200),
    ("GET /v1/prices/quote", {"query": QUOTE}, 200),
    ("PUT /v1/admin/purposes/{purpose}", {"path_parameters": {"purpose": "summary"}, "body": SIMULATED}, 200),
    ("GET /v1/admin/purposes", {}, 200),
    ("GET /v1/admin/purposes/{purpose}", {"path_parameters": {"purpose": "summary"}}, 200),
    ("PUT /v1/admin/users/{tenant_id}/{user_id}/byollm", {"path_parameters": USER, "body": SIMULATED}, 200),
    ("GET /v1/admin/users/{tenant_id}/{user_id}/byollm", {"path_parameters": USER}, 200),
    (
        "PUT /v1/admin/budgets/{extension_id}",
        {"path_parameters": {"extension_id": "rewrite"}, "body": {"max_calls": 5}},
        200,
    ),
    ("GET /v1/admin/budgets", {}, 200),
    ("GET /v1/admin/budgets/{extension_id}", {"path_parameters": {"extension_id": "rewrite"}}, 200),
    ("POST /v1/admin/price-overrides", {"body": OVERRIDE}, 201),
    ("POST /v1/admin/price-overrides", {"body": OVERRIDE}, 200),  # the same id and request: the replay
    ("POST /v1/admin/price-overrides", KEYED_OVERRIDE, 201),
    ("POST /v1/admin/price-overrides", KEYED_OVERRIDE, 200),  # the replay
    ("GET /v1/admin/price-overrides", {"query": {"provider": "anthropic"}}, 200),
    ("POST /v1/admin/price-overrides/{override_id}:end", {"path_parameters": {"override_id": "ovr_known"}}, 200),
    ("POST /v1/admin/price-overrides/{override_id}:withdraw", {"path_parameters": {"override_id": "ovr_known"}}, 200),
    ("POST /v1/admin/credits", CREDIT, 201),
    ("POST /v1/admin/credits", CREDIT, 200),  # the replay
    ("POST /v1/extensions/{extension_id}/functions/{function}:invoke", INVOKE, 200),
    ("GET /v1/audit", {}, 200),
    ("DELETE /v1/admin/users/{tenant_id}/{user_id}/byollm", {"path_parameters": USER}, 204),
    ("DELETE /v1/admin/purposes/{purpose}", {"path_parameters": {"purpose": "summary"}}, 204),
    ("DELETE /v1/admin/budgets/{extension_id}", {"path_parameters": {"extension_id": "rewrite"}}, 204),
]


def test_every_operation_has_a_known_good_request() -> None:
    operations = {result.ok().label for result in schema.get_all_operations()}
    assert operations == {label for label, _, _ in KNOWN_GOOD}


def test_known_good_answers_conform_to_the_openapi_document(app: FastAPI, auth_headers: dict[str, str]) -> None:
    for label, parts, status in KNOWN_GOOD:
        case = schema.find_operation_by_label(label).Case(**parts)
        response = case.call_and_validate(app=app, headers=auth_headers, checks=CHECKS)
        assert response.status_code == status, (label, response.text)
