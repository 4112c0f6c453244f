"""POST /v1/extensions/{id}/functions/{fn}:invoke: the bundled rewrite extension through the app's runtime
(metered ctx.llm, simulated provider, spool, flusher) into the database, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from metering.api.app import create_app
from metering.auth import Scope
from metering.crypto import secret_box_from_settings
from metering.db.event_store import count_events
from metering.db.models import UsageEventRow
from metering.llm import settings_store as store
from tests.fakes import FakeOpenAIServer, Raw, Reply
from tests.fakes.fixtures import openai_server
from tests.integration.api.admin_helpers import actions, audit_rows, offline_settings
from tests.integration.api.conftest import assert_problem, bearer

REWRITE = "/v1/extensions/rewrite/functions/rewrite:invoke"
__all__ = ["openai_server"]  # a fixture


@pytest.fixture
def settings(db_url, tmp_path):
    return offline_settings(db_url, tmp_path)


@pytest.fixture
def admin(make_token):
    return bearer(make_token(Scope.ADMIN, name="ops"))


def _invoke(client, headers, path=REWRITE, *, user="alice", tenant="acme", **params):
    params = params or {"text": "Send me the doc, thanks.", "tone": "formal"}
    return client.post(path, json={"user_id": user, "tenant_id": tenant, "params": params}, headers=headers)


def _events(session_factory, event_ids):
    with session_factory() as session:
        rows = session.scalars(select(UsageEventRow).where(UsageEventRow.event_id.in_(event_ids))).all()
        return sorted(rows, key=lambda r: r.call_index)


def test_invoke_rewrite_returns_text_and_the_event_is_ingested(client, admin, session_factory):
    response = _invoke(client, admin)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["extension_id"] == "rewrite" and body["function"] == "rewrite"
    assert body["result"]["text"].startswith("[simulated]")
    assert (body["provider"], body["model"], body["is_byollm"]) == ("simulated", "claude-sonnet-4-6", False)
    assert len(body["event_ids"]) == 1

    assert client.app.state.runtime.flush(timeout=30.0)
    (row,) = _events(session_factory, [uuid.UUID(body["event_ids"][0])])
    assert (row.tenant_id, row.user_id, row.extension_id, row.function) == ("acme", "alice", "rewrite", "rewrite")
    assert str(row.invocation_id) == body["invocation_id"]
    assert (row.purpose, row.status, row.is_byollm, row.billing_status) == ("content_rewrite", "ok", False, "billed")
    assert row.input_tokens > 0 and row.output_tokens > 0

    (entry,) = audit_rows(session_factory)
    assert (entry.action, entry.target, entry.tenant_id) == ("extension.invoke", "extension:rewrite.rewrite", "acme")
    assert entry.after["event_ids"] == body["event_ids"] and entry.after["user_id"] == "alice"
    assert "params" not in entry.after and "Send me the doc" not in str(entry.after)


def test_one_event_per_call_and_byollm_settings_apply_at_once(client, admin, session_factory):
    multiple = "/v1/extensions/rewrite/functions/rewrite_multiple:invoke"
    body = _invoke(client, admin, multiple, user="bob", text="hello", tone="casual", n_variations=3).json()
    assert len(body["result"]["variations"]) == 3 and len(body["event_ids"]) == 3
    assert body["is_byollm"] is False

    # A BYOLLM change through the admin API applies to the next invocation (the settings cache is invalidated).
    put = client.put(
        "/v1/admin/users/acme/bob/byollm", json={"provider": "simulated", "model": "llama3.1-8b"}, headers=admin
    )
    assert put.status_code == 200, put.text
    own = _invoke(client, admin, user="bob").json()
    assert (own["is_byollm"], own["model"]) == (True, "llama3.1-8b")

    assert client.app.state.runtime.flush(timeout=30.0)
    rows = _events(session_factory, [uuid.UUID(e) for e in body["event_ids"] + own["event_ids"]])
    assert len(rows) == 4
    assert sorted(r.is_byollm for r in rows) == [False, False, False, True]
    byollm = next(r for r in rows if r.is_byollm)
    assert byollm.billing_status == "excluded_byollm"


def test_a_tenant_admin_cannot_spend_another_tenants_byollm(client, admin, make_token, session_factory):
    put = client.put(
        "/v1/admin/users/globex/victim/byollm", json={"provider": "simulated", "model": "llama3.1-8b"}, headers=admin
    )
    assert put.status_code == 200, put.text
    acme = bearer(make_token(Scope.ADMIN, tenant="acme"))
    body = _invoke(client, acme, user="victim", tenant="acme").json()
    assert (body["is_byollm"], body["model"]) == (False, "claude-sonnet-4-6")  # the platform LLM, billed to acme
    own = _invoke(client, admin, user="victim", tenant="globex").json()
    assert (own["is_byollm"], own["model"]) == (True, "llama3.1-8b")


def test_events_are_delivered_at_shutdown(settings, make_token, session_factory):
    admin = bearer(make_token(Scope.ADMIN))
    with TestClient(create_app(settings)) as client:
        ids = [_invoke(client, admin, user=f"u{i}").json()["event_ids"][0] for i in range(3)]
    rows = _events(session_factory, [uuid.UUID(e) for e in ids])  # the lifespan drained the spool
    assert len(rows) == 3


def test_a_restart_delivers_what_an_earlier_run_left_in_the_spool(settings, session_factory):
    """An earlier run crashed with events spooled but not delivered: the next start delivers them by itself, without
    waiting for an invoke (the runtime used to be built, and its flusher started, only by the first invoke)."""
    import time

    import orjson

    from metering.spool import Spool
    from tests.fakes.events import record

    left = [record(i, user_id="crashed") for i in range(5)]
    with Spool(settings.spool_dir) as spool:  # the earlier run, which never delivered them
        for rec in left:
            spool.append(orjson.dumps(rec))
    with TestClient(create_app(settings)) as client:
        assert client.app.state.runtime.built
        ids = [uuid.UUID(r["event_id"]) for r in left]
        deadline = time.monotonic() + 30
        while len(_events(session_factory, ids)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_events(session_factory, ids)) == 5  # delivered while serving
    with TestClient(create_app(settings)) as client:
        assert not client.app.state.runtime.built  # nothing left: nothing built


def test_llm_settings_are_read_from_their_own_pool_not_the_requests(client, admin, session_factory):
    """ctx.llm reads settings and budgets on the event loop. From the requests' pool, with every connection held
    by sessions that only the event loop can close, that read hung the worker for good (2 workers on SQLite, 40
    event batches and 60 invokes at once: 500s, then no answers). Its own pool cannot be exhausted that way."""
    assert _invoke(client, admin).status_code == 200
    runtime = client.app.state.runtime
    assert runtime.settings_engine is not None and runtime.settings_engine is not client.app.state.engine
    assert runtime.settings_engine.pool.size() == 2


def test_action_items_of_the_longest_text_accepted_come_back_whole(client, admin):
    """3,200 characters of tasks: the JSON answer must not be cut off by max_tokens (it was at ~3,600 with 1,500: a
    502; with 16,384, at 20,000 characters of tiny tasks); a longer text is refused before any call."""
    path = "/v1/extensions/rewrite/functions/extract_action_items:invoke"
    text = ("Bob will send the report by Friday. " * 100)[:3_200]
    response = _invoke(client, admin, path, text=text)
    assert response.status_code == 200, response.text
    assert len(response.json()["result"]["action_items"]) >= 88
    assert_problem(_invoke(client, admin, path, text=text + "x"), 422, "invalid_input")


def test_unknown_extension_or_function_is_404(client, admin, session_factory):
    missing = assert_problem(_invoke(client, admin, "/v1/extensions/nope/functions/rewrite:invoke"), 404, "not_found")
    assert "'nope'" in missing["detail"] and "rewrite" in missing["detail"]
    no_fn = assert_problem(
        _invoke(client, admin, "/v1/extensions/rewrite/functions/translate:invoke"), 404, "not_found"
    )
    assert "'translate'" in no_fn["detail"] and "rewrite_multiple" in no_fn["detail"]
    assert_problem(client.post("/v1/extensions/rewrite/functions/rewrite", json={}, headers=admin), 404, "not_found")
    assert actions(session_factory) == []


def test_invalid_params_are_422(client, admin, session_factory):
    bad_tone = assert_problem(_invoke(client, admin, text="x", tone="sarcastic"), 422, "invalid_input")
    assert "tone" in bad_tone["detail"]
    too_many = "/v1/extensions/rewrite/functions/rewrite_multiple:invoke"
    assert_problem(_invoke(client, admin, too_many, text="x", tone="casual", n_variations=6), 422, "invalid_input")
    for lax in ({"n_variations": "3"}, {"n_variations": True}, {"n_variations": 2.0}):  # params are strict
        assert_problem(_invoke(client, admin, too_many, text="x", tone="casual", **lax), 422, "invalid_input")
    assert_problem(_invoke(client, admin, text="x", tone="formal", keep_meaning="no"), 422, "invalid_input")
    no_user = client.post(REWRITE, json={"tenant_id": "acme", "params": {}}, headers=admin)
    errors = assert_problem(no_user, 422, "validation_error")["errors"]
    assert ["body", "user_id"] in [e["loc"] for e in errors]
    with session_factory() as session:
        assert count_events(session) == 0
    assert actions(session_factory) == []


def test_enforced_budget_is_429(client, admin, session_factory):
    put = client.put("/v1/admin/budgets/rewrite", json={"max_calls": 2, "mode": "enforce"}, headers=admin)
    assert put.status_code == 200
    multiple = "/v1/extensions/rewrite/functions/rewrite_multiple:invoke"
    response = _invoke(client, admin, multiple, text="hello", tone="casual", n_variations=3)
    assert_problem(response, 429, "budget_exceeded")
    assert client.app.state.runtime.flush(timeout=30.0)
    with session_factory() as session:
        assert count_events(session) == 2  # the two calls made before the refusal are metered
    # Audited too: it spent (the two calls are billed).
    assert actions(session_factory) == ["budget.set", "extension.invoke"]
    entry = audit_rows(session_factory, "extension.invoke")[0]
    assert (entry.after["error"], len(entry.after["event_ids"])) == ("budget_exceeded", 2)
    assert entry.after["invocation_id"] == response.json()["invocation_id"]


def test_auth_and_tenant_binding(client, make_token, session_factory):
    assert_problem(_invoke(client, {}), 401, "unauthenticated")
    assert_problem(_invoke(client, bearer(make_token(Scope.READ, Scope.INGEST))), 403, "forbidden")
    acme = bearer(make_token(Scope.ADMIN, tenant="acme"))
    assert_problem(_invoke(client, acme, tenant="globex"), 404, "not_found")
    assert _invoke(client, acme, tenant="acme").status_code == 200
    assert [(r.action, r.tenant_id) for r in audit_rows(session_factory)] == [("extension.invoke", "acme")]


# -- Idempotency-Key --------------------------------------------------------------------------------


def _keyed(admin, key):
    return {**admin, "Idempotency-Key": key}


def _spooled_and_stored(client, session_factory) -> int:
    assert client.app.state.runtime.flush(timeout=30.0)
    with session_factory() as session:
        return count_events(session)


def test_a_retry_with_the_same_key_answers_the_first_result_and_runs_nothing(client, admin, session_factory):
    first = _invoke(client, _keyed(admin, "req-1"))
    assert first.status_code == 200, first.text
    assert first.headers["Idempotent-Replayed"] == "false"
    again = _invoke(client, _keyed(admin, "req-1"))
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert _spooled_and_stored(client, session_factory) == 1  # one provider call, not two
    (entry,) = audit_rows(session_factory)
    assert entry.after["idempotency_key"] == "req-1" and entry.after["invocation_id"] == first.json()["invocation_id"]
    # Without a key, each request runs.
    assert "Idempotent-Replayed" not in _invoke(client, admin).headers
    assert _spooled_and_stored(client, session_factory) == 2


def test_the_key_of_another_invocation_is_a_conflict_per_tenant(client, admin, session_factory):
    assert _invoke(client, _keyed(admin, "k")).status_code == 200
    other = _invoke(client, _keyed(admin, "k"), text="Something else entirely.", tone="casual")
    assert_problem(other, 409, "idempotency_conflict")
    assert_problem(_invoke(client, _keyed(admin, "k"), user="bob"), 409, "idempotency_conflict")
    assert _invoke(client, _keyed(admin, "k"), tenant="globex").status_code == 200  # keys are per tenant
    assert _spooled_and_stored(client, session_factory) == 2


def test_a_failure_after_metered_calls_names_them_and_is_replayed(client, admin, session_factory):
    put = client.put("/v1/admin/budgets/rewrite", json={"max_calls": 2, "mode": "enforce"}, headers=admin)
    assert put.status_code == 200
    multiple = "/v1/extensions/rewrite/functions/rewrite_multiple:invoke"
    plain = assert_problem(
        _invoke(client, admin, multiple, text="hello", tone="casual", n_variations=3), 429, "budget_exceeded"
    )
    assert len(plain["event_ids"]) == 2 and uuid.UUID(plain["invocation_id"])  # the billed calls, named
    first = _invoke(client, _keyed(admin, "m1"), multiple, text="hello", tone="casual", n_variations=3)
    body = assert_problem(first, 429, "budget_exceeded")
    assert first.headers["Idempotent-Replayed"] == "false"
    assert len(body["event_ids"]) == 2 and body["invocation_id"] != plain["invocation_id"]
    again = _invoke(client, _keyed(admin, "m1"), multiple, text="hello", tone="casual", n_variations=3)
    assert again.status_code == 429 and again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["content-type"] == "application/problem+json" and again.json() == body
    assert _spooled_and_stored(client, session_factory) == 4  # 2 + 2: the replay made no call
    rows = _events(session_factory, [uuid.UUID(e) for e in body["event_ids"]])
    assert {str(r.invocation_id) for r in rows} == {body["invocation_id"]}


def test_a_provider_failure_that_used_nothing_frees_the_key(client, admin, session_factory):
    """The call failed without usage: metered (an error event), not billed, so a retry with the key runs again
    (it used to replay the 502 for 24 h)."""
    down = {"provider": "simulated", "model": "unavailable-model"}
    assert client.put("/v1/admin/purposes/content_rewrite", json=down, headers=admin).status_code == 200
    first = assert_problem(_invoke(client, _keyed(admin, "p1")), 502, "provider_error")
    assert len(first["event_ids"]) == 1  # named: the failed call is metered
    again = _invoke(client, _keyed(admin, "p1"))
    assert again.status_code == 502 and again.headers.get("Idempotent-Replayed") != "true"
    assert again.json()["event_ids"] != first["event_ids"]  # it ran again
    assert _spooled_and_stored(client, session_factory) == 2


def test_a_failure_before_any_call_frees_the_key(client, admin, session_factory):
    bad = _invoke(client, _keyed(admin, "fix-me"), text="hello", tone="sarcastic")
    assert_problem(bad, 422, "invalid_input")
    assert "event_ids" not in bad.json()
    fixed = _invoke(client, _keyed(admin, "fix-me"), text="hello", tone="formal")
    assert fixed.status_code == 200 and fixed.headers["Idempotent-Replayed"] == "false"


def test_a_key_still_running_is_409_in_progress(client, admin, session_factory):
    from metering.db import invoke_requests
    from metering.events import utcnow

    params = {"text": "Send me the doc, thanks.", "tone": "formal"}
    sha = invoke_requests.request_sha256("rewrite", "rewrite", "alice", params)
    with session_factory() as session:  # another worker is running this very request
        claimed = invoke_requests.claim(
            session, tenant_id="acme", key="busy", sha256=sha, invocation_id=uuid.uuid4(), now=utcnow()
        )
        assert claimed is None
        session.commit()
    assert_problem(_invoke(client, _keyed(admin, "busy"), **params), 409, "idempotency_in_progress")
    assert _spooled_and_stored(client, session_factory) == 0


@pytest.mark.parametrize(
    ("key", "status", "code"), [("   ", 422, "invalid_input"), ("k" * 201, 422, "validation_error")]
)
def test_a_blank_or_long_key_is_refused_before_anything_runs(client, admin, session_factory, key, status, code):
    assert_problem(_invoke(client, _keyed(admin, key)), status, code)
    assert _spooled_and_stored(client, session_factory) == 0


def test_a_handler_bug_after_a_billed_call_keeps_the_key_with_the_ids(client, admin, session_factory, monkeypatch):
    """Not a MeteringError (a bug in the handler), after a call that used the provider: a retry with the key must
    not run and bill it again; the 500 is kept and names the call."""
    from metering import extensions
    from tests.fakes.extensions import buggy

    monkeypatch.setitem(extensions.BUNDLED, "buggy", buggy)
    path = "/v1/extensions/buggy/functions/run:invoke"
    first = _invoke(client, _keyed(admin, "b1"), path, text="hello")
    body = assert_problem(first, 500, "internal_error")
    assert first.headers["Idempotent-Replayed"] == "false" and len(body["event_ids"]) == 1
    again = _invoke(client, _keyed(admin, "b1"), path, text="hello")
    assert again.status_code == 500 and again.headers["Idempotent-Replayed"] == "true" and again.json() == body
    assert _spooled_and_stored(client, session_factory) == 1
    rows = _events(session_factory, [uuid.UUID(body["event_ids"][0])])
    assert rows[0].billing_status == "billed"


def test_a_claim_that_never_recorded_its_outcome_is_never_run_again(client, admin, session_factory):
    from datetime import timedelta

    from metering.db import invoke_requests
    from metering.events import utcnow

    params = {"text": "Send me the doc, thanks.", "tone": "formal"}
    sha = invoke_requests.request_sha256("rewrite", "rewrite", "alice", params)
    lost = uuid.uuid4()
    with session_factory() as session:  # a worker claimed it 20 minutes ago and died
        invoke_requests.claim(session, tenant_id="acme", key="lost", sha256=sha, invocation_id=lost,
                              now=utcnow() - timedelta(minutes=20))  # fmt: skip
        session.commit()
    body = assert_problem(_invoke(client, _keyed(admin, "lost"), **params), 409, "idempotency_outcome_unknown")
    assert body["invocation_id"] == str(lost)
    assert _spooled_and_stored(client, session_factory) == 0


def test_a_key_must_be_printable_ascii(client, admin, session_factory):
    headers = {**admin, "Idempotency-Key": b"cl\xe9"}  # latin-1 on the wire: it was stored as mojibake
    assert_problem(_invoke(client, headers), 422, "validation_error")
    assert _spooled_and_stored(client, session_factory) == 0


def _own_llm_for_alice(client, admin, server: FakeOpenAIServer) -> None:
    """acme/alice's BYOLLM: the fake OpenAI-compatible server, no failover (its answers reach the caller)."""
    body = {"provider": "openai_compatible", "model": "llama3", "base_url": server.base_url, "fallback_policy": "error"}
    put = client.put("/v1/admin/users/acme/alice/byollm", json=body, headers=admin)
    assert put.status_code == 200, put.text


