"""Admin API: purposes, BYOLLM (write-only key), budgets, price overrides, idempotent credits; tenant binding;
401/403; every change audited with before/after and no secret anywhere."""

from __future__ import annotations

import logging
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from httpx import Response
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError

from metering.auth import Scope
from metering.billing.checks import run_checks
from metering.billing.ingest import ingest
from metering.crypto import secret_box_from_settings
from metering.db.models import (
    AuditLogRow,
    ByollmSettingsRow,
    PriceOverrideRow,
    PurposeSettingsRow,
    TransferRow,
    UsageEventRow,
)
from metering.events import event_from_record
from tests.fakes.events import record
from tests.integration.api.admin_helpers import actions, audit_rows, offline_settings, table_dump
from tests.integration.api.conftest import assert_problem, bearer


@pytest.fixture
def settings(db_url, tmp_path):
    return offline_settings(db_url, tmp_path)


@pytest.fixture
def admin(make_token):
    return bearer(make_token(Scope.ADMIN, name="ops-admin"))


@pytest.fixture
def acme_admin(make_token):
    return bearer(make_token(Scope.ADMIN, tenant="acme", name="acme-admin"))


def fake_key() -> str:
    return f"sk-ant-api03-{secrets.token_urlsafe(24)}-wxyz"


KEY = fake_key()


# -- per-purpose settings ---------------------------------------------------------------------------


def test_purpose_put_get_list_delete_each_change_audited(client, admin, session_factory):
    body = {"provider": "simulated", "model": "fast-1", "params": {"top_p": 0.9}}
    first = client.put("/v1/admin/purposes/content_rewrite", json=body, headers=admin)
    assert first.status_code == 200, first.text
    assert first.json()["model"] == "fast-1" and first.json()["params"] == {"top_p": 0.9}
    changed = client.put("/v1/admin/purposes/content_rewrite", json={**body, "model": "fast-2"}, headers=admin)
    assert changed.json()["model"] == "fast-2"
    assert client.get("/v1/admin/purposes/content_rewrite", headers=admin).json()["model"] == "fast-2"
    assert [p["purpose"] for p in client.get("/v1/admin/purposes", headers=admin).json()] == ["content_rewrite"]

    deleted = client.delete("/v1/admin/purposes/content_rewrite", headers=admin)
    assert deleted.status_code == 204 and deleted.content == b""
    assert_problem(client.get("/v1/admin/purposes/content_rewrite", headers=admin), 404, "not_found")
    assert_problem(client.delete("/v1/admin/purposes/content_rewrite", headers=admin), 404, "not_found")

    set1, set2, removed = audit_rows(session_factory)
    assert (set1.action, set1.target, set1.before) == ("purpose.set", "purpose:content_rewrite", None)
    assert set1.after == {"provider": "simulated", "model": "fast-1", "base_url": None, "params": {"top_p": 0.9}}
    assert set2.before["model"] == "fast-1" and set2.after["model"] == "fast-2"
    assert (removed.action, removed.before["model"], removed.after) == ("purpose.delete", "fast-2", None)
    assert set1.actor_name == "ops-admin" and set1.actor_token_id is not None and set1.tenant_id is None


def test_purpose_params_with_secret_names_are_refused(client, admin, session_factory):
    body = {"provider": "simulated", "model": "m", "params": {"extra": {"apiKey": "sk-live-123456789"}}}
    problem = assert_problem(client.put("/v1/admin/purposes/p", json=body, headers=admin), 422, "invalid_input")
    assert "params.extra.apiKey" in problem["detail"] and "sk-live" not in problem["detail"]
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(PurposeSettingsRow)) == 0
    assert actions(session_factory) == []


@pytest.mark.parametrize(
    "params",
    [
        {"headers": {"X-Auth": "sk-ant-api03-LIVE0123456789abcdef"}},
        {"default_headers": {"X-Gateway": "Bearer gw-LIVE0123456789"}},
        {"extra": ["sk-proj-LIVE0123456789abcdefgh"]},
    ],
)
def test_purpose_params_holding_a_key_under_any_name_are_refused(client, admin, session_factory, params):
    """Only secret-named params were refused: a provider key under a name of the admin's own (a gateway's 'X-Auth'
    header) was stored, answered and audited in clear. A value that is a key ('sk-' and 20 or more key characters)
    or a bearer credential ('Bearer ...') is refused wherever it sits, and the problem does not echo it."""
    body = {"provider": "simulated", "model": "m", "params": params}
    problem = assert_problem(client.put("/v1/admin/purposes/p", json=body, headers=admin), 422, "invalid_input")
    assert "params." in problem["detail"] and "LIVE" not in problem["detail"]
    assert actions(session_factory) == []
    assert "LIVE" not in table_dump(session_factory, "purpose_settings")


@pytest.mark.parametrize(
    ("provider", "params", "needles"),
    [
        ("anthropic", {"max_tokens": 100}, ["params.max_tokens", "own max_tokens", "budget", "--mode enforce"]),
        ("openai", {"max_tokens": 100, "top_p": 0.9}, ["params.max_tokens", "budget"]),
        ("anthropic", {"stop": ["END"]}, ["params.stop: anthropic takes it as 'stop_sequences'"]),
        ("openai", {"stop_sequences": ["END"]}, ["params.stop_sequences: openai takes it as 'stop'"]),
        ("openai_compatible", {"top_k": 40}, ["params.top_k: not sent to openai_compatible"]),
        (
            "anthropic",
            {"seed": 7, "top_k": 40},
            ["params.seed: not sent to anthropic", "temperature, stop_sequences"],
        ),
    ],
)
def test_purpose_params_the_provider_would_drop_are_422(client, admin, session_factory, provider, params, needles):
    """A purpose's params its provider's adapter does not send were stored, shown, audited, then dropped at every call
    (logged at debug level): `max_tokens: 100` set to cap spend capped nothing, `stop` on an anthropic purpose (its
    name is stop_sequences) stopped nothing. Refused when set, naming the param and what to do instead."""
    base_url = "http://localhost:11434/v1" if provider == "openai_compatible" else None
    body = {"provider": provider, "model": "m", "base_url": base_url, "params": params}
    problem = assert_problem(client.put("/v1/admin/purposes/p", json=body, headers=admin), 422, "invalid_input")
    for needle in needles:
        assert needle in problem["detail"], problem["detail"]
    assert actions(session_factory) == []
    with session_factory() as session:
        assert session.scalars(select(PurposeSettingsRow)).all() == []


@pytest.mark.parametrize(
    ("provider", "params"),
    [
        ("anthropic", {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "stop_sequences": ["END"]}),
        (
            "openai",
            {
                "temperature": 0.2,
                "top_p": 0.9,
                "stop": ["END"],
                "seed": 7,
                "presence_penalty": 0.1,
                "frequency_penalty": 0.1,
            },
        ),
        ("openai", {"max_tokens": None, "top_k": None}),  # a null is never sent: nothing is dropped
        ("simulated", {"max_tokens": 100, "anything": 1}),  # answers without any: it stands in for the others
    ],
)
def test_purpose_params_the_provider_takes_are_kept(client, admin, provider, params):
    body = {"provider": provider, "model": "m", "params": params}
    response = client.put("/v1/admin/purposes/p", json=body, headers=admin)
    assert response.status_code == 200 and response.json()["params"] == params, response.text


