"""POST /v1/events: per-event rejection, idempotent replays, limits (413), tenant-bound tokens, problem+json."""

from __future__ import annotations

import gzip
import uuid

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from metering.api import deps
from metering.api.app import create_app
from metering.api.routers import events
from metering.auth import Scope, TokenPrincipal
from metering.db.event_store import count_events
from metering.db.models import UsageEventRow
from metering.events import MAX_TOKENS, event_from_record
from metering.spool.http_sink import HttpSink
from metering.spool.sink import RefusedBatchError
from tests.fakes.events import record
from tests.integration.api.conftest import app_settings, assert_problem, bearer, post_events


def _stored(session_factory) -> int:
    with session_factory() as session:
        return count_events(session)


def test_one_malformed_event_is_rejected_and_the_rest_ingested_then_replayed(client, make_token, session_factory):
    secret = make_token(Scope.INGEST)
    records = [record(i) for i in range(500)]
    records[137]["input_tokens"] = -3
    response = post_events(client, records, secret)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["inserted"] == 499 and body["duplicates"] == 0
    assert len(body["rejected"]) == 1
    rejected = body["rejected"][0]
    assert rejected["index"] == 137 and rejected["event_id"] == str(records[137]["event_id"])
    assert "input_tokens" in rejected["reason"] and "greater than or equal to 0" in rejected["reason"]
    assert _stored(session_factory) == 499

    replay = post_events(client, records, secret).json()
    assert replay == {"inserted": 0, "duplicates": 499, "rejected": body["rejected"]}
    assert _stored(session_factory) == 499


def test_an_event_priced_beyond_one_calls_limit_is_rejected_in_a_valid_batch(client, make_token, session_factory):
    records = [record(i) for i in range(50)]
    records[7].update(model="claude-opus-4-1", input_tokens=MAX_TOKENS, output_tokens=MAX_TOKENS, cache_read_tokens=0)
    body = post_events(client, records, make_token(Scope.INGEST)).json()  # every event valid: the one-pass path
    assert body["inserted"] == 49 and body["duplicates"] == 0
    assert [(r["index"], r["event_id"]) for r in body["rejected"]] == [(7, str(records[7]["event_id"]))]
    assert "above the limit of $10,000.00 per call" in body["rejected"][0]["reason"]
    assert _stored(session_factory) == 49


def test_events_are_priced_and_billed(client, make_token, session_factory):
    assert post_events(client, [record(0), record(1)], make_token()).json()["inserted"] == 2
    with session_factory() as session:
        statuses = session.scalars(select(UsageEventRow.billing_status)).all()
    assert statuses == ["billed", "billed"]


def test_more_than_5000_events_is_413(client, make_token, session_factory):
    response = post_events(client, [record(i) for i in range(5001)], make_token())
    body = assert_problem(response, 413, "too_many_events")
    assert "at most 5000 events" in body["detail"] and "5001" in body["detail"]
    assert _stored(session_factory) == 0


def test_body_over_the_default_8_mib_is_413_before_parsing(client, make_token):
    oversized = b'{"events": [' + b" " * (8 * 1024 * 1024) + b"]}"
    headers = {"Content-Type": "application/json", **bearer(make_token())}
    body = assert_problem(client.post("/v1/events", content=oversized, headers=headers), 413, "payload_too_large")
    assert "8388608 bytes" in body["detail"]
    # Refused on the declared Content-Length alone, even without a token.
    assert_problem(client.post("/v1/events", content=oversized), 413, "payload_too_large")