def test_a_reply_with_a_lone_surrogate_is_answered_not_a_500(client, admin, openai_server: FakeOpenAIServer):
    """The user's own LLM answered half an emoji (the JSON escape "\\ud83d" alone): the response could not be
    encoded, a 500 after the call was billed, audited and its outcome stored (a keyed retry replayed the 500)."""
    openai_server.default = Reply(text="Hello \ud83d there")
    _own_llm_for_alice(client, admin, openai_server)
    headers = {**admin, "Idempotency-Key": "k-1"}
    for replayed in ("false", "true"):
        response = _invoke(client, headers, text="hi", tone="formal")
        assert (response.status_code, response.headers["Idempotent-Replayed"]) == (200, replayed), response.text
        assert response.json()["result"]["text"] == "Hello \ufffd there"
    assert len(openai_server.requests) == 1


@pytest.mark.parametrize("kind", ["json_escape", "error_message"])
def test_a_lone_surrogate_in_a_json_reply_or_an_error_message_is_no_500(
    client, admin, openai_server: FakeOpenAIServer, kind
):
    """A model writing its JSON with \\u escapes sent half an emoji: the parsed value held a lone surrogate, which
    the response could not encode (a 500 after the billed call); so did a provider error message (a review)."""
    from tests.fakes.server import Fail

    if kind == "json_escape":
        openai_server.default = Reply(text='{"items": [{"owner": "Bob", "deadline": null, "task": "Call \\ud83d"}]}')
    else:
        openai_server.default = Fail(400, message="bad input \ud83d")
    _own_llm_for_alice(client, admin, openai_server)
    path = "/v1/extensions/rewrite/functions/extract_action_items:invoke"
    body = {"user_id": "alice", "tenant_id": "acme", "params": {"text": "Bob: call."}}
    response = client.post(path, json=body, headers=admin)
    if kind == "json_escape":
        assert response.status_code == 200, response.text
        assert response.json()["result"]["action_items"][0]["task"] == "Call \ufffd"
    else:
        assert response.status_code == 502, response.text
        assert "bad input" in response.json()["detail"]