def test_purpose_params_with_text_that_only_mentions_keys_are_kept(client, admin):
    params = {"system": "Never print an sk-... key or a Bearer token.", "stop": ["sk-"], "suffix": "ask-me-anything"}
    body = {"provider": "simulated", "model": "m", "params": params}
    response = client.put("/v1/admin/purposes/p", json=body, headers=admin)
    assert response.status_code == 200 and response.json()["params"] == params


@pytest.mark.parametrize("temperature", ["0.2", True, -0.5, [0.2], {"value": 0.2}])
def test_a_purpose_temperature_that_is_not_a_temperature_is_422(client, admin, session_factory, temperature):
    """A purpose's `temperature` param is now the temperature of its calls (it was dropped, silently): one stored as
    text ("0.2"), a bool or a negative number was sent with every call of the purpose, each refused by the provider
    as bad_request (no failover on the platform LLM). It is refused when set, naming it."""
    body = {"provider": "simulated", "model": "m", "params": {"temperature": temperature}}
    problem = assert_problem(client.put("/v1/admin/purposes/p", json=body, headers=admin), 422, "invalid_input")
    assert "params.temperature" in problem["detail"]
    assert actions(session_factory) == []
    ok = {"provider": "simulated", "model": "m", "params": {"temperature": 0}}
    assert client.put("/v1/admin/purposes/p", json=ok, headers=admin).json()["params"] == {"temperature": 0}


@pytest.mark.parametrize("name", ["api_keys", "apiKeys", "secrets", "passwords", "private_keys", "access_tokens"])
def test_purpose_params_with_plural_secret_names_are_refused(client, admin, session_factory, name):
    """A list of keys under a plural name was stored, shown and audited in clear (only singular names were secret)."""
    body = {"provider": "simulated", "model": "m", "params": {"extra": {name: ["sk-live-123456789"]}}}
    problem = assert_problem(client.put("/v1/admin/purposes/p", json=body, headers=admin), 422, "invalid_input")
    assert f"params.extra.{name}" in problem["detail"] and "sk-live" not in problem["detail"]
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(PurposeSettingsRow)) == 0
    assert actions(session_factory) == []


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_purpose_params_with_numbers_json_cannot_hold_are_422(client, admin, session_factory, number):
    """The body's parser reads them: a 500 on PostgreSQL (it refuses the row), stored as is on SQLite."""
    body = '{"provider": "simulated", "model": "m", "params": {"sampling": [0.5, {"top_p": NUMBER}]}}'
    body = body.replace("NUMBER", number)
    headers = {**admin, "Content-Type": "application/json"}
    problem = assert_problem(client.put("/v1/admin/purposes/p", content=body, headers=headers), 422, "invalid_input")
    assert "params.sampling[1].top_p" in problem["detail"]
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(PurposeSettingsRow)) == 0
    assert actions(session_factory) == []


@pytest.mark.parametrize(
    "url", ["https://gw.example.com/v1#api_key=SECRET-123", "https://gw.example.com/v1;token=SECRET-123"]
)
def test_a_base_url_with_a_key_in_its_fragment_or_path_parameters_is_422_and_unaudited(
    client, admin, session_factory, url
):
    """Only the query was searched for a secret-named parameter: a key after '#' (or ';') was stored, answered and
    audited in clear, as the query's would have been."""
    body = {"provider": "openai_compatible", "model": "m", "base_url": url}
    assert_problem(client.put("/v1/admin/purposes/p", json=body, headers=admin), 422, "validation_error")
    assert_problem(client.put("/v1/admin/users/acme/u/byollm", json=body, headers=admin), 422, "validation_error")
    assert actions(session_factory) == []
    assert "SECRET-123" not in table_dump(session_factory, "audit_log")


KEY = "sk-ant-api03-SECRETSECRETSECRETSECRET"


@pytest.mark.parametrize(
    "url",
    [
        f"https://gw.example.com/v1?subscription={KEY}",  # a key under a name of the gateway's own
        f"https://gw.example.com/v1?auth=Bearer%20{KEY}",
        f"https://gw.example.com/{KEY}/v1",  # a gateway taking its key in the path
        f"https://gw.example.com/v1#k={KEY}",
    ],
)
def test_a_base_url_holding_a_key_under_any_name_is_422_and_unaudited(client, admin, session_factory, url):
    """Purpose params refuse a text that is a key ('sk-...', 'Bearer ...') whatever its name, but a base_url was
    searched only for secret-named parameters: a key under another name, or as a path segment, was stored, answered
    and audited in clear."""
    body = {"provider": "openai_compatible", "model": "m", "base_url": url}
    for path in ("/v1/admin/purposes/p", "/v1/admin/users/acme/u/byollm"):
        response = client.put(path, json=body, headers=admin)
        assert_problem(response, 422, "validation_error")
        assert "SECRET" not in response.text
    assert actions(session_factory) == []
    assert "SECRET" not in table_dump(session_factory, "audit_log")


def test_a_base_url_naming_a_model_or_a_path_like_a_key_is_kept(client, admin):
    url = "https://gw.example.com/v1/deployments/sk-learn?api-version=2024-10-21&task=risk-assessment"
    body = {"provider": "openai_compatible", "model": "m", "base_url": url}
    response = client.put("/v1/admin/purposes/p", json=body, headers=admin)
    assert response.status_code == 200 and response.json()["base_url"] == url


def test_a_base_url_with_a_key_in_its_query_is_422_and_unaudited(client, admin, session_factory):
    url = "https://gw.example.com/v1?token=SECRET-123"
    body = {"provider": "openai_compatible", "model": "m", "base_url": url}
    assert_problem(client.put("/v1/admin/purposes/p", json=body, headers=admin), 422, "validation_error")
    assert_problem(client.put("/v1/admin/users/acme/u/byollm", json=body, headers=admin), 422, "validation_error")
    assert actions(session_factory) == []
    assert "SECRET-123" not in table_dump(session_factory, "audit_log")


def test_purpose_params_nest_at_most_64_levels_as_in_the_cli(client, admin):
    def body(levels: int) -> dict:
        params: object = []
        for _ in range(levels - 2):
            params = [params]
        return {"provider": "simulated", "model": "m", "params": {"a": params}}

    assert_problem(client.put("/v1/admin/purposes/p", json=body(65), headers=admin), 422, "validation_error")
    assert client.put("/v1/admin/purposes/p", json=body(64), headers=admin).status_code == 200


def test_invalid_purpose_is_422_and_leaves_no_audit_row(client, admin, session_factory):
    bad = client.put("/v1/admin/purposes/p", json={"provider": "nope", "model": "m"}, headers=admin)
    assert "unknown provider" in assert_problem(bad, 422, "invalid_input")["detail"]
    creds = {"provider": "openai_compatible", "model": "m", "base_url": "http://user:pw@localhost:1/v1"}
    assert_problem(client.put("/v1/admin/purposes/p", json=creds, headers=admin), 422, "validation_error")
    assert actions(session_factory) == []


