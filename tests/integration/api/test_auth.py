"""Bearer tokens: 401 without a live token, 403 without the scope; secrets are stored only as digests."""

from __future__ import annotations

import hashlib

from sqlalchemy import select, text

from metering.auth import Scope, authenticate, create_token, list_tokens, revoke_token
from metering.db.models import ApiTokenRow
from tests.integration.api.conftest import assert_problem, bearer, post_events


def test_no_token_is_401(client) -> None:
    response = post_events(client, [], secret=None)
    body = assert_problem(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in body["detail"] and body["instance"] == "/v1/events"


def test_wrong_tokens_are_401(client, make_token) -> None:
    good = make_token(Scope.INGEST)
    for wrong in (good[:-1] + ("A" if good[-1] != "A" else "B"), "mtr_" + "x" * 43, "not-a-token", "mtr_", "x" * 5000):
        assert_problem(post_events(client, [], secret=wrong), 401, "unauthenticated")
    basic = client.post("/v1/events", json={"events": []}, headers={"Authorization": f"Basic {good}"})
    assert_problem(basic, 401, "unauthenticated")
    assert post_events(client, [], secret=good).json() == {"inserted": 0, "duplicates": 0, "rejected": []}


def test_revoked_token_is_401(client, make_token, session_factory) -> None:
    secret = make_token(Scope.INGEST)
    assert post_events(client, [], secret=secret).status_code == 200
    with session_factory() as session:
        (row,) = list_tokens(session)
        revoke_token(session, row.id)
        session.commit()
    body = assert_problem(post_events(client, [], secret=secret), 401, "unauthenticated")
    assert "revoked" in body["detail"]


def test_missing_scope_is_403(client, make_token) -> None:
    secret = make_token(Scope.READ, Scope.ADMIN)  # scopes are independent: admin does not imply ingest
    body = assert_problem(post_events(client, [], secret=secret), 403, "forbidden")
    assert "'ingest'" in body["detail"]


def test_tokens_are_stored_hashed(session_factory) -> None:
    with session_factory() as session:
        _row, secret = create_token(session, "sink", ["ingest", "read", "ingest"], tenant_id="tenant-1")
        session.commit()
    assert secret.startswith("mtr_") and len(secret) == 47
    with session_factory() as session:
        dump = [str(v) for r in session.execute(text("SELECT * FROM api_tokens")) for v in r]
        stored = session.scalars(select(ApiTokenRow)).one()
    assert not any(secret in value or secret[8:] in value for value in dump), "the secret must never be stored"
    assert stored.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert stored.prefix == secret[:8] and stored.scopes == ["ingest", "read"] and stored.tenant_id == "tenant-1"


def test_authenticate_touches_last_used_at_and_refuses_revoked(session_factory) -> None:
    with session_factory() as session:
        row, secret = create_token(session, "sink", [Scope.INGEST])
        session.commit()
    with session_factory() as session:
        principal = authenticate(session, secret)
        session.commit()
    assert principal is not None and principal.token_id == row.id and principal.scopes == {Scope.INGEST}
    assert principal.tenant_id is None and principal.may_act_for("anyone")
    with session_factory() as session:
        used = session.get(ApiTokenRow, row.id)
        assert used is not None and used.last_used_at is not None
        first_revocation = revoke_token(session, row.id).revoked_at
        assert revoke_token(session, row.id).revoked_at == first_revocation  # idempotent
        session.commit()
    with session_factory() as session:
        assert authenticate(session, secret) is None


def test_last_used_at_is_written_by_requests(client, make_token, session_factory) -> None:
    secret = make_token(Scope.INGEST)
    assert post_events(client, [], secret=secret).status_code == 200
    with session_factory() as session:
        (row,) = list_tokens(session)
    assert row.last_used_at is not None


def test_request_with_a_token_of_the_right_scope_succeeds(client, make_token) -> None:
    response = client.post("/v1/events", json={"events": []}, headers=bearer(make_token(Scope.INGEST, Scope.READ)))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"


BODY_ROUTES = [
    ("POST", "/v1/events"),
    ("POST", "/v1/admin/credits"),
    ("PUT", "/v1/admin/users/acme/alice/byollm"),
    ("PUT", "/v1/admin/purposes/summary"),
    ("POST", "/v1/admin/price-overrides"),
    ("POST", "/v1/extensions/rewrite/functions/rewrite:invoke"),
]
NOT_JSON = (b'{"api_key": "sk-', b'{"user_id": "\xff"}')  # cut off; not UTF-8 (FastAPI's 400 path)


def test_a_body_that_is_not_json_is_refused_after_the_token_not_before(client, make_token) -> None:
    """FastAPI parses a JSON body before it runs any dependency: a request without a token (or with one lacking the
    scope, or bound to a tenant on a platform-wide route) whose body was not JSON got a 422 describing its body, not
    the 401/403 every other body gets (docs/api.md: 401 without a live token, 403 without the scope)."""
    reader = make_token(Scope.READ)
    admin = make_token(Scope.ADMIN, Scope.INGEST)
    bound = make_token(Scope.ADMIN, tenant="acme")
    json_type = {"Content-Type": "application/json"}
    for method, path in BODY_ROUTES:
        for body in NOT_JSON:
            none = client.request(method, path, content=body, headers=json_type)
            assert_problem(none, 401, "unauthenticated")
            assert none.headers["www-authenticate"] == "Bearer"
            wrong = client.request(method, path, content=body, headers=json_type | bearer("mtr_" + "x" * 43))
            assert_problem(wrong, 401, "unauthenticated")
            scope = assert_problem(
                client.request(method, path, content=body, headers=json_type | bearer(reader)), 403, "forbidden"
            )
            assert "lacks" in scope["detail"]
            # The token is good: the body's own problem, as before.
            good = client.request(method, path, content=body, headers=json_type | bearer(admin))
            assert_problem(good, 422, "validation_error")
    for body in NOT_JSON:  # a tenant-bound admin on a platform-wide route: its 403, as with a valid body
        for method, path in (("POST", "/v1/admin/price-overrides"), ("PUT", "/v1/admin/purposes/summary")):
            refused = client.request(method, path, content=body, headers=json_type | bearer(bound))
            assert "not bound" in assert_problem(refused, 403, "forbidden")["detail"]
        tenant_route = client.post("/v1/admin/credits", content=body, headers=json_type | bearer(bound))
        assert_problem(tenant_route, 422, "validation_error")