def test_an_own_llm_answering_200_with_a_body_that_is_not_json_is_a_502(client, admin, openai_server: FakeOpenAIServer):
    """An empty or cut `application/json` body: the SDK's JSON decoding error was no ProviderError, so the invoke
    answered 500 `internal_error` (and a BYOLLM call with fallback policy `platform` did not fail over)."""
    openai_server.default = Raw(b'{"id": "chatcmpl-1", "choices": [{"mess', "application/json")
    _own_llm_for_alice(client, admin, openai_server)
    response = _invoke(client, admin, text="hi", tone="formal")
    assert response.status_code == 502, response.text
    assert response.json()["code"] == "provider_error" and "not valid JSON" in response.json()["detail"]


def test_a_database_failing_as_a_keyed_invocation_finishes_is_a_503_naming_its_calls(
    client, admin, session_factory, monkeypatch
):
    """The calls were made, the audit entry and the key's outcome could not be written: the first response, like
    every other first response to a keyed request, says `Idempotent-Replayed: false` (it said nothing)."""
    from sqlalchemy.exc import OperationalError

    from metering.api.routers import invoke

    def database_down(*_args: object) -> None:
        raise OperationalError("COMMIT", {}, Exception("disk full"))

    real = invoke._record
    monkeypatch.setattr(invoke, "_record", database_down)
    first = _invoke(client, _keyed(admin, "db-1"))
    body = assert_problem(first, 503, "database_unavailable")
    assert first.headers["Idempotent-Replayed"] == "false" and len(body["event_ids"]) == 1
    monkeypatch.setattr(invoke, "_record", real)
    assert_problem(_invoke(client, _keyed(admin, "db-1")), 409, "idempotency_in_progress")  # never run twice
    assert "Idempotent-Replayed" not in _invoke(client, admin).headers  # without a key: no such header