def test_a_provider_in_any_case_is_accepted_and_stored_lowercase(client, admin, session_factory):
    """`"OpenAI"` was `422 unknown provider` here while the platform's provider setting takes any case (and lowercases
    it) and provider names are case-insensitive everywhere else (events, quotes, overrides, usage filters)."""
    purpose = client.put("/v1/admin/purposes/p", json={"provider": "OpenAI", "model": "gpt-4o"}, headers=admin)
    assert purpose.status_code == 200, purpose.text
    assert purpose.json()["provider"] == "openai"
    again = client.put("/v1/admin/purposes/p", json={"provider": "openai", "model": "gpt-4o"}, headers=admin)
    assert again.json() == purpose.json()  # the same settings: no second audit entry
    url = "/v1/admin/users/acme/alice/byollm"
    byollm = client.put(url, json={"provider": "Anthropic", "model": "claude-haiku-4-5", "api_key": KEY}, headers=admin)
    assert byollm.status_code == 200, byollm.text
    assert byollm.json()["provider"] == "anthropic"
    kept = client.put(url, json={"provider": "ANTHROPIC", "model": "claude-sonnet-4-6"}, headers=admin)
    assert kept.status_code == 200, kept.text  # the same provider: its stored key is kept
    assert kept.json()["has_api_key"] is True and kept.json()["provider"] == "anthropic"
    with session_factory() as session:
        assert session.get(PurposeSettingsRow, "p").provider == "openai"
        assert session.get(ByollmSettingsRow, "alice").provider == "anthropic"
    assert actions(session_factory) == ["purpose.set", "byollm.set", "byollm.set"]


def test_a_change_whose_commit_fails_leaves_neither_change_nor_audit_row(client, admin, session_factory):
    def note_audit(session, _context, _instances):
        if any(isinstance(obj, AuditLogRow) for obj in session.new):
            session.info["audited"] = True

    def fail_commit(session):  # fails the commit of the transaction that holds an audit entry
        if session.info.pop("audited", False):
            raise OperationalError("COMMIT", {}, Exception("disk full"))

    sessions = client.app.state.sessions
    event.listen(sessions, "before_flush", note_audit)
    event.listen(sessions, "before_commit", fail_commit)
    try:
        response = client.put("/v1/admin/purposes/p", json={"provider": "simulated", "model": "m"}, headers=admin)
    finally:
        event.remove(sessions, "before_flush", note_audit)
        event.remove(sessions, "before_commit", fail_commit)
    assert_problem(response, 503, "database_unavailable")
    with session_factory() as session:
        assert session.get(PurposeSettingsRow, "p") is None
    assert actions(session_factory) == []


# -- BYOLLM ---------------------------------------------------------------------------------------------


def test_byollm_api_key_is_write_only_and_never_leaks(client, admin, settings, session_factory, caplog):
    caplog.set_level(logging.DEBUG)
    key = fake_key()
    url = "/v1/admin/users/acme/alice/byollm"
    responses = []

    put = client.put(url, json={"provider": "anthropic", "model": "claude-haiku-4-5", "api_key": key}, headers=admin)
    responses.append(put)
    assert put.status_code == 200, put.text
    view = put.json()
    assert view["has_api_key"] is True and view["api_key_mask"] == "sk-…wxyz" and "api_key" not in view
    assert (view["tenant_id"], view["user_id"], view["provider"]) == ("acme", "alice", "anthropic")

    responses.append(get := client.get(url, headers=admin))
    assert get.json() == view

    # Omitting the key keeps it (same provider); the model changes.
    responses.append(
        kept := client.put(url, json={"provider": "anthropic", "model": "claude-sonnet-4-6"}, headers=admin)
    )
    assert kept.json()["has_api_key"] is True and kept.json()["api_key_mask"] == "sk-…wxyz"
    # Another provider without a key: it needs one.
    responses.append(other := client.put(url, json={"provider": "openai", "model": "gpt-4o"}, headers=admin))
    assert_problem(other, 422, "invalid_input")
    # A validation error never echoes the key.
    responses.append(bad := client.put(url, json={"provider": "anthropic", "model": "", "api_key": key}, headers=admin))
    assert_problem(bad, 422, "validation_error")
    responses.append(audit_page := client.get("/v1/audit", headers=admin))
    responses.append(client.get("/openapi.json"))

    with session_factory() as session:
        row = session.get(ByollmSettingsRow, "alice")
        assert row is not None and row.api_key_ciphertext is not None
        assert key.encode() not in row.api_key_ciphertext
        assert secret_box_from_settings(settings).decrypt(row.api_key_ciphertext) == key
    for table in ("byollm_settings", "audit_log"):
        dump = table_dump(session_factory, table)
        assert key not in dump and key[13:-5] not in dump, table
    for response in responses:
        assert key not in response.text and key[13:-5] not in response.text
    assert key not in caplog.text

    set1, set2 = audit_rows(session_factory)
    assert set1.action == "byollm.set" and set1.target == "user:acme/alice" and set1.tenant_id == "acme"
    assert set1.before is None and set1.after["api_key"] == "***" and set1.after["model"] == "claude-haiku-4-5"
    assert set2.before["model"] == "claude-haiku-4-5" and set2.after["model"] == "claude-sonnet-4-6"
    assert [e["action"] for e in audit_page.json()["items"]] == ["byollm.set", "byollm.set"]

    responses.append(
        cleared := client.put(url, json={"provider": "simulated", "model": "m", "api_key": None}, headers=admin)
    )
    assert cleared.json()["has_api_key"] is False and cleared.json()["api_key_mask"] is None
    assert client.delete(url, headers=admin).status_code == 204
    assert_problem(client.get(url, headers=admin), 404, "not_found")
    removed = audit_rows(session_factory, "byollm.delete")[0]
    assert removed.before["provider"] == "simulated" and removed.before["api_key"] is None and removed.after is None