def test_body_without_content_length_is_counted_while_read(db_url, tmp_path, make_token):
    secret = make_token()
    payload = orjson.dumps({"events": [record(i) for i in range(20)]})
    headers = {"Content-Type": "application/json", **bearer(secret)}

    def chunks(data: bytes):  # a generator body is sent chunked: no Content-Length
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    with TestClient(create_app(app_settings(db_url, tmp_path, max_body_bytes=len(payload) - 1))) as small:
        assert_problem(small.post("/v1/events", content=chunks(payload), headers=headers), 413, "payload_too_large")
    with TestClient(create_app(app_settings(db_url, tmp_path, max_body_bytes=len(payload)))) as exact:
        response = exact.post("/v1/events", content=chunks(payload), headers=headers)
        assert response.status_code == 200 and response.json()["inserted"] == 20


def test_tenant_bound_token_has_other_tenants_events_rejected_one_by_one(client, make_token, session_factory):
    secret = make_token(Scope.INGEST, tenant="tenant-1")
    records = [
        record(0),
        record(1, tenant_id="tenant-2"),
        record(2),
        record(3, tenant_id="tenant-2", input_tokens=-1),
        record(4, output_tokens="many"),
        record(5),
    ]
    body = post_events(client, records, secret).json()
    assert body["inserted"] == 3 and body["duplicates"] == 0
    assert [(r["index"], r["reason"]) for r in body["rejected"][:2]] == [(1, "tenant mismatch"), (3, "tenant mismatch")]
    assert [r["event_id"] for r in body["rejected"][:2]] == [str(records[1]["event_id"]), str(records[3]["event_id"])]
    assert body["rejected"][2]["index"] == 4 and "output_tokens" in body["rejected"][2]["reason"]
    with session_factory() as session:
        tenants = session.execute(select(UsageEventRow.tenant_id, func.count()).group_by(UsageEventRow.tenant_id))
        assert dict(tenants.all()) == {"tenant-1": 3}


def test_a_repeat_names_its_earlier_item_by_its_index_in_the_request(client, make_token):
    """A tenant-bound token's batch with another tenant's event first: the reasons of repeated event ids named the
    earlier item by its position among the token's own events ("item 0", the foreign event), not in the request."""
    secret = make_token(Scope.INGEST, tenant="tenant-1")
    stored = record(9)
    assert post_events(client, [stored], secret).json()["inserted"] == 1
    first = record(0)
    records = [
        record(1, tenant_id="tenant-2"),
        first,
        first | {"output_tokens": 41},  # the id of item 1, other content
        stored | {"output_tokens": 41},  # the id of a stored event, other content: rejected
        stored | {"output_tokens": 41},  # repeats item 3, which is rejected
    ]
    body = post_events(client, records, secret).json()
    assert (body["inserted"], body["duplicates"]) == (1, 0)
    reasons = {r["index"]: r["reason"] for r in body["rejected"]}
    assert sorted(reasons) == [0, 2, 3, 4]
    assert reasons[2] == "repeats the event_id of item 1 with different content (output_tokens): not ingested"
    assert reasons[4].startswith("repeats the event_id of item 3, which is rejected: "), reasons[4]


def test_a_gzip_body_is_decoded_and_any_other_content_coding_is_415(client, make_token, session_factory):
    """A gzipped batch is ingested as the same batch sent plain; a body that only says it is gzip is a 400, another
    coding a 415, and nothing of either is stored."""
    headers = {"Content-Type": "application/json", **bearer(make_token())}
    first = record(0)
    body = orjson.dumps({"events": [first]})
    for content, coding in [(body, "br"), (body, "gzip, gzip"), (gzip.compress(body), "deflate")]:
        response = client.post("/v1/events", content=content, headers={**headers, "Content-Encoding": coding})
        assert "Content-Encoding" in assert_problem(response, 415, "unsupported_media_type")["detail"]
    for content in (body, gzip.compress(body)[:-5], gzip.compress(body) + b"junk"):
        response = client.post("/v1/events", content=content, headers={**headers, "Content-Encoding": "gzip"})
        assert "gzip" in assert_problem(response, 400, "invalid_content_coding")["detail"]
    assert _stored(session_factory) == 0
    response = client.post("/v1/events", content=gzip.compress(body), headers={**headers, "Content-Encoding": "gzip"})
    assert response.status_code == 200 and response.json()["inserted"] == 1, response.text
    chunked = iter([gzip.compress(orjson.dumps({"events": [first, record(1)]}))])  # Transfer-Encoding chunked
    response = client.post("/v1/events", content=chunked, headers={**headers, "Content-Encoding": "X-Gzip"})
    assert response.json() == {"inserted": 1, "duplicates": 1, "rejected": []}
    two_members = gzip.compress(b'{"events": [') + gzip.compress(orjson.dumps(record(2)) + b"]}")
    response = client.post("/v1/events", content=two_members, headers={**headers, "Content-Encoding": "identity, gzip"})
    assert response.json()["inserted"] == 1
    assert _stored(session_factory) == 3
    response = client.post("/v1/events", content=body, headers={**headers, "Content-Encoding": "Identity"})
    assert response.status_code == 200 and response.json()["duplicates"] == 1
    assert client.get("/healthz", headers={"Content-Encoding": "gzip"}).status_code == 200  # no body: nothing to decode


