"""The operator removed the Fernet key a user's BYOLLM api key was encrypted with (from METERING_SECRET_KEYS, too
early in a rotation): that user's calls, through the HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import uuid

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from metering.api.app import create_app
from metering.auth import Scope
from metering.crypto import SecretBox, generate_key
from metering.db.models import UsageEventRow
from metering.llm import settings_store as store
from tests.integration.api.admin_helpers import offline_settings
from tests.integration.api.conftest import assert_problem, bearer

REWRITE = "/v1/extensions/rewrite/functions/rewrite:invoke"
OLD, NEW = generate_key(), generate_key()


@pytest.fixture
def client(db_url, tmp_path, session_factory):
    """A service whose keys no longer include OLD, which encrypted the stored keys of users 'platform' and 'error'
    (named after their fallback policy)."""
    with session_factory() as session:
        for policy in ("platform", "error"):
            store.put_byollm(
                session, SecretBox([OLD]), user_id=policy, tenant_id="acme", provider="openai_compatible",
                model="own-model", api_key="sk-own-key-of-the-user-0123456789", base_url="http://127.0.0.1:9/v1",
                fallback_policy=policy,
            )  # fmt: skip
        session.commit()
    settings = offline_settings(db_url, tmp_path).model_copy(update={"secret_keys": SecretStr(NEW)})
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def admin(make_token):
    return bearer(make_token(Scope.ADMIN, name="ops"))


def _invoke(client, headers, user):
    body = {"user_id": user, "tenant_id": "acme", "params": {"text": "Send me the doc.", "tone": "formal"}}
    return client.post(REWRITE, json=body, headers=headers)


def _events(client, session_factory, event_ids):
    assert client.app.state.runtime.flush(timeout=30.0)
    with session_factory() as session:
        ids = [uuid.UUID(event_id) for event_id in event_ids]
        rows = session.scalars(select(UsageEventRow).where(UsageEventRow.event_id.in_(ids))).all()
        return sorted(rows, key=lambda r: r.call_index)


def test_a_byollm_key_that_cannot_be_decrypted_fails_the_call_and_never_fails_over(
    client, admin, session_factory, caplog
) -> None:
    """Each invoke of such a user was a 500 secret_error with no event (nothing in usage, metrics or the audit of a
    call) whatever the user's fallback policy. The BYOLLM attempt is now a failed call like any other (never made):
    its event says error_type=secret_error and a warning is logged; the invocation answers 502 provider_error naming
    the event, for policy `error` and for policy `platform` too: the operator lost the key, not the user's LLM, so
    no failover bills the user for it on the platform LLM."""
    for user in ("platform", "error"):
        with caplog.at_level(logging.WARNING, logger="metering"):
            refused = _invoke(client, admin, user)
        problem = assert_problem(refused, 502, "provider_error")
        assert "METERING_SECRET_KEYS" in problem["detail"]
        (only,) = _events(client, session_factory, problem["event_ids"])  # no failover event
        assert (only.is_byollm, only.status, only.error_type, only.billing_status, only.charge_nanos) == (
            True, "error", "secret_error", "excluded_byollm", 0,
        )  # fmt: skip
        assert "cannot be decrypted" in caplog.text and "sk-own-key" not in caplog.text

    shown = client.get("/v1/admin/users/acme/error/byollm", headers=admin).json()
    assert (shown["has_api_key"], shown["api_key_mask"]) == (True, None)