def test_a_new_base_url_needs_the_key_again(client, admin, session_factory):
    """The stored key is write-only: keeping it across a base_url change let any admin have it sent to a host of
    their choice (found by a hunt)."""
    url = "/v1/admin/users/acme/alice/byollm"
    first = {"provider": "openai_compatible", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key": fake_key()}
    assert client.put(url, json=first, headers=admin).status_code == 200
    moved = {"provider": "openai_compatible", "model": "m", "base_url": "http://attacker.example/v1"}
    body = assert_problem(client.put(url, json=moved, headers=admin), 422, "invalid_input")
    assert "send api_key again" in body["detail"]
    with session_factory() as session:
        assert session.get(ByollmSettingsRow, "alice").base_url == "http://127.0.0.1:9/v1"
    same_url = {"provider": "openai_compatible", "model": "m2", "base_url": "http://127.0.0.1:9/v1"}
    assert client.put(url, json=same_url, headers=admin).json()["has_api_key"] is True  # the model alone: kept
    assert client.put(url, json=moved | {"api_key": None}, headers=admin).json()["has_api_key"] is False


def test_a_too_long_api_key_is_422_without_its_length(client, admin, session_factory):
    """The schema's own message named the key's length ("at most 1000 items after validation, not 1037"): a key is
    write-only, its length included. The store's check answers instead, naming only the limit."""
    key = fake_key() + "x" * 1000
    body = {"provider": "anthropic", "model": "claude-haiku-4-5", "api_key": key}
    response = client.put("/v1/admin/users/acme/alice/byollm", json=body, headers=admin)
    problem = assert_problem(response, 422, "invalid_input")
    assert "at most 1000 characters" in problem["detail"]
    assert str(len(key)) not in response.text and key[13:-5] not in response.text
    assert actions(session_factory) == []


def test_byollm_delete_audits_the_key_as_redacted(client, admin, session_factory):
    key = fake_key()
    url = "/v1/admin/users/acme/bob/byollm"
    client.put(url, json={"provider": "anthropic", "model": "claude-haiku-4-5", "api_key": key}, headers=admin)
    assert client.delete(url, headers=admin).status_code == 204
    (removed,) = audit_rows(session_factory, "byollm.delete")
    assert removed.before["api_key"] == "***"
    assert key not in table_dump(session_factory, "audit_log")


def test_a_user_id_of_another_tenant_is_a_conflict_not_a_takeover(client, admin, session_factory):
    client.put("/v1/admin/users/acme/u1/byollm", json={"provider": "simulated", "model": "m"}, headers=admin)
    moved = client.put("/v1/admin/users/globex/u1/byollm", json={"provider": "simulated", "model": "x"}, headers=admin)
    assert_problem(moved, 409, "conflict")
    assert_problem(client.get("/v1/admin/users/globex/u1/byollm", headers=admin), 404, "not_found")
    assert_problem(client.delete("/v1/admin/users/globex/u1/byollm", headers=admin), 404, "not_found")
    with session_factory() as session:
        row = session.get(ByollmSettingsRow, "u1")
        assert row is not None and (row.tenant_id, row.model) == ("acme", "m")


# -- budgets --------------------------------------------------------------------------------------------


def test_budgets_put_get_list_delete_audited(client, admin, session_factory):
    put = client.put("/v1/admin/budgets/rewrite", json={"max_calls": 5, "mode": "enforce"}, headers=admin)
    assert put.status_code == 200, put.text
    assert put.json() | {"updated_at": None} == {
        "extension_id": "rewrite",
        "max_calls": 5,
        "max_tokens": None,
        "mode": "enforce",
        "updated_at": None,
    }
    client.put("/v1/admin/budgets/rewrite", json={"max_tokens": 10_000}, headers=admin)
    assert client.get("/v1/admin/budgets/rewrite", headers=admin).json()["max_tokens"] == 10_000
    assert [b["extension_id"] for b in client.get("/v1/admin/budgets", headers=admin).json()] == ["rewrite"]
    assert_problem(client.put("/v1/admin/budgets/rewrite", json={}, headers=admin), 422, "invalid_input")
    assert_problem(client.put("/v1/admin/budgets/x", json={"max_calls": 0}, headers=admin), 422, "validation_error")
    assert client.delete("/v1/admin/budgets/rewrite", headers=admin).status_code == 204
    assert_problem(client.get("/v1/admin/budgets/rewrite", headers=admin), 404, "not_found")

    first, second, removed = audit_rows(session_factory)
    assert (first.action, first.before, first.after) == (
        "budget.set",
        None,
        {"max_calls": 5, "max_tokens": None, "mode": "enforce"},
    )
    assert second.before == first.after and second.after == {"max_calls": None, "max_tokens": 10_000, "mode": "report"}
    assert (removed.action, removed.before, removed.after) == ("budget.delete", second.after, None)


def test_a_put_that_changes_nothing_writes_no_audit_entry_and_answers_the_same(client, admin, session_factory):
    """Re-sending the stored settings wrote an entry whose before equalled its after (and moved updated_at), while
    ending an override or revoking a token twice wrote none: a write that changes nothing now writes no entry, and
    answers the same body."""
    writes = [
        ("/v1/admin/purposes/content_rewrite", {"provider": "simulated", "model": "fast-1", "params": {"top_p": 0.9}}),
        ("/v1/admin/users/acme/alice/byollm", {"provider": "anthropic", "model": "claude-haiku-4-5", "api_key": KEY}),
        ("/v1/admin/users/acme/carol/byollm", {"provider": "simulated", "model": "m"}),  # no key: none kept
        ("/v1/admin/budgets/rewrite", {"max_calls": 5, "mode": "enforce"}),
    ]
    for url, body in writes:
        first = client.put(url, json=body, headers=admin)
        again = client.put(url, json=body, headers=admin)
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert again.json() == first.json()
    assert actions(session_factory) == ["purpose.set", "byollm.set", "byollm.set", "budget.set"]

    url, body = writes[0]  # JSON compared as JSON: {"n": true} is not {"n": 1}, though equal to Python
    assert client.put(url, json={**body, "params": {"n": 1}}, headers=admin).json()["params"] == {"n": 1}
    assert client.put(url, json={**body, "params": {"n": True}}, headers=admin).json()["params"] == {"n": True}
    assert [e.after["params"] for e in audit_rows(session_factory, "purpose.set")][1:] == [{"n": 1}, {"n": True}]


def test_a_new_byollm_key_with_everything_else_equal_is_audited(client, admin, session_factory, settings):
    """The snapshot shows the key as *** before and after: a replaced key is told by the stored key itself."""
    url = "/v1/admin/users/acme/alice/byollm"
    body = {"provider": "anthropic", "model": "claude-haiku-4-5", "api_key": KEY}
    assert client.put(url, json=body, headers=admin).status_code == 200
    other = fake_key()
    assert client.put(url, json={**body, "api_key": other}, headers=admin).status_code == 200
    assert client.put(url, json={**body, "api_key": other}, headers=admin).status_code == 200  # the same again
    created, replaced = audit_rows(session_factory, "byollm.set")
    assert replaced.before == replaced.after == created.after and replaced.after["api_key"] == "***"
    with session_factory() as session:
        row = session.get(ByollmSettingsRow, "alice")
        assert row is not None and secret_box_from_settings(settings).decrypt(row.api_key_ciphertext) == other
    for secret in (KEY, other):
        assert secret not in table_dump(session_factory, "audit_log")


@pytest.mark.parametrize(
    "limits", [{"max_calls": True}, {"max_tokens": True}, {"max_calls": "3"}, {"max_tokens": 1000.0}]
)
def test_a_budget_limit_is_a_json_integer_not_a_bool_or_text(client, admin, session_factory, limits):
    """`{"max_calls": true, "mode": "enforce"}` set an enforced budget of 1 call (`true` read as 1), and
    `{"max_tokens": true}` one of 1 token, which refuses every call: a limit is an integer, as amounts refuse `true`."""
    response = client.put("/v1/admin/budgets/rewrite", json={**limits, "mode": "enforce"}, headers=admin)
    assert_problem(response, 422, "validation_error")
    assert_problem(client.get("/v1/admin/budgets/rewrite", headers=admin), 404, "not_found")
    assert actions(session_factory) == []


# -- price overrides ------------------------------------------------------------------------------------


def test_price_overrides_add_list_end_audited(client, admin, session_factory):
    body = {
        "id": "ovr_sonnet",
        "provider": "anthropic",
        "model_pattern": "claude-sonnet-*",
        "effective_from": "2026-01-01T00:00:00Z",
        "input_mtok": "2.5",
        "output_mtok": "12.000000001",
        "note": "negotiated",
    }
    added = client.post("/v1/admin/price-overrides", json=body, headers=admin)
    assert added.status_code == 201, added.text
    assert added.json()["input_mtok"] == "2.500000000" and added.json()["output_mtok"] == "12.000000001"
    assert added.json()["effective_to"] is None
    retried = client.post("/v1/admin/price-overrides", json=body, headers=admin)  # the same id and request: a replay
    assert retried.status_code == 200 and retried.headers["Idempotent-Replayed"] == "true"
    repriced = {**body, "input_mtok": "3"}
    assert_problem(client.post("/v1/admin/price-overrides", json=repriced, headers=admin), 409, "conflict")
    odd = {**body, "id": "ovr_odd", "input_mtok": "1_000"}  # text prices are plain decimals too
    assert_problem(client.post("/v1/admin/price-overrides", json=odd, headers=admin), 422, "validation_error")
    finer = {**body, "id": "ovr_fine", "input_mtok": "0.0000000001"}
    assert (
        "finer"
        in assert_problem(client.post("/v1/admin/price-overrides", json=finer, headers=admin), 422, "invalid_input")[
            "detail"
        ]
    )

    listed = client.get("/v1/admin/price-overrides", params={"provider": "anthropic"}, headers=admin).json()
    assert [o["id"] for o in listed] == ["ovr_sonnet"]
    assert (
        client.get("/v1/admin/price-overrides", params={"active_at": "2025-06-01T00:00:00Z"}, headers=admin).json()
        == []
    )

    ended = client.post("/v1/admin/price-overrides/ovr_sonnet:end", json={"at": "2026-06-01T00:00:00Z"}, headers=admin)
    assert ended.status_code == 200, ended.text
    assert ended.json()["effective_to"] == "2026-06-01T00:00:00Z"
    later = client.post("/v1/admin/price-overrides/ovr_sonnet:end", json={"at": "2026-07-01T00:00:00Z"}, headers=admin)
    assert_problem(later, 422, "invalid_input")
    assert_problem(client.post("/v1/admin/price-overrides/nope:end", headers=admin), 404, "not_found")
    open_ended = {**body, "id": "ovr_open", "effective_from": "2020-01-01T00:00:00Z"}
    assert client.post("/v1/admin/price-overrides", json=open_ended, headers=admin).status_code == 201
    now = client.post("/v1/admin/price-overrides/ovr_open:end", headers=admin)  # no body: ends now
    assert now.status_code == 200, now.text
    assert now.json()["effective_to"] is not None

    add, end, add_open, end_open = audit_rows(session_factory)
    assert [add_open.action, end_open.action] == ["price_override.add", "price_override.end"]
    assert (add.action, add.target, add.before) == ("price_override.add", "price_override:ovr_sonnet", None)
    assert add.after["output_mtok"] == "12.000000001" and add.after["note"] == "negotiated"
    assert end.action == "price_override.end" and end.before["effective_to"] is None
    assert end.after["effective_to"] == "2026-06-01T00:00:00Z"


def test_of_two_overrides_alike_but_for_their_price_the_one_added_last_prices(client, admin, make_token):
    """Two overrides of one model pattern from the same moment (a corrected price posted again, as POST without an
    id does on a retry or a fix): the tie was broken by the larger id, a random one when generated, so the first
    price went on billing half the time, whichever was added last. The one added last wins now."""
    body = {"provider": "anthropic", "model_pattern": "claude-sonnet-4-6", "effective_from": "2020-01-01T00:00:00Z",
            "output_mtok": "15.00"}  # fmt: skip
    for ident, price in (("ovr_z_first", "3.00"), ("ovr_a_then", "4.00"), ("ovr_m_last", "5.00")):
        added = client.post("/v1/admin/price-overrides", json=body | {"id": ident, "input_mtok": price}, headers=admin)
        assert added.status_code == 201, added.text
    params = {"provider": "anthropic", "model": "claude-sonnet-4-6", "input_tokens": 1_000_000}
    quote = client.get("/v1/prices/quote", params=params, headers=bearer(make_token(Scope.READ))).json()
    assert (quote["source_version"], quote["cost_usd"]) == ("ovr_m_last", "5.000000000")


def test_an_override_provider_is_stored_lowercase_and_one_stored_as_sent_still_prices(client, admin, session_factory):
    """An override's provider was stored as sent ("Ollama") where per-purpose and BYOLLM settings store it lowercase;
    it is lowercased now (the response, the row, the audit entry). An override stored before, "Ollama", still prices
    "ollama" events (matching ignores case) and is listed as stored."""
    body = {"id": "ovr_new", "provider": "Ollama", "model_pattern": "llama3*", "effective_from": "2020-01-01T00:00:00Z",
            "input_mtok": "0.10", "output_mtok": "0.40"}  # fmt: skip
    added = client.post("/v1/admin/price-overrides", json=body, headers=admin)
    assert added.status_code == 201, added.text
    assert added.json()["provider"] == "ollama"
    old = {**body, "id": "ovr_old", "provider": "ollama", "model_pattern": "mistral*"}
    assert client.post("/v1/admin/price-overrides", json=old, headers=admin).status_code == 201
    with session_factory() as session:
        assert session.get(PriceOverrideRow, "ovr_new").provider == "ollama"
        session.get(PriceOverrideRow, "ovr_old").provider = "Ollama"  # as stored before
        session.commit()
    (entry, _old_entry) = audit_rows(session_factory)
    assert entry.after["provider"] == "ollama"

    listed = client.get("/v1/admin/price-overrides", params={"provider": "OLLAMA"}, headers=admin).json()
    assert sorted((o["id"], o["provider"]) for o in listed) == [("ovr_new", "ollama"), ("ovr_old", "Ollama")]
    now = datetime.now(UTC)
    events = [
        event_from_record(record(i, provider="ollama", model=model, occurred_at=now - timedelta(hours=1)))
        for i, model in enumerate(["llama3.1", "mistral-7b"])
    ]
    with session_factory() as session:
        ingest(session, events, markup_pct=Decimal(0), now=now)
        session.commit()
        priced = session.execute(select(UsageEventRow.model, UsageEventRow.price_source, UsageEventRow.price_version))
        assert sorted(tuple(r) for r in priced) == [
            ("llama3.1", "override", "ovr_new"),
            ("mistral-7b", "override", "ovr_old"),
        ]


def test_an_override_moment_that_is_a_number_is_refused(client, admin, session_factory):
    """``effective_from: 1767225600`` has no offset, which the body requires, yet was stored as 2026-01-01T00:00Z (and
    a number past 2e10 as milliseconds): refused like ``occurred_at`` is, nothing stored or audited."""
    body = {"id": "o1", "provider": "openai", "model_pattern": "gpt-4o*", "input_mtok": "2", "output_mtok": "8"}
    for moment in (1767225600, "1767225600", 1767225600000.0, "1.7672256e9"):  # exponent form too
        refused = client.post("/v1/admin/price-overrides", json={**body, "effective_from": moment}, headers=admin)
        assert "not a number" in assert_problem(refused, 422, "validation_error")["detail"]
    assert client.get("/v1/admin/price-overrides", headers=admin).json() == []
    assert audit_rows(session_factory) == []


def test_an_override_id_the_end_route_cannot_address_is_refused(client, admin, session_factory):
    """POST /v1/admin/price-overrides/{id}:end takes one path segment: an id with '/' (e.g. 'openai/gpt-4o-q1') was
    stored (201), could never be ended through the API (404 'nothing at …', encoded or not) and so kept pricing
    every call it matched for good. Refused now, with nothing stored or audited."""
    body = {"id": "openai/gpt-4o-q1", "provider": "openai", "model_pattern": "gpt-4o*",
            "effective_from": "2026-01-01T00:00:00Z", "input_mtok": "2", "output_mtok": "8"}  # fmt: skip
    refused = assert_problem(client.post("/v1/admin/price-overrides", json=body, headers=admin), 422, "invalid_input")
    assert "'/'" in refused["detail"]
    assert client.get("/v1/admin/price-overrides", headers=admin).json() == []
    assert audit_rows(session_factory) == []
    added = client.post("/v1/admin/price-overrides", json={**body, "id": "openai.gpt-4o:q1"}, headers=admin)
    assert added.status_code == 201, added.text
    ended = client.post("/v1/admin/price-overrides/openai.gpt-4o:q1:end", json={}, headers=admin)
    assert ended.status_code == 200, ended.text


def test_ending_an_override_when_it_already_ends_then_is_not_audited_again(client, admin, session_factory):
    """A retried end (same `at`), or two identical ends at once, changed nothing the second time, yet each wrote a
    `price_override.end` entry (before equal to after): the log showed two changes of the window, one nobody made.
    Now: 200 with the override as it is, and no entry (as revoking a revoked token, or finalizing a closed month)."""
    body = {"id": "ovr_q1", "provider": "openai", "model_pattern": "gpt-4o*",
            "effective_from": "2026-01-01T00:00:00Z", "input_mtok": "2", "output_mtok": "8"}  # fmt: skip
    assert client.post("/v1/admin/price-overrides", json=body, headers=admin).status_code == 201
    at = {"at": "2026-04-01T00:00:00Z"}
    first = client.post("/v1/admin/price-overrides/ovr_q1:end", json=at, headers=admin)
    again = client.post("/v1/admin/price-overrides/ovr_q1:end", json=at, headers=admin)
    assert first.status_code == again.status_code == 200, again.text
    assert again.json() == first.json() and again.json()["effective_to"] == "2026-04-01T00:00:00Z"
    (entry,) = audit_rows(session_factory, "price_override.end")
    assert entry.before["effective_to"] is None and entry.after["effective_to"] == "2026-04-01T00:00:00Z"
    later = client.post("/v1/admin/price-overrides/ovr_q1:end", json={"at": "2026-05-01T00:00:00Z"}, headers=admin)
    assert "already ends" in assert_problem(later, 422, "invalid_input")["detail"]  # never lengthened
    assert len(audit_rows(session_factory, "price_override.end")) == 1


# -- credits --------------------------------------------------------------------------------------------


def _credit(client, headers, key, **body):
    payload = {"tenant_id": "acme", "user_id": "alice", "amount": "25.00"} | body
    extra = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/admin/credits", json=payload, headers={**headers, **extra})


def test_credits_are_idempotent_on_the_header(client, admin, session_factory):
    key = str(uuid.uuid4())
    first = _credit(client, admin, key, memo="welcome")
    assert first.status_code == 201, first.text
    assert first.headers["Idempotent-Replayed"] == "false"
    body = first.json()
    assert body["amount"] == "25.000000000" and body["amount_nanos"] == 25 * 10**9 and body["replayed"] is False

    replay = _credit(client, admin, key, memo="a reworded retry")
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["transfer_id"] == body["transfer_id"] and replay.json()["memo"] == "welcome"
    assert replay.json()["replayed"] is True

    conflict = _credit(client, admin, key, amount="30.00")
    assert_problem(conflict, 409, "idempotency_conflict")
    assert_problem(_credit(client, admin, key, user_id="bob"), 409, "idempotency_conflict")
    missing = _credit(client, admin, None)
    assert "Idempotency-Key" in assert_problem(missing, 400, "idempotency_key_required")["detail"]
    assert_problem(_credit(client, admin, "   "), 400, "idempotency_key_required")
    assert_problem(_credit(client, admin, "k" * 201), 422, "invalid_input")

    assert_problem(_credit(client, admin, "neg", amount="-1"), 422, "invalid_input")

    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(TransferRow)) == 1
    (entry,) = audit_rows(session_factory)
    assert (entry.action, entry.target, entry.tenant_id) == ("credit.add", "user:acme/alice", "acme")
    assert entry.after["transfer_id"] == body["transfer_id"] and entry.after["idempotency_key"] == key
    assert entry.before is None