def test_a_gzip_body_that_decodes_past_the_limit_is_413_and_one_bad_event_rejects_only_itself(
    db_url, tmp_path, make_token, session_factory
):
    """The limit holds for what a body decodes to: 40 KB that inflate to 64 MB are refused once past the limit."""
    events = [record(i) for i in range(500)]
    events[17] = {**events[17], "input_tokens": -3}
    payload = orjson.dumps({"events": events})
    with TestClient(create_app(app_settings(db_url, tmp_path, max_body_bytes=len(payload)))) as small:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip", **bearer(make_token())}
        bomb = gzip.compress(b'{"events": [' + b" " * (64 * 1024 * 1024) + b"]}")
        assert len(bomb) < 100_000
        assert "decompressed" in assert_problem(small.post("/v1/events", content=bomb, headers=headers), 413,
                                                "payload_too_large")["detail"]  # fmt: skip
        assert _stored(session_factory) == 0
        answer = small.post("/v1/events", content=gzip.compress(payload), headers=headers).json()
    assert (answer["inserted"], [r["index"] for r in answer["rejected"]]) == (499, [17])
    assert _stored(session_factory) == 499


def test_an_event_id_stored_for_another_tenant_is_rejected_without_describing_it(client, make_token, session_factory):
    theirs = record(0, tenant_id="tenant-2", user_id="their-user")
    assert post_events(client, [theirs], make_token(Scope.INGEST, tenant="tenant-2")).json()["inserted"] == 1
    mine = record(0, event_id=theirs["event_id"])  # tenant-1's event, under the id tenant-2 already used
    body = post_events(client, [mine, record(1)], make_token(Scope.INGEST, tenant="tenant-1")).json()
    assert (body["inserted"], body["duplicates"]) == (1, 0)
    assert body["rejected"] == [
        {
            "index": 0,
            "event_id": str(theirs["event_id"]),
            "reason": "event_id is already used by another stored event: not ingested (the stored event stands)",
        }
    ]
    with session_factory() as session:
        assert session.get(UsageEventRow, uuid.UUID(str(theirs["event_id"]))).user_id == "their-user"


