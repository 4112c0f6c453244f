"""HEAD on every path served by GET (monitors, ``curl -I``): the GET's status and headers, no body; the same
authentication and tenancy; a streamed export stops at once. On SQLite and PostgreSQL."""

from __future__ import annotations

import anyio
import pytest

from metering.auth import Scope
from metering.billing import export, ledger_queries
from tests.integration.api.conftest import bearer
from tests.integration.api.read_data import ALPHA, BETA, seed

SEPTEMBER = "2026-09"


@pytest.fixture
def seeded(session_factory):
    return seed(session_factory, n=40)


def _same_as_get(client, path, headers=None, status=200):
    got = client.get(path, headers=headers)
    head = client.head(path, headers=headers)
    assert (head.status_code, got.status_code) == (status, status), got.text
    assert head.content == b""
    for name in ("content-type", "content-length", "content-disposition", "www-authenticate"):
        assert head.headers.get(name) == got.headers.get(name), name
    return head


def test_the_probes_answer_head(client):
    _same_as_get(client, "/healthz")
    _same_as_get(client, "/readyz")
    _same_as_get(client, "/openapi.json")


def test_head_is_authenticated_and_tenant_bound_like_get(client, make_token, seeded):
    _same_as_get(client, "/v1/balances", status=401)
    _same_as_get(client, "/v1/balances", bearer(make_token(Scope.INGEST)), status=403)
    alpha = bearer(make_token(Scope.READ, tenant=ALPHA))
    _same_as_get(client, "/v1/balances", alpha)
    _same_as_get(client, f"/v1/invoices/{ALPHA}/user-0/{SEPTEMBER}", alpha)
    _same_as_get(client, f"/v1/invoices/{BETA}/user-1/{SEPTEMBER}", alpha, status=404)
    _same_as_get(client, "/v1/transfers?limit=0", alpha, status=422)
    admin = bearer(make_token(Scope.ADMIN))
    _same_as_get(client, "/v1/audit", admin)
    _same_as_get(client, f"/v1/ledger/{SEPTEMBER}.csv", bearer(make_token(Scope.READ)))


def test_head_where_get_is_not_served_is_a_405_or_404(client):
    response = client.head("/v1/events")
    assert response.status_code == 405 and response.headers["allow"] == "POST" and response.content == b""
    assert client.head("/v1/nothing-here").status_code == 404
    assert client.delete("/healthz").headers["allow"] == "GET, HEAD"
    assert client.put("/v1/admin/purposes/p").status_code == 401  # PUT is served there: authentication first
    assert client.post("/v1/admin/purposes/p").headers["allow"] == "DELETE, GET, HEAD, PUT"


def test_head_of_the_ledger_export_stops_the_stream_and_frees_its_connection(client, make_token, seeded, monkeypatch):
    """Driven as a server does (ASGI 2.4, a client that stays connected): the export is not run to its end for a
    body nobody gets; the response ends after its headers and the export's pooled connection is back."""
    monkeypatch.setattr(export, "CHUNK_ROWS", 1)
    engine, sent = client.app.state.engine, []
    path = f"/v1/ledger/{SEPTEMBER}.csv"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "HEAD",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {make_token(Scope.READ)}".encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    requested = []
    chunks = []
    monkeypatch.setattr(ledger_queries, "ledger_csv_chunks", _counting(ledger_queries.ledger_csv_chunks, chunks))

    async def receive():
        if not requested:
            requested.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()  # the client stays connected

    async def send(message):
        sent.append(message)

    async def call():
        with anyio.fail_after(10):
            await client.app(scope, receive, send)

    anyio.run(call)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert [m["body"] for m in sent[1:]] == [b""] and not sent[-1].get("more_body")
    assert engine.pool.checkedout() == 0
    assert len(chunks) < 5  # of the 40 events' rows, one a chunk


def _counting(chunks_of, seen):
    def counted(*args, **kwargs):
        for chunk in chunks_of(*args, **kwargs):
            seen.append(chunk)
            yield chunk

    return counted