def test_a_credit_key_that_is_not_printable_ascii_is_refused(client, admin, session_factory):
    """A header's bytes are read as Latin-1: the UTF-8 key 'clé-1' was stored as 'clÃ©-1' (and echoed so), while
    `metering billing credit add --key clé-1` stored 'clé-1': the same key through the other edge posted a second
    credit. Keys are printable ASCII (as the keys of `…:invoke`), refused alike by both edges; nothing is posted."""
    for raw in ("clé-1".encode(), b"\xa0k1", b"k\x801"):
        response = client.post(
            "/v1/admin/credits",
            json={"tenant_id": "acme", "user_id": "alice", "amount": "25.00"},
            headers=[*admin.items(), ("Idempotency-Key", raw)],
        )
        assert "printable ASCII" in assert_problem(response, 422, "invalid_input")["detail"]
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(TransferRow)) == 0
    assert audit_rows(session_factory) == []
    assert _credit(client, admin, "k 1 ~!").status_code == 201  # spaces and punctuation inside are fine


def test_the_cli_prints_a_credit_as_the_api_returns_it(client, admin, run):
    """`metering billing credit add` printed its JSON's ``amount`` as ``"-$1,234,567,890.000000001"`` where the API
    returns ``"-1234567890.000000001"``: a script reading it as a decimal failed on the CLI's."""
    import json

    body = _credit(client, admin, "adj-1", amount="-1234567890.000000001", kind="adjustment").json()
    args = ["-t", "acme", "-u", "alice", "--amount", "-1234567890.000000001", "--key", "adj-1", "--adjustment"]
    replay = run("billing", "credit", "add", *args)
    assert replay.exit_code == 0, replay.output
    printed = json.loads(replay.output)
    fields = ("transfer_id", "kind", "tenant_id", "user_id", "amount", "amount_nanos", "idempotency_key", "memo")
    assert {f: printed[f] for f in fields} == {f: body[f] for f in fields}
    assert printed["amount"] == "-1234567890.000000001" and printed["replayed"] is True
    # The time too, written as the API writes it ("…Z"): the CLI printed "…+00:00".
    assert printed["created_at"] == body["created_at"]


