"""`POST …:invoke` with an Idempotency-Key on PostgreSQL when a connection dies around a COMMIT (cut by a proxy):
the key's claim, committed or not, ran nothing, so its retry runs once; the outcome, committed, is replayed."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import text

from tests.integration.pg_proxy import Cut, is_commit
from tests.integration.test_outage_api_pg import Service, assert_outage, service

pytestmark = pytest.mark.slow
__all__ = ["service"]  # the fixture


INVOKE = "/v1/extensions/rewrite/functions/rewrite:invoke"


def _invoke(service: Service, key: str) -> httpx.Response:
    body = {"tenant_id": "tenant-1", "user_id": "alice", "params": {"text": "Send me the doc.", "tone": "formal"}}
    headers = {**service.admin, "Idempotency-Key": key}
    return httpx.post(f"{service.server.base}{INVOKE}", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("cut", [Cut.BEFORE, Cut.AFTER_REPLY])
def test_an_invoke_whose_claim_commit_fails_runs_on_its_retry(service: Service, cut: Cut) -> None:
    """The key's claim is committed before the handler runs: its COMMIT failing (committed or not, the client cannot
    tell) ran nothing, so the retry with the key runs it, once, instead of answering `idempotency_in_progress` (and
    `idempotency_outcome_unknown` after 15 minutes) for an invocation that never ran."""
    trap = service.proxy.trap(is_commit, cut, after="INSERT INTO invoke_requests")
    assert_outage(_invoke(service, "claim-cut"))
    assert trap.done.is_set()
    retry = _invoke(service, "claim-cut")
    assert retry.status_code == 200, retry.text
    assert retry.headers["Idempotent-Replayed"] == "false"
    again = _invoke(service, "claim-cut")
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["invocation_id"] == retry.json()["invocation_id"]


def _audited(service: Service, invocation_id: str) -> int:
    with service.engine.connect() as conn:
        entries = conn.scalars(text("SELECT after FROM audit_log WHERE action = 'extension.invoke'")).all()
    return sum(1 for after in entries if invocation_id in str(after))


@pytest.mark.parametrize("cut", [Cut.BEFORE, Cut.AFTER_REPLY])
def test_an_invoke_whose_outcome_commit_dies_is_answered_and_replayed(service: Service, cut: Cut) -> None:
    """The invocation ran (its calls billed); the COMMIT of its outcome (audit entry and the key's response) failed
    as the connection died, committed or not. The outcome is stored once on a fresh connection: the request answers
    200, the retry replays it (it used to answer 503, then `idempotency_in_progress` for 15 minutes and
    `idempotency_outcome_unknown` after, when the COMMIT had not gone through). One audit entry."""
    trap = service.proxy.trap(is_commit, cut, after="UPDATE invoke_requests")
    first = _invoke(service, f"outcome-{cut.value}")
    assert trap.done.is_set()
    assert first.status_code == 200 and first.headers["Idempotent-Replayed"] == "false", first.text
    retry = _invoke(service, f"outcome-{cut.value}")
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true", retry.text
    assert retry.json() == first.json()
    assert _audited(service, first.json()["invocation_id"]) == 1


@pytest.mark.parametrize("cut", [Cut.BEFORE, Cut.AFTER_REPLY])
def test_a_failed_invoke_whose_release_commit_dies_frees_its_key(service: Service, cut: Cut) -> None:
    """A provider failing without usage (metered, not billed) frees the key; the COMMIT of that release died with
    its connection (committed or not): done once more on a fresh connection, so the retry runs. It answered
    `idempotency_in_progress`, then `idempotency_outcome_unknown` for 24 h, for an invocation that cost nothing."""
    down = {"provider": "simulated", "model": "unavailable-model"}
    put = httpx.put(f"{service.server.base}/v1/admin/purposes/content_rewrite", json=down, headers=service.admin)
    assert put.status_code == 200, put.text
    trap = service.proxy.trap(is_commit, cut, after="invoke_requests.state = ")  # the release, not a claim
    first = _invoke(service, f"release-{cut.value}")
    assert first.status_code == 502 and first.json()["code"] == "provider_error", first.text
    assert trap.done.is_set()
    retry = _invoke(service, f"release-{cut.value}")
    assert retry.status_code == 502 and retry.headers["Idempotent-Replayed"] == "false", retry.text
    assert retry.json()["invocation_id"] != first.json()["invocation_id"]  # it ran again
    assert _audited(service, first.json()["invocation_id"]) == 1