PLATFORM_KEY = "sk-platform-OPENAI-0123456789-abcdefghij"


def test_an_admin_cannot_have_the_platform_key_sent_to_a_host_of_its_choosing(
    settings, make_token, session_factory, openai_server: FakeOpenAIServer
):
    """A purpose's base_url for a keyed provider got the platform's key (METERING_OPENAI_API_KEY), which no API
    answers: any admin token could set `{"provider": "openai", "base_url": "https://its-host/v1"}` on a purpose and
    invoke, and its host received `Authorization: Bearer <platform key>`. BYOLLM keys were already never sent to an
    endpoint other than the one they were given for; the platform's now go only to their provider's own endpoint
    (or METERING_PLATFORM__BASE_URL): a purpose with a base_url of its own is called without them."""
    keyed = settings.model_copy(update={"openai_api_key": SecretStr(PLATFORM_KEY)})
    admin = bearer(make_token(Scope.ADMIN, name="ops-admin"))
    with TestClient(create_app(keyed)) as client:
        purpose = {"provider": "openai", "model": "gpt-4o", "base_url": openai_server.base_url}
        assert client.put("/v1/admin/purposes/content_rewrite", json=purpose, headers=admin).status_code == 200
        response = _invoke(client, admin)
        assert response.status_code == 200, response.text
    (received,) = openai_server.requests
    assert PLATFORM_KEY not in str(received.headers)
    assert openai_server.api_key_of(received.headers) != PLATFORM_KEY