def test_the_cli_prints_byollm_settings_as_the_api_returns_them(client, admin, run):
    """`metering byollm set` and `show` print the fields of the API's answer, in its formats: their times were
    ``2026-11-28T17:40:56.243392+00:00`` where the API writes ``2026-11-28T17:40:56.243392Z``."""
    import json

    put = client.put(
        "/v1/admin/users/acme/alice/byollm", json={"provider": "simulated", "model": "sim-1"}, headers=admin
    )
    assert put.status_code == 200, put.text
    shown = run("byollm", "show", "--user", "alice")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == put.json()
    set_again = run("byollm", "set", "-u", "alice", "-t", "acme", "--provider", "simulated", "--model", "sim-2")
    assert set_again.exit_code == 0, set_again.output
    got = client.get("/v1/admin/users/acme/alice/byollm", headers=admin).json()
    assert json.loads(set_again.output) == got


def test_the_cli_prints_purpose_and_budget_settings_as_the_api_returns_them(client, admin, run):
    """`metering purpose set/list` and `budget set/list` printed ``updated_at`` as ``…+00:00`` where the API writes
    ``…Z``: the CLI's JSON is the API's answer, the same text."""
    import json

    purpose = run("purpose", "set", "content_rewrite", "--provider", "openai", "--model", "gpt-4o-mini")
    assert purpose.exit_code == 0, purpose.output
    got = client.get("/v1/admin/purposes/content_rewrite", headers=admin).json()
    assert json.loads(purpose.output) == got and got["updated_at"].endswith("Z")
    assert json.loads(run("purpose", "list").output) == [got]

    budget = run("budget", "set", "chatty", "--max-calls", "3")
    assert budget.exit_code == 0, budget.output
    got = client.get("/v1/admin/budgets/chatty", headers=admin).json()
    assert json.loads(budget.output) == got and got["updated_at"].endswith("Z")
    assert json.loads(run("budget", "list").output) == [got]


