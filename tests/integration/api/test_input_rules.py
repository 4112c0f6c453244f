"""Inputs found by fuzzing (test_schemathesis.py) that used to be 500s or undocumented 400s: each is now a 422
problem, on SQLite and PostgreSQL alike (PostgreSQL refused NUL in text and integers beyond their column)."""

from __future__ import annotations

import orjson
import pytest

from metering.auth import Scope
from tests.fakes.events import record
from tests.integration.api.conftest import assert_problem, bearer, post_events


@pytest.fixture
def headers(make_token):
    return bearer(make_token(Scope.INGEST, Scope.READ, Scope.ADMIN))


def test_a_nul_in_a_path_query_or_body_is_a_validation_error(client, headers):
    body = assert_problem(client.get("/v1/admin/purposes/a%00b", headers=headers), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["path", "purpose"]
    body = assert_problem(client.get("/v1/balances?tenant_id=t%00", headers=headers), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["query", "tenant_id"]
    purpose = {"provider": "simulated", "model": "m", "params": {"stop": ["\x00"]}}
    body = assert_problem(client.put("/v1/admin/purposes/p", json=purpose, headers=headers), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["body", "params"]


def test_a_body_value_nested_too_deep_is_a_validation_error_not_a_500(client, headers):
    def nested(depth: int) -> object:
        value: object = "x"
        for _ in range(depth):
            value = [value]
        return value

    deep = {"provider": "simulated", "model": "m", "params": {"a": nested(300)}}  # was a RecursionError: a 500
    body = assert_problem(client.put("/v1/admin/purposes/p", json=deep, headers=headers), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["body", "params"]
    assert "nested deeper than 64 levels" in body["errors"][0]["msg"]
    fine = {"provider": "simulated", "model": "m", "params": {"a": nested(62)}}  # the dict and 62 lists: 63 levels
    assert client.put("/v1/admin/purposes/p", json=fine, headers=headers).status_code == 200


def test_a_body_that_is_not_utf8_is_a_validation_error_not_a_400(client, headers):
    response = client.post(
        "/v1/events", content=b'{"events": ["\xff\xfe"]}', headers={**headers, "Content-Type": "application/json"}
    )
    assert assert_problem(response, 422, "validation_error")["errors"][0]["loc"] == ["body"]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/prices/quote", {"provider": "anthropic", "model": "m", "at": "9999-12-31T23:59:59-05:00"}),
        ("/v1/usage", {"from": "0001-01-01T00:00:00+05:00", "to": "2026-01-01T00:00:00Z"}),
        ("/v1/admin/price-overrides", {"active_at": "9999-12-31T23:59:59-05:00"}),
    ],
)
def test_a_time_out_of_range_in_utc_is_a_validation_error(client, headers, path, params):
    assert_problem(client.get(path, params=params, headers=headers), 422, "validation_error")


@pytest.mark.parametrize("when", ["2026", "20260101", "1767225600", "-5", "1767225600.5", 2026, 1767225600.5])
def test_a_time_written_as_a_number_is_a_validation_error_not_a_unix_timestamp(client, headers, when):
    """pydantic reads a number, or text of digits, as seconds (or milliseconds) since 1970: an override
    `"effective_from": "2026"` (the year) started at 1970-01-01T00:33:46Z, pricing every past event, and
    `/v1/prices/quote?at=2026` quoted 1970's prices. A time is ISO 8601 text."""
    body = {"provider": "ollama", "model_pattern": "m", "effective_from": when, "input_mtok": "1", "output_mtok": "1"}
    problem = assert_problem(
        client.post("/v1/admin/price-overrides", json=body, headers=headers), 422, "validation_error"
    )
    assert "ISO 8601" in problem["detail"]
    start = {**body, "effective_from": "2026-01-01T00:00:00Z", "id": "o1"}
    assert client.post("/v1/admin/price-overrides", json=start, headers=headers).status_code == 201
    ended = client.post("/v1/admin/price-overrides/o1:end", json={"at": when}, headers=headers)
    assert_problem(ended, 422, "validation_error")
    assert client.get("/v1/admin/price-overrides", headers=headers).json()[0]["effective_to"] is None
    for path, params in (
        ("/v1/prices/quote", {"provider": "anthropic", "model": "claude-sonnet-4-6", "at": str(when)}),
        ("/v1/usage", {"from": str(when), "to": "2026-01-01T00:00:00Z"}),
        ("/v1/admin/price-overrides", {"active_at": str(when)}),
    ):
        assert_problem(client.get(path, params=params, headers=headers), 422, "validation_error")
    assert client.get("/v1/admin/price-overrides", params={"active_at": "2026-02-01"}, headers=headers).json()


def test_integers_beyond_their_column_are_validation_errors(client, headers):
    for body in ({"max_calls": 2**31}, {"max_tokens": 2**63}):
        response = client.put("/v1/admin/budgets/rewrite", json=body, headers=headers)
        assert_problem(response, 422, "validation_error")


def test_an_invalid_input_problem_documents_no_errors_list(client, headers):
    body = assert_problem(client.get("/v1/audit", params={"cursor": "garbage"}, headers=headers), 422, "invalid_input")
    assert "errors" not in body


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("user_id", "a\x00b", "NUL"),
        ("call_index", 2**31, "call_index"),
        ("input_tokens", 2**62, "input_tokens"),
        ("latency_ms", 1e300, "latency_ms"),
        ("schema_version", 2**63, "schema_version"),  # was a 500 that lost the whole batch on SQLite
        ("schema_version", 2, "schema_version"),
        ("input_tokens", True, "input_tokens"),
        ("is_byollm", "false", "is_byollm"),
        ("occurred_at", 1764270000, "occurred_at"),
        ("occurred_at", "1764270000", "not a number"),  # was read as Unix seconds (ms past 2e10) and billed
        ("occurred_at", "2016-12-31T23:59:60Z", "leap second"),
    ],
)
def test_an_event_the_database_cannot_store_is_rejected_alone(client, headers, field, value, reason):
    bad = record(0) | {field: value}
    response = post_events(client, [bad, record(1)], headers["Authorization"].removeprefix("Bearer "))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["inserted"] == 1
    assert [r["index"] for r in body["rejected"]] == [0] and reason in body["rejected"][0]["reason"]