def test_an_operators_gateway_listed_in_keyed_base_urls_is_sent_the_platform_key(
    settings, make_token, session_factory, openai_server: FakeOpenAIServer
):
    """The operator (settings, not an admin token) may name its own gateways: a purpose pointing at one of them is sent
    the platform key of the provider it names."""
    platform = settings.platform.model_copy(update={"keyed_base_urls": frozenset({openai_server.base_url})})
    keyed = settings.model_copy(update={"openai_api_key": SecretStr(PLATFORM_KEY), "platform": platform})
    admin = bearer(make_token(Scope.ADMIN, name="ops-admin"))
    with TestClient(create_app(keyed)) as client:
        purpose = {"provider": "openai", "model": "gpt-4o", "base_url": openai_server.base_url}
        assert client.put("/v1/admin/purposes/content_rewrite", json=purpose, headers=admin).status_code == 200
        assert _invoke(client, admin).status_code == 200
    (received,) = openai_server.requests
    assert openai_server.api_key_of(received.headers) == PLATFORM_KEY


def _adapters(client) -> dict[str | None, object]:
    """The app's provider adapters, by api key."""
    return {key[2]: entry.provider for key, entry in client.app.state.runtime.providers._cache.items()}


def test_a_replaced_or_deleted_byollm_key_s_adapter_is_closed(client, admin, openai_server: FakeOpenAIServer):
    """The service kept the adapter (SDK client, connection pool, key) of every key it had ever used: a user's
    replaced or deleted key stayed in memory, its connections open, for the life of the process."""
    own = {"provider": "openai_compatible", "model": "llama3", "base_url": openai_server.base_url}
    path = "/v1/admin/users/acme/alice/byollm"
    old_key, new_key = "sk-old-key-0123456789abcdef", "sk-new-key-0123456789abcdef"
    assert client.put(path, json={**own, "api_key": old_key}, headers=admin).status_code == 200
    assert _invoke(client, admin, text="hi", tone="formal").status_code == 200
    old = _adapters(client)[old_key]

    assert client.put(path, json={**own, "api_key": new_key}, headers=admin).status_code == 200
    assert old_key not in _adapters(client) and old._client.is_closed()
    assert _invoke(client, admin, text="hi", tone="formal").status_code == 200
    new = _adapters(client)[new_key]
    assert [r.headers["authorization"] for r in openai_server.requests] == [f"Bearer {old_key}", f"Bearer {new_key}"]

    assert client.delete(path, headers=admin).status_code == 204
    assert new_key not in _adapters(client) and new._client.is_closed()
    body = _invoke(client, admin, text="hi", tone="formal").json()
    assert body["is_byollm"] is False and len(openai_server.requests) == 2