def test_a_credit_key_belongs_to_its_tenant(client, acme_admin, make_token, session_factory):
    """Another tenant's admin can use a key acme used (its own credit): no 409, nothing about acme's credit."""
    globex_admin = bearer(make_token(Scope.ADMIN, tenant="globex", name="globex-admin"))
    assert _credit(client, acme_admin, "topup-2026-11").status_code == 201
    theirs = _credit(client, globex_admin, "topup-2026-11", tenant_id="globex", amount="3.00")
    assert theirs.status_code == 201 and theirs.json()["replayed"] is False, theirs.text
    replay = _credit(client, globex_admin, "topup-2026-11", tenant_id="globex", amount="3.00")
    assert replay.status_code == 200 and replay.json()["transfer_id"] == theirs.json()["transfer_id"]
    conflict = assert_problem(
        _credit(client, globex_admin, "topup-2026-11", tenant_id="globex"), 409, "idempotency_conflict"
    )
    assert "$3.00" in conflict["detail"] and "$25" not in conflict["detail"] and "alice" in conflict["detail"]
    with session_factory() as session:
        assert run_checks(session).problems == []
        assert session.scalar(select(func.count()).select_from(TransferRow)) == 2


def test_a_credit_past_what_a_balance_can_hold_is_a_clear_422(client, admin, session_factory):
    half = str(Decimal(2**62).scaleb(-9))  # the largest single amount: two of them overflow a BIGINT balance
    assert _credit(client, admin, "big-1", amount=half).status_code == 201
    refused = assert_problem(_credit(client, admin, "big-2", amount=half), 422, "balance_limit")
    assert "platform:topups, user:acme:alice" in refused["detail"] and "nothing was posted" in refused["detail"]
    again = _credit(client, admin, "big-2", amount=half)  # the refused key was not kept: refused again, not replayed
    assert_problem(again, 422, "balance_limit")
    with session_factory() as session:
        assert set(session.scalars(select(TransferRow.idempotency_key).where(TransferRow.kind == "credit"))) == {
            "big-1"
        }
        assert run_checks(session).problems == []


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"amount": "-1"}, "amount must be positive for a credit (an adjustment debits a user with a negative amount)"),
        ({"amount": "0", "kind": "adjustment"}, "amount must not be zero"),
        ({"amount": "0"}, "amount must not be zero"),
    ],
)
def test_a_refused_credit_amount_is_named_in_the_problem(client, admin, session_factory, body, detail):
    """The 422 said "a credit must be positive; an adjustment must not be zero" whatever was wrong, naming neither
    the field nor which of the two rules the request broke."""
    assert assert_problem(_credit(client, admin, "signed", **body), 422, "invalid_input")["detail"] == detail
    assert audit_rows(session_factory) == []


@pytest.mark.parametrize("amount", ["1_000", "\uff12\uff15", "\u0665", " 5 ", "1e3", "Infinity"])
def test_a_credit_amount_must_be_a_plain_decimal(client, admin, session_factory, amount):
    body = assert_problem(_credit(client, admin, f"odd-{amount.encode()!r}", amount=amount), 422, "validation_error")
    assert "plain decimal" in str(body["errors"])
    assert len(amount.strip()) < 3 or amount.strip() not in str(body)  # the input is not echoed
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(TransferRow)) == 0


def test_money_sent_as_a_json_number_is_read_exactly(client, admin, session_factory):
    """JSON numbers were read as binary floats before the exact checks: 123456789.123456789 was credited as
    123456789.123456790 (a nano more than sent), 2.00000000000000000001 as $2 (it is finer than a nano: refused as
    text), and an override's 12345678.123456789 $/Mtok stored as 12345678.123456790."""
    headers = {**admin, "Content-Type": "application/json"}

    def credit(key: str, amount: str) -> Response:
        body = '{"tenant_id": "acme", "user_id": "alice", "amount": ' + amount + "}"
        return client.post("/v1/admin/credits", content=body, headers=headers | {"Idempotency-Key": key})

    exact = credit("n-1", "123456789.123456789")
    assert exact.status_code == 201, exact.text
    assert (exact.json()["amount"], exact.json()["amount_nanos"]) == ("123456789.123456789", 123456789123456789)
    assert credit("n-1", "123456789.123456789").status_code == 200  # the replay is the same request
    assert_problem(credit("n-1", "123456789.12345679"), 409, "idempotency_conflict")
    finer = assert_problem(credit("n-2", "2.00000000000000000001"), 422, "invalid_input")
    assert "finer than one nano-dollar" in finer["detail"]
    assert credit("n-3", "0.1").json()["amount_nanos"] == 100_000_000

    override = (
        '{"provider": "ollama", "model_pattern": "m", "effective_from": "2026-01-01T00:00:00Z", '
        '"input_mtok": 12345678.123456789, "output_mtok": 0.3, "markup_pct": 12.5}'
    )
    added = client.post("/v1/admin/price-overrides", content=override, headers=headers)
    assert added.status_code == 201, added.text
    assert (added.json()["input_mtok"], added.json()["output_mtok"]) == ("12345678.123456789", "0.300000000")
    assert added.json()["markup_pct"] == "12.5"
    with session_factory() as session:
        assert session.scalars(select(TransferRow.amount_nanos).where(TransferRow.kind == "credit")).all() == [
            123456789123456789,
            100_000_000,
        ]


def test_negative_adjustment_debits_the_user(client, admin, session_factory):
    response = _credit(client, admin, "adj-1", amount="-3.5", kind="adjustment", memo="refund reversal")
    assert response.status_code == 201, response.text
    assert response.json()["amount"] == "-3.500000000" and response.json()["kind"] == "adjustment"
    assert actions(session_factory) == ["adjustment.add"]


# -- tenant binding, authentication ---------------------------------------------------------------------


def test_tenant_bound_admin_touches_only_its_tenant(client, admin, acme_admin, session_factory):
    client.put("/v1/admin/users/globex/gus/byollm", json={"provider": "simulated", "model": "m"}, headers=admin)
    own = client.put(
        "/v1/admin/users/acme/alice/byollm", json={"provider": "simulated", "model": "m"}, headers=acme_admin
    )
    assert own.status_code == 200, own.text
    assert client.get("/v1/admin/users/acme/alice/byollm", headers=acme_admin).status_code == 200

    other = "/v1/admin/users/globex/gus/byollm"
    assert_problem(client.get(other, headers=acme_admin), 404, "not_found")
    assert_problem(
        client.put(other, json={"provider": "simulated", "model": "x"}, headers=acme_admin), 404, "not_found"
    )
    assert_problem(client.delete(other, headers=acme_admin), 404, "not_found")
    fresh = "/v1/admin/users/globex/new/byollm"
    assert_problem(
        client.put(fresh, json={"provider": "simulated", "model": "x"}, headers=acme_admin), 404, "not_found"
    )
    assert_problem(_credit(client, acme_admin, "k-globex", tenant_id="globex"), 404, "not_found")
    assert _credit(client, acme_admin, "k-acme").status_code == 201

    for method, path, body in (
        ("GET", "/v1/admin/purposes", None),
        ("PUT", "/v1/admin/purposes/p", {"provider": "simulated", "model": "m"}),
        ("DELETE", "/v1/admin/purposes/p", None),
        ("GET", "/v1/admin/budgets/rewrite", None),
        ("PUT", "/v1/admin/budgets/rewrite", {"max_calls": 1}),
        ("GET", "/v1/admin/price-overrides", None),
        ("POST", "/v1/admin/price-overrides/x:end", None),
        ("POST", "/v1/admin/price-overrides/x:withdraw", None),
    ):
        response = client.request(method, path, json=body, headers=acme_admin)
        assert "not bound to a tenant" in assert_problem(response, 403, "forbidden")["detail"], path

    with session_factory() as session:
        gus = session.get(ByollmSettingsRow, "gus")
        assert gus is not None and gus.model == "m" and session.get(ByollmSettingsRow, "new") is None
    # The bound token reads only its tenant's audit entries; the unbound one reads them all.
    bound = [(e["action"], e["tenant_id"]) for e in client.get("/v1/audit", headers=acme_admin).json()["items"]]
    assert bound == [("credit.add", "acme"), ("byollm.set", "acme")]
    assert len(client.get("/v1/audit", headers=admin).json()["items"]) == 3