def test_an_event_with_a_non_finite_latency_is_rejected_alone(client, headers):
    raw = orjson.dumps({"events": [record(0)]}).replace(b'"latency_ms":12.5', b'"latency_ms":Infinity')
    response = client.post("/v1/events", content=raw, headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert "latency_ms" in response.json()["rejected"][0]["reason"]


@pytest.mark.parametrize("field", ["input_tokens", "latency_ms", "event_id", "x"])
def test_an_integer_of_more_digits_than_python_reads_is_rejected_alone(client, headers, field):
    """json.loads refuses an integer of more than 4,300 digits (ValueError): the whole batch was a 422 "not valid
    JSON", though it is valid JSON and only its event is wrong."""
    raw = orjson.dumps({"events": [record(0) | {field: "HUGE"}, record(1)]}).replace(b'"HUGE"', b"9" * 5000, 1)
    response = client.post("/v1/events", content=raw, headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["inserted"] == 1 and [r["index"] for r in body["rejected"]] == [0]
    assert field in body["rejected"][0]["reason"]


@pytest.mark.parametrize(
    ("path", "method", "raw", "msg"),
    [
        ("/v1/events", "POST", b'{"events": [' + b"[" * 5000 + b"]" * 5000 + b"]}", "nested deeper than 64 levels"),
        ("/v1/admin/purposes/p", "PUT", b'{"params": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "nested deeper"),
        ("/v1/admin/purposes/p", "PUT", b'{"params": {"a": ' + b"9" * 5000 + b"}}", "more than 4300 digits"),
        ("/v1/admin/price-overrides", "POST", b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper"),
        ("/v1/admin/price-overrides", "POST", b'{"input_mtok": ' + b"9" * 5000 + b"}", "more than 4300 digits"),
    ],
)
def test_a_body_json_cannot_read_says_why_it_cannot(client, headers, path, method, raw, msg):
    """Valid JSON that json.loads refuses (nested thousands of levels deep, an integer of thousands of digits) was
    answered "the body is not valid JSON (UTF-8)", which it is."""
    response = client.request(method, path, content=raw, headers={**headers, "Content-Type": "application/json"})
    errors = assert_problem(response, 422, "validation_error")["errors"]
    assert errors[0]["loc"] == ["body"] and msg in errors[0]["msg"], errors