def test_a_byollm_key_replaced_by_another_process_is_retired_at_the_reload(
    settings, admin, session_factory, openai_server: FakeOpenAIServer
):
    """A key replaced from another process (the CLI, another worker: a commit this app's runtime is not told of) left
    its adapter, its connections and the key, in this process's pool until it was the least recently used beyond the
    bound. The settings reload that finds the new key (here at once: a TTL of 0) retires the old key's adapter."""
    own = {"provider": "openai_compatible", "model": "llama3", "base_url": openai_server.base_url}
    old_key, new_key = "sk-old-key-0123456789abcdef", "sk-new-key-0123456789abcdef"
    with TestClient(create_app(settings.model_copy(update={"settings_cache_ttl_s": 0.0}))) as client:
        path = "/v1/admin/users/acme/alice/byollm"
        assert client.put(path, json={**own, "api_key": old_key}, headers=admin).status_code == 200
        assert _invoke(client, admin, text="hi", tone="formal").status_code == 200
        old = _adapters(client)[old_key]
        with session_factory() as session:  # another process's commit
            store.put_byollm(
                session, secret_box_from_settings(settings), user_id="alice", tenant_id="acme", api_key=new_key, **own
            )
            session.commit()
        assert _invoke(client, admin, text="hi", tone="formal").status_code == 200
        assert old_key not in _adapters(client) and old._client.is_closed()
        keys = [r.headers["authorization"] for r in openai_server.requests]
        assert keys == [f"Bearer {old_key}", f"Bearer {new_key}"]


MULTIPLE = "/v1/extensions/rewrite/functions/rewrite_multiple:invoke"