ADMIN_ROUTES = [
    ("GET", "/v1/admin/purposes"),
    ("GET", "/v1/admin/purposes/p"),
    ("PUT", "/v1/admin/purposes/p"),
    ("DELETE", "/v1/admin/purposes/p"),
    ("GET", "/v1/admin/users/t/u/byollm"),
    ("PUT", "/v1/admin/users/t/u/byollm"),
    ("DELETE", "/v1/admin/users/t/u/byollm"),
    ("GET", "/v1/admin/budgets"),
    ("GET", "/v1/admin/budgets/e"),
    ("PUT", "/v1/admin/budgets/e"),
    ("DELETE", "/v1/admin/budgets/e"),
    ("GET", "/v1/admin/price-overrides"),
    ("POST", "/v1/admin/price-overrides"),
    ("POST", "/v1/admin/price-overrides/x:end"),
    ("POST", "/v1/admin/price-overrides/x:withdraw"),
    ("POST", "/v1/admin/credits"),
    ("GET", "/v1/audit"),
    ("POST", "/v1/extensions/rewrite/functions/rewrite:invoke"),
]


def test_every_admin_route_is_401_without_a_token_and_403_without_the_scope(client, make_token, session_factory):
    reader = bearer(make_token(Scope.READ, Scope.INGEST))
    for method, path in ADMIN_ROUTES:
        response = client.request(method, path, json={})
        assert_problem(response, 401, "unauthenticated")
        assert response.headers["www-authenticate"] == "Bearer"
        forbidden = client.request(method, path, json={}, headers=reader)
        assert "'admin'" in assert_problem(forbidden, 403, "forbidden")["detail"], (method, path)
    wrong = make_token(Scope.ADMIN)[:-1] + "#"
    assert_problem(client.get("/v1/admin/purposes", headers=bearer(wrong)), 401, "unauthenticated")
    assert actions(session_factory) == []


def test_admin_writes_do_not_build_the_runtime(client, admin, tmp_path):
    client.put("/v1/admin/budgets/rewrite", json={"max_calls": 1}, headers=admin)
    assert not client.app.state.runtime.built
    assert not (tmp_path / "spool").exists()


def test_openapi_documents_the_admin_audit_and_invoke_operations(client):
    doc = client.get("/openapi.json").json()
    operations = {
        ("get", "/v1/admin/purposes"): "list_purposes",
        ("put", "/v1/admin/purposes/{purpose}"): "put_purpose",
        ("delete", "/v1/admin/users/{tenant_id}/{user_id}/byollm"): "delete_byollm",
        ("put", "/v1/admin/budgets/{extension_id}"): "put_budget",
        ("post", "/v1/admin/price-overrides"): "post_price_override",
        ("post", "/v1/admin/price-overrides/{override_id}:end"): "end_price_override",
        ("post", "/v1/admin/price-overrides/{override_id}:withdraw"): "withdraw_price_override",
        ("post", "/v1/admin/credits"): "post_credit",
        ("get", "/v1/audit"): "get_audit",
        ("post", "/v1/extensions/{extension_id}/functions/{function}:invoke"): "invoke_function",
    }
    for (method, path), operation_id in operations.items():
        operation = doc["paths"][path][method]
        assert operation["operationId"] == operation_id and operation["security"] == [{"ApiToken": []}]
        for status in ("401", "403", "422"):
            assert list(operation["responses"][status]["content"]) == ["application/problem+json"], (path, status)
    credits = doc["paths"]["/v1/admin/credits"]["post"]
    (header,) = [p for p in credits["parameters"] if p["in"] == "header"]
    assert header["name"] == "Idempotency-Key" and header["required"] is True
    assert {"200", "201", "400", "409"} <= set(credits["responses"])
    added = doc["paths"]["/v1/admin/price-overrides"]["post"]
    (header,) = [p for p in added["parameters"] if p["in"] == "header"]
    assert header["name"] == "Idempotency-Key" and header["required"] is False
    assert {"200", "201", "409"} <= set(added["responses"])
    api_key = doc["components"]["schemas"]["ByollmIn"]["properties"]["api_key"]["anyOf"][0]
    assert api_key["writeOnly"] is True and api_key["format"] == "password"
    assert "api_key" not in doc["components"]["schemas"]["ByollmOut"]["properties"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_a_byollm_delete_that_waited_for_a_concurrent_one_is_404_and_unaudited(client, admin, session_factory):
    import threading
    import time

    from metering.llm import settings_store as store

    body = {"provider": "simulated", "model": "m"}
    assert client.put("/v1/admin/users/acme/alice/byollm", json=body, headers=admin).status_code == 200
    answers: list = []
    with session_factory() as first:
        store.delete_byollm(first, "alice")  # holds the row (PostgreSQL) or the write lock (SQLite)
        request = threading.Thread(
            target=lambda: answers.append(client.delete("/v1/admin/users/acme/alice/byollm", headers=admin))
        )
        request.start()
        time.sleep(1.5)  # the request reads the settings, then waits for the lock
        first.commit()
    request.join(timeout=60)
    assert_problem(answers[0], 404, "not_found")
    assert actions(session_factory) == ["byollm.set"]


def test_keeping_a_key_the_current_keys_cannot_decrypt_is_a_422_not_a_500(client, admin, session_factory):
    """The key that encrypted the stored api key was rotated away (GET shows it as stored, without a mask): a PUT
    omitting api_key to keep it answered 500 secret_error; it is the caller's to send the key again (or null)."""
    from cryptography.fernet import Fernet

    url = "/v1/admin/users/acme/alice/byollm"
    first = {"provider": "openai", "model": "gpt-4o", "api_key": fake_key()}
    assert client.put(url, json=first, headers=admin).status_code == 200
    with session_factory() as session:
        session.get(ByollmSettingsRow, "alice").api_key_ciphertext = Fernet(Fernet.generate_key()).encrypt(b"sk-gone")
        session.commit()
    assert client.get(url, headers=admin).json()["has_api_key"] is True
    kept = client.put(url, json={"provider": "openai", "model": "gpt-4.1"}, headers=admin)
    body = assert_problem(kept, 422, "invalid_input")
    assert "send api_key again" in body["detail"]
    with session_factory() as session:
        assert session.get(ByollmSettingsRow, "alice").model == "gpt-4o"
    again = client.put(url, json={"provider": "openai", "model": "gpt-4.1", "api_key": fake_key()}, headers=admin)
    assert again.status_code == 200 and again.json()["api_key_mask"] == "sk-…wxyz"