def test_a_body_not_declared_as_json_is_415_after_the_token_check(client, make_token, session_factory):
    secret = make_token(Scope.INGEST)
    payload = orjson.dumps({"events": [record(0)]})
    for content_type, got in [
        ("application/x-www-form-urlencoded", "got 'application/x-www-form-urlencoded'"),  # curl -d
        ("text/plain", "got 'text/plain'"),
        (None, "none was sent"),
    ]:
        headers = bearer(secret) | ({"Content-Type": content_type} if content_type else {})
        body = assert_problem(
            client.post("/v1/events", content=payload, headers=headers), 415, "unsupported_media_type"
        )
        assert body["detail"] == f"the request body must be JSON: send Content-Type: application/json ({got})"
    assert _stored(session_factory) == 0
    assert_problem(
        client.post("/v1/events", content=payload, headers={"Content-Type": "text/plain"}), 401, "unauthenticated"
    )
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.batch+json"):
        response = client.post("/v1/events", content=payload, headers=bearer(secret) | {"Content-Type": content_type})
        assert response.status_code == 200, response.text
    assert _stored(session_factory) == 1
    # An empty body is still a 422 (the body is missing), not a 415; operations without a body never answer 415.
    assert_problem(client.post("/v1/events", headers=bearer(secret)), 422, "validation_error")
    spec = client.get("/openapi.json").json()["paths"]
    assert "415" in spec["/v1/events"]["post"]["responses"] and "415" not in spec["/v1/usage"]["get"]["responses"]


def test_unbound_token_ingests_every_tenant(client, make_token):
    body = post_events(client, [record(0), record(1, tenant_id="tenant-2")], make_token()).json()
    assert body == {"inserted": 2, "duplicates": 0, "rejected": []}


def test_items_that_are_not_objects_are_rejected_individually(client, make_token):
    body = post_events(client, [record(0), 42, "event", None, [record(1)], True, 1.5], make_token()).json()
    assert body["inserted"] == 1
    assert [(r["index"], r["event_id"]) for r in body["rejected"]] == [(i, None) for i in range(1, 7)]
    # named as JSON names them (the reasons said "not NoneType", "not list", "not str")
    kinds = ["a number", "a string", "null", "an array", "a boolean", "a number"]
    assert [r["reason"] for r in body["rejected"]] == [f"an event must be a JSON object, not {k}" for k in kinds]


def test_invalid_requests_are_422_problems_listing_the_errors(client, make_token):
    headers = {"Content-Type": "application/json", **bearer(make_token())}
    body = assert_problem(client.post("/v1/events", content=b'{"evts": []}', headers=headers), 422, "validation_error")
    assert {"loc": ["body", "events"], "msg": "Field required", "type": "missing"} in body["errors"]
    body = assert_problem(client.post("/v1/events", content=b'{"events": [', headers=headers), 422, "validation_error")
    assert body["errors"][0]["type"] == "json_invalid"
    body = assert_problem(client.post("/v1/events", content=b'{"events": 3}', headers=headers), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["body", "events"] and "input" not in body["errors"][0]


def test_unknown_routes_and_methods_are_problems(client):
    assert_problem(client.get("/v1/nothing-here"), 404, "not_found")
    response = client.get("/v1/events")
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_a_405_allows_every_method_the_path_serves(client):
    """Several routes share a path (GET and POST of the overrides; GET, PUT and DELETE of a purpose): Starlette's 405
    named only the first route's method (``Allow: POST`` for a PUT of /v1/admin/price-overrides)."""
    response = client.put("/v1/admin/price-overrides")
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, HEAD, POST"
    response = client.post("/v1/admin/purposes/p")
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "DELETE, GET, HEAD, PUT"
    assert client.delete("/healthz").headers["allow"] == "GET, HEAD"


class _CommitFails(Session):
    def commit(self) -> None:
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))


def test_a_failed_commit_is_answered_with_an_error_not_200(settings, session_factory, monkeypatch):
    """The request's session commits before the response is sent (the edge commits)."""
    principal = TokenPrincipal(token_id=uuid.uuid4(), name="t", scopes=frozenset({Scope.INGEST}))
    monkeypatch.setattr(deps, "_principal", lambda request, secret: principal)
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        app.state.sessions = sessionmaker(app.state.engine, class_=_CommitFails, expire_on_commit=False)
        response = post_events(client, [record(0), record(1)], "mtr_whatever")
    assert_problem(response, 503, "database_unavailable")
    assert _stored(session_factory) == 0