@pytest.mark.parametrize(
    ("path", "replies"),
    [
        (REWRITE, [Reply(text="")]),
        (REWRITE, [Reply(text=" \n\u200b ")]),
        (REWRITE, [Reply(text="Dear Sir, please", stop_reason="content_filter")]),
        (MULTIPLE, [Reply(text="Hey, send it over?"), Reply(text="", stop_reason="refusal")]),
        (REWRITE, [Reply(refusal="I'm sorry, I can't help with that.")]),  # OpenAI's: content null, finish `stop`
    ],
)
def test_an_empty_or_filtered_rewrite_is_a_502_billed_once(
    client, admin, session_factory, openai_server: FakeOpenAIServer, path, replies
):
    """A model that answered nothing (or only blanks), or whose reply its content filter stopped (OpenAI's
    `content_filter`; Anthropic's `refusal`), was returned as a successful rewrite: `{"text": "", "truncated": false}`
    (a client would have sent an empty message, or a cut one as if whole). It is a 502 naming the calls, which were
    billed; a keyed retry gets it back and pays nothing again. An OpenAI refusal (`message.refusal`, the content
    null) is said to be one: it was "the model's reply is empty"."""
    openai_server.script(*replies)
    purpose = {"provider": "openai", "model": "gpt-4o", "base_url": openai_server.base_url}
    assert client.put("/v1/admin/purposes/content_rewrite", json=purpose, headers=admin).status_code == 200
    params = {"text": "send me the doc", "tone": "formal"} | ({"n_variations": 2} if path == MULTIPLE else {})
    first = _invoke(client, _keyed(admin, "e-1"), path, **params)
    body = assert_problem(first, 502, "provider_error")
    assert len(body["event_ids"]) == len(replies) and "rewrite" in body["detail"]
    if replies[-1].refusal or replies[-1].stop_reason:  # said as such, not as "the model's reply is empty"
        assert "stopped by the provider" in body["detail"] and "is empty" not in body["detail"]
    again = _invoke(client, _keyed(admin, "e-1"), path, **params)
    assert (again.status_code, again.headers["Idempotent-Replayed"], again.json()) == (502, "true", body)
    assert len(openai_server.requests) == len(replies)
    assert _spooled_and_stored(client, session_factory) == len(replies)
    rows = _events(session_factory, [uuid.UUID(e) for e in body["event_ids"]])
    assert [r.billing_status for r in rows] == ["billed"] * len(replies)


@pytest.mark.parametrize("kind", ["object", "bytes", "surrogate"])
def test_a_result_json_cannot_carry_is_a_500_naming_the_billed_call(client, admin, session_factory, monkeypatch, kind):
    """A handler (a bug) returned what JSON cannot carry after a billed call: the response failed as it was written,
    a 500 without the call's ids; its Idempotency-Key stayed `running` (a retry: 409 in progress, then outcome
    unknown, for good) or, for a lone surrogate, its outcome was stored and every retry failed again. Like any bug
    after metered calls it is a 500 naming the call, audited, and kept under the key."""
    from metering import extensions
    from tests.fakes.extensions import buggy

    monkeypatch.setitem(extensions.BUNDLED, "buggy", buggy)
    path = "/v1/extensions/buggy/functions/odd_result:invoke"
    first = _invoke(client, _keyed(admin, "o-1"), path, kind=kind)
    body = assert_problem(first, 500, "internal_error")
    assert first.headers["Idempotent-Replayed"] == "false" and len(body["event_ids"]) == 1
    again = _invoke(client, _keyed(admin, "o-1"), path, kind=kind)
    assert (again.status_code, again.headers["Idempotent-Replayed"], again.json()) == (500, "true", body)
    assert _spooled_and_stored(client, session_factory) == 1  # the retry made no call
    (entry,) = audit_rows(session_factory)
    assert (entry.after["error"], entry.after["event_ids"]) == ("internal_error", body["event_ids"])
    plain = assert_problem(_invoke(client, admin, path, kind=kind), 500, "internal_error")  # without a key too
    assert len(plain["event_ids"]) == 1 and plain["invocation_id"] != body["invocation_id"]


def test_action_items_of_a_reply_the_content_filter_stopped_are_a_502_billed_once(
    client, admin, session_factory, openai_server: FakeOpenAIServer
):
    """A JSON reply stopped by the provider's content filter that still parsed (`{"items": []}`: the list cut short,
    or emptied) was returned as the text's action items, a 200 saying there were none."""
    openai_server.default = Reply(text='{"items": []}', stop_reason="content_filter")
    purpose = {"provider": "openai", "model": "gpt-4o", "base_url": openai_server.base_url}
    assert client.put("/v1/admin/purposes/action_items", json=purpose, headers=admin).status_code == 200
    path = "/v1/extensions/rewrite/functions/extract_action_items:invoke"
    first = _invoke(client, _keyed(admin, "a-1"), path, text="Bob sends the report by Friday.")
    body = assert_problem(first, 502, "provider_error")
    assert len(body["event_ids"]) == 1 and "content_filter" in body["detail"]
    again = _invoke(client, _keyed(admin, "a-1"), path, text="Bob sends the report by Friday.")
    assert (again.status_code, again.headers["Idempotent-Replayed"], again.json()) == (502, "true", body)
    assert len(openai_server.requests) == 1 and _spooled_and_stored(client, session_factory) == 1
    (row,) = _events(session_factory, [uuid.UUID(body["event_ids"][0])])
    assert row.billing_status == "billed"


