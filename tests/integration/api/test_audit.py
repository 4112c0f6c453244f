"""The audit log: redaction (pure), same-transaction writes, keyset pagination, GET /v1/audit."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from metering import audit
from metering.auth import Scope, TokenPrincipal
from metering.cli import app as cli_app
from metering.db.models import AuditLogRow
from metering.errors import InvalidInputError
from tests.integration.api.admin_helpers import actions, audit_rows, offline_settings, table_dump
from tests.integration.api.conftest import assert_problem, bearer

ACTOR = TokenPrincipal(token_id=uuid.uuid4(), name="ops", scopes=frozenset({Scope.ADMIN}))
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def settings(db_url, tmp_path):
    return offline_settings(db_url, tmp_path)


# -- redaction (pure) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["api_key", "apiKey", "API_KEY", "X-Api-Key", "openai_api_key", "secret", "client_secret", "token",
     "access_token", "refreshToken", "password", "db_password", "Authorization", "api_key_ciphertext", "credentials",
     # plurals: a list of keys is as secret as one (they were stored and audited in clear)
     "api_keys", "apiKeys", "secrets", "client_secrets", "passwords", "private_keys", "access_tokens", "authTokens",
     "credential", "cookies",
     # the plural of every token kind whose singular is one (api_token is a secret name, api_tokens was not)
     "api_tokens", "apiTokens", "bearer_tokens", "session_tokens", "oauth_tokens", "id_tokens", "ciphertexts"],
)  # fmt: skip
def test_secret_names(name):
    assert audit.is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    ["max_tokens", "input_tokens", "max_completion_tokens", "model", "idempotency_key", "provider", "keep_meaning",
     "tokens", "monkey", "secretary", "budget_tokens", "prompt_tokens", "total_tokens", "reasoning_tokens"],
)  # fmt: skip
def test_names_that_are_not_secrets(name):
    assert not audit.is_secret_name(name)


def test_redact_is_recursive_and_keeps_flags_and_nulls():
    value = {
        "provider": "anthropic",
        "api_key": "sk-ant-123",
        "max_tokens": 1500,
        "params": {"nested": [{"password": "hunter2", "top_p": 0.9}], "token": None, "has_token": True},
        "price": Decimal("3.50"),
        "at": T0,
        "raw": b"\x00ciphertext",
        "wrapped": SecretStr("sk-secret"),
    }
    assert audit.redact(value) == {
        "provider": "anthropic",
        "api_key": "***",
        "max_tokens": 1500,
        "params": {"nested": [{"password": "***", "top_p": 0.9}], "token": None, "has_token": True},
        "price": "3.50",
        "at": "2026-11-01T12:00:00+00:00",
        "raw": "***",
        "wrapped": "***",
    }
    assert audit.secret_keys(value, "body") == ["body.api_key", "body.params.nested[0].password"]
    assert audit.redact(None) is None and audit.redact(["a", 1]) == ["a", 1]


def test_cursor_round_trip_and_garbage():
    cursor = audit.Cursor(T0, uuid.uuid4())
    assert audit.Cursor.decode(cursor.encode()) == cursor
    forged = [  # a number or a list for the id, times that leave the years 1 to 9999 in UTC: were 500s
        {"at": "2026-01-01T00:00:00+00:00", "id": 5},
        {"at": "2026-01-01T00:00:00+00:00", "id": [1]},
        {"at": "0001-01-01T00:00:00+05:00", "id": str(uuid.uuid4())},
        {"at": "9999-12-31T23:59:59-05:00", "id": str(uuid.uuid4())},
    ]
    encoded = [base64.urlsafe_b64encode(json.dumps(f).encode()).decode().rstrip("=") for f in forged]
    for garbage in ("", "nope", "e30", "!!!", audit.Cursor(T0, uuid.uuid4()).encode()[:-3], *encoded):
        with pytest.raises(InvalidInputError, match="cursor"):
            audit.Cursor.decode(garbage)


# -- repository ------------------------------------------------------------------------------------


def test_record_redacts_before_storing_and_rolls_back_with_its_transaction(session_factory):
    with session_factory() as session:
        audit.record(
            session, actor=ACTOR, action="byollm.set", target="user:t/u", before=None, after={"api_key": "sk-XYZ-1"}
        )
        session.rollback()
    assert audit_rows(session_factory) == []

    with session_factory() as session:
        audit.record(
            session,
            actor=ACTOR,
            action="byollm.set",
            target="user:t/u",
            before={"api_key": None},
            after={"api_key": "sk-XYZ-1", "model": "m"},
            tenant_id="t",
            request_id="req-1",
        )
        session.commit()
    (row,) = audit_rows(session_factory)
    assert (row.before, row.after) == ({"api_key": None}, {"api_key": "***", "model": "m"})
    assert (row.actor_token_id, row.actor_name, row.tenant_id, row.request_id) == (ACTOR.token_id, "ops", "t", "req-1")
    assert "sk-XYZ-1" not in table_dump(session_factory, "audit_log")


def _seed(session_factory, count: int, *, same_instant: bool = False) -> list[AuditLogRow]:
    with session_factory() as session:
        for i in range(count):
            at = T0 if same_instant else T0 + timedelta(seconds=i)
            action = "purpose.set" if i % 2 == 0 else "budget.set"
            audit.record(
                session,
                actor=ACTOR,
                action=action,
                target=f"x:{i}",
                before=None,
                after={"i": i},
                tenant_id="acme" if i % 3 == 0 else None,
                at=at,
            )
        session.commit()
    return audit_rows(session_factory)


@pytest.mark.parametrize("same_instant", [False, True])
def test_keyset_pages_cover_every_entry_once_newest_first(session_factory, same_instant):
    rows = _seed(session_factory, 7, same_instant=same_instant)
    expected = sorted(rows, key=lambda r: (r.at, r.id), reverse=True)
    seen: list[uuid.UUID] = []
    cursor = None
    sizes = []
    with session_factory() as session:
        while True:
            page = audit.list_entries(session, limit=3, cursor=cursor)
            sizes.append(len(page.entries))
            seen.extend(row.id for row in page.entries)
            if page.next_cursor is None:
                break
            cursor = audit.Cursor.decode(page.next_cursor)
        assert sizes == [3, 3, 1] and seen == [row.id for row in expected]
        only = audit.list_entries(session, limit=10, action="budget.set")
        # Ties on `at` are broken by id (time-ordered UUIDv7), so the order is the same either way.
        assert [r.after["i"] for r in only.entries] == [5, 3, 1]
        assert {r.action for r in only.entries} == {"budget.set"}
        acme = audit.list_entries(session, limit=10, tenant_id="acme")
        assert {r.after["i"] for r in acme.entries} == {0, 3, 6} and acme.next_cursor is None
        with pytest.raises(InvalidInputError, match="limit"):
            audit.list_entries(session, limit=0)


# -- GET /v1/audit ------------------------------------------------------------------------------------


def test_get_audit_pages_filters_and_records_the_request_id(client, make_token, session_factory):
    admin = bearer(make_token(Scope.ADMIN, name="ops"))
    for i in range(5):
        headers = {**admin, "X-Request-ID": f"req-{i}"}
        client.put(f"/v1/admin/budgets/ext{i}", json={"max_calls": i + 1}, headers=headers)
    client.delete("/v1/admin/budgets/ext0", headers=admin)

    first = client.get("/v1/audit", params={"limit": 4}, headers=admin)
    assert first.status_code == 200, first.text
    page1 = first.json()
    assert [e["action"] for e in page1["items"]] == ["budget.delete", "budget.set", "budget.set", "budget.set"]
    newest_set = page1["items"][1]
    assert newest_set["target"] == "budget:ext4" and newest_set["request_id"] == "req-4"
    assert newest_set["actor"]["name"] == "ops" and newest_set["after"]["max_calls"] == 5
    assert page1["items"][0]["request_id"] is None and page1["items"][0]["after"] is None
    page2 = client.get("/v1/audit", params={"limit": 4, "cursor": page1["next_cursor"]}, headers=admin).json()
    assert [e["target"] for e in page2["items"]] == ["budget:ext1", "budget:ext0"] and page2["next_cursor"] is None

    deletes = client.get("/v1/audit", params={"action": "budget.delete"}, headers=admin).json()["items"]
    assert [e["target"] for e in deletes] == ["budget:ext0"]
    assert client.get("/v1/audit", params={"action": "nothing"}, headers=admin).json() == {
        "items": [],
        "next_cursor": None,
    }


def test_get_audit_errors(client, make_token, session_factory):
    admin = bearer(make_token(Scope.ADMIN))
    assert_problem(client.get("/v1/audit", params={"cursor": "garbage"}, headers=admin), 422, "invalid_input")
    assert_problem(client.get("/v1/audit", params={"limit": 0}, headers=admin), 422, "validation_error")
    assert_problem(client.get("/v1/audit", params={"limit": 501}, headers=admin), 422, "validation_error")
    assert_problem(client.get("/v1/audit"), 401, "unauthenticated")
    assert_problem(client.get("/v1/audit", headers=bearer(make_token(Scope.READ))), 403, "forbidden")
    assert actions(session_factory) == []


def test_get_audit_returns_the_cli_s_entries_which_read_as_the_api_s(
    client, make_token, session_factory, db_url, tmp_path, monkeypatch
):
    for name in ("METERING_ENV", "METERING_SECRET_KEYS"):
        monkeypatch.delenv(name, raising=False)
    env = {"METERING_DATA_DIR": str(tmp_path / "cli"), "METERING_DATABASE_URL": db_url}
    for args in (
        ["budget", "set", "chatty", "--max-calls", "3"],
        ["byollm", "set", "-u", "alice", "-t", "acme", "--provider", "simulated", "--model", "m1"],
    ):
        done = CliRunner().invoke(cli_app, args, env=env)
        assert done.exit_code == 0, done.output
    admin = bearer(make_token(Scope.ADMIN, name="ops"))
    # another limit: the same one would change nothing, and write no entry
    assert client.put("/v1/admin/budgets/chatty", json={"max_calls": 5}, headers=admin).status_code == 200

    page = client.get("/v1/audit", headers=admin)
    assert page.status_code == 200, page.text  # a null token id validates against the response model
    api_budget, cli_byollm, cli_budget = page.json()["items"]
    assert cli_budget["actor"]["token_id"] is None and cli_budget["actor"]["name"].startswith("cli:")
    assert cli_budget["request_id"] is None and cli_budget["tenant_id"] is None
    assert api_budget["actor"]["name"] == "ops"
    same = ("action", "target")
    assert {k: cli_budget[k] for k in same} == {k: api_budget[k] for k in same}  # whichever edge made it
    assert api_budget["after"] == {**cli_budget["after"], "max_calls": 5}
    assert api_budget["before"] == cli_budget["after"]
    assert (cli_byollm["action"], cli_byollm["target"]) == ("byollm.set", "user:acme/alice")

    bound = bearer(make_token(Scope.ADMIN, tenant="acme"))
    mine = client.get("/v1/audit", headers=bound).json()["items"]
    assert [(e["action"], e["target"], e["actor"]["token_id"]) for e in mine] == [
        ("byollm.set", "user:acme/alice", None)
    ]
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    token_id = schemas["AuditActor"]["properties"]["token_id"]
    assert {"type": "null"} in token_id["anyOf"]