def test_an_unexpected_error_is_a_500_problem_without_internals(settings, make_token, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(events, "ingest_as", boom)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = post_events(client, [record(0)], make_token())
    body = assert_problem(response, 500, "internal_error")
    assert "secret internals" not in response.text and body["detail"] == "an unexpected error occurred"


def test_the_service_s_500_is_what_a_spool_s_http_sink_takes_for_a_refusal_of_the_batch(
    settings, make_token, monkeypatch
):
    """The HTTP sink isolates the event at fault only on the service's own 500 (its problem document), any other 500
    being a proxy's (an outage): the service's must stay recognisable to it."""

    def boom(*args, **kwargs):
        raise RuntimeError("a bug on some value")

    monkeypatch.setattr(events, "ingest_as", boom)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        sink = HttpSink(str(client.base_url), make_token(), client=client)
        with pytest.raises(RefusedBatchError, match="internal_error"):
            sink.deliver([event_from_record(record(0))])


def test_content_encoding_sent_as_several_header_lines_is_read_as_their_list(client, make_token, session_factory):
    """RFC 9110 5.3: header lines of one field are one list. Only the first Content-Encoding line was read, so a body
    'gzip' then 'br' (a proxy's br on top of a gzip body) was decoded as gzip alone and ingested, 'gzip' twice was
    gunzipped once and refused as a body that is not JSON, and 'identity' then 'gzip' reached the app still gzipped."""
    auth = [("Content-Type", "application/json"), *bearer(make_token()).items()]
    body = orjson.dumps({"events": [record(0)]})
    for first, second in [("gzip", "br"), ("gzip", "gzip"), ("x-gzip", "deflate")]:
        sent = gzip.compress(gzip.compress(body)) if second == "gzip" else gzip.compress(body)
        headers = [*auth, ("Content-Encoding", first), ("Content-Encoding", second)]
        response = client.post("/v1/events", content=sent, headers=headers)
        assert "Content-Encoding" in assert_problem(response, 415, "unsupported_media_type")["detail"]
    assert _stored(session_factory) == 0
    headers = [*auth, ("Content-Encoding", "identity"), ("Content-Encoding", "gzip")]
    response = client.post("/v1/events", content=gzip.compress(body), headers=headers)
    assert response.status_code == 200 and response.json()["inserted"] == 1


def test_an_event_id_in_any_spelling_is_one_event_and_names_are_compared_as_sent(client, make_token, session_factory):
    """What api.md says of spellings: an event_id is a UUID (stored once however it is spelled); names are compared
    exactly as sent (NFC and NFD spellings of one name are two users); a key given twice counts with its last value."""
    secret = make_token()
    first = record(0)
    spelled = str(first["event_id"])
    respellings = [spelled.upper(), "{" + spelled + "}", "urn:uuid:" + spelled, spelled.replace("-", "")]
    body = post_events(client, [first, *(first | {"event_id": s} for s in respellings)], secret).json()
    assert (body["inserted"], body["duplicates"], body["rejected"]) == (1, 4, [])
    nfc, nfd = record(1, user_id="Jos\u00e9"), record(2, user_id="Jose\u0301")
    assert post_events(client, [nfc, nfd], secret).json()["inserted"] == 2
    twice = orjson.dumps({"events": [record(3)]}).replace(b'"input_tokens":120', b'"input_tokens":7,"input_tokens":120')
    headers = {"Content-Type": "application/json", **bearer(secret)}
    assert client.post("/v1/events", content=twice, headers=headers).json()["inserted"] == 1
    with session_factory() as session:
        users = session.scalars(select(UsageEventRow.user_id).where(UsageEventRow.user_id.like("Jos%"))).all()
        tokens = session.scalars(select(UsageEventRow.input_tokens).where(UsageEventRow.call_index == 3)).all()
    assert sorted(users) == sorted(["Jos\u00e9", "Jose\u0301"]) and tokens == [120]
    assert _stored(session_factory) == 4