def test_an_invocation_ends_before_its_key_could_read_as_outcome_unknown(
    client, admin, session_factory, openai_server: FakeOpenAIServer, monkeypatch
):
    """An invocation ran as long as its calls took (chatty makes one call per message, unbounded; a provider may
    hang): past 15 minutes a retry with its key answered `idempotency_outcome_unknown` ("its process stopped ...; use
    a new key to run it again") while it was still running, and a client following that advice paid for it twice.
    It now has a deadline shorter than that: past it, its calls are ended (the one in flight recorded as cancelled)
    and it answers `504 invocation_timeout` naming them, stored under its key."""
    import threading
    from datetime import timedelta

    from metering.api.routers import invoke as router
    from metering.db import invoke_requests

    assert router.INVOKE_DEADLINE < invoke_requests.UNKNOWN_AFTER
    monkeypatch.setattr(router, "INVOKE_DEADLINE", timedelta(seconds=1))
    never = threading.Event()  # the second call hangs: only the deadline ends it
    openai_server.script(Reply(text="Hey, send it?"), Reply(text="never sent", proceed=never))
    purpose = {"provider": "openai", "model": "gpt-4o", "base_url": openai_server.base_url}
    assert client.put("/v1/admin/purposes/content_rewrite", json=purpose, headers=admin).status_code == 200
    params = {"text": "send me the doc", "tone": "casual", "n_variations": 2}
    try:
        first = _invoke(client, _keyed(admin, "slow-1"), MULTIPLE, **params)
    finally:
        never.set()
    body = assert_problem(first, 504, "invocation_timeout")
    assert len(body["event_ids"]) == 2
    again = _invoke(client, _keyed(admin, "slow-1"), MULTIPLE, **params)
    assert (again.status_code, again.headers["Idempotent-Replayed"], again.json()) == (504, "true", body)
    assert _spooled_and_stored(client, session_factory) == 2
    rows = _events(session_factory, [uuid.UUID(e) for e in body["event_ids"]])
    assert [r.status for r in rows] == ["ok", "cancelled"] and rows[0].billing_status == "billed"


ACTION_ITEMS = "/v1/extensions/rewrite/functions/extract_action_items:invoke"


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (Reply(text='Here are the action items:\n```json\n{"items": [{"owner": "Zoë", "task": "送信"}]}\n```'), 200),
        (Reply(text='```json\n{"items": []}\n```\nLet me know if you need more.'), 200),
        (Reply(text='{"items": [{"owner": "Bob", "task": "Call"},]}'), "not valid JSON"),  # a trailing comma
        (Reply(text='{"items": [{"owner": "Bob"}]}'), "action item 0 does not match"),
        (Reply(text='{"tasks": []}'), "'items' list"),
        (Reply(text='{"items": [{"owner": "Bob", "ta', stop_reason="length"), "cut off at max_tokens"),
        (Reply(text='{"items": [{"task": "Ca', stop_reason="content_filter"), "stop reason 'content_filter'"),
        (Reply(text='{"items": []}' + "\n" * 50, stop_reason="length"), 200),  # JSON mode's padding: whole
    ],
)
def test_action_items_of_what_real_models_reply_are_returned_or_a_502_naming_the_problem_billed_once(
    client, admin, session_factory, openai_server: FakeOpenAIServer, reply, outcome
):
    """Through the official SDK: a reply is parsed, or it is a 502 naming what is wrong, its one call billed."""
    openai_server.default = reply
    purpose = {"provider": "openai", "model": "gpt-4o", "base_url": openai_server.base_url}
    assert client.put("/v1/admin/purposes/action_items", json=purpose, headers=admin).status_code == 200
    response = _invoke(client, admin, ACTION_ITEMS, text="Zoë sends it; Bob calls.")
    if outcome == 200:
        assert response.status_code == 200, response.text
        event_ids = response.json()["event_ids"]
    else:
        body = assert_problem(response, 502, "invalid_json_response")
        assert outcome in body["detail"]
        event_ids = body["event_ids"]
    assert len(event_ids) == 1 and _spooled_and_stored(client, session_factory) == 1
    (row,) = _events(session_factory, [uuid.UUID(event_ids[0])])
    assert row.billing_status == "billed"


def test_a_variation_failing_mid_way_fails_rewrite_multiple_naming_every_call_billed_once(
    client, admin, session_factory, openai_server: FakeOpenAIServer
):
    """The second of three variations fails at the provider: no partial list as if whole; the first call (used)
    billed once, the failed one (nothing used) metered at no cost, the third never made."""
    from tests.fakes.server import Fail

    openai_server.script(Reply(text="Hey, send it over?"), Fail(400, message="bad request"), Reply(text="unused"))
    purpose = {"provider": "openai", "model": "gpt-4o", "base_url": openai_server.base_url}
    assert client.put("/v1/admin/purposes/content_rewrite", json=purpose, headers=admin).status_code == 200
    response = _invoke(client, admin, MULTIPLE, text="send me the doc", tone="casual", n_variations=3)
    body = assert_problem(response, 502, "provider_error")
    assert "result" not in body and len(body["event_ids"]) == 2 and len(openai_server.requests) == 2
    assert _spooled_and_stored(client, session_factory) == 2
    rows = _events(session_factory, [uuid.UUID(e) for e in body["event_ids"]])
    assert [(r.status, r.billing_status) for r in rows] == [("ok", "billed"), ("error", "not_billable")]
