"""The ledger read side: transfers (keyset pages), balances, invoices and CSV exports, held events, quotes;
tenant isolation on every endpoint; scopes. On SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import gc
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from metering.api.app import create_app
from metering.api.read_schemas import InvoiceSummary
from metering.auth import Scope
from metering.billing import export, invoice_store
from metering.billing.ingest import ingest
from metering.billing.invoice_pages import encode_invoice_cursor
from metering.billing.overrides import add_override
from metering.billing.pricing import MAX_CALL_NANOS, PriceBook, price_usage
from metering.billing.rates import RateCards
from metering.billing.reprice import reprice_held
from metering.config import BillingSettings, Settings
from metering.db.models import AccountRow, TransferRow
from metering.events import event_from_record
from tests.fakes.events import record
from tests.integration.api.conftest import assert_problem, bearer
from tests.integration.api.read_data import ALPHA, BETA, MARKUP, T0, seed, stored_events

SEPTEMBER, OCTOBER = "2026-09", "2026-10"


@pytest.fixture
def seeded(session_factory):
    return seed(session_factory, n=150)


@pytest.fixture
def reader(make_token):
    return bearer(make_token(Scope.READ))


@pytest.fixture
def alpha(make_token):
    return bearer(make_token(Scope.READ, tenant=ALPHA))


def _get(client, path, headers, **params):
    response = client.get(path, params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response


def _transfers(session_factory):
    with session_factory() as session:
        rows = list(session.scalars(select(TransferRow)))
    return sorted(rows, key=lambda t: (t.created_at, t.id))


def _wallets(session_factory, tenant):
    with session_factory() as session:
        stmt = select(AccountRow.id).where(AccountRow.tenant_id == tenant, AccountRow.kind == "user_wallet")
        return set(session.scalars(stmt))


def _walk(client, headers, limit, path="/v1/transfers", items="items", ident="id", **params):
    """Every page of a keyset-paginated list (/v1/transfers by default); the ids in order and the number of pages."""
    ids, cursor, pages = [], None, 0
    while True:
        query = {"limit": limit, **params} | ({"cursor": cursor} if cursor else {})
        body = _get(client, path, headers, **query).json()
        pages += 1
        assert len(body[items]) <= limit
        ids += [item[ident] for item in body[items]]
        cursor = body["next_cursor"]
        if cursor is None:
            return ids, pages
        assert len(body[items]) == limit


# -- transfers ------------------------------------------------------------------------------------


def test_keyset_pagination_walks_every_transfer_exactly_once(client, reader, seeded, session_factory):
    expected = [str(t.id) for t in _transfers(session_factory)]
    assert len(expected) > 100
    stamps = [t.created_at for t in _transfers(session_factory)]
    assert len(set(stamps)) < len(stamps) / 5  # a batch's transfers share their created_at: ids break the ties
    for limit in (1, 7, 100, 1000):
        ids, pages = _walk(client, reader, limit)
        assert ids == expected, limit
        assert pages == max(1, -(-len(expected) // limit))


def test_transfer_fields_and_the_default_page(client, reader, seeded, session_factory):
    first = _transfers(session_factory)[0]
    body = _get(client, "/v1/transfers", reader).json()
    assert len(body["items"]) == 100 and body["next_cursor"]
    item = body["items"][0]
    assert item["id"] == str(first.id) and item["kind"] == first.kind
    assert item["amount_nanos"] == first.amount_nanos and item["amount_usd"] == export.usd(first.amount_nanos)
    assert datetime.fromisoformat(item["created_at"]) == first.created_at
    assert set(item) == {
        "id", "created_at", "kind", "debit_account_id", "credit_account_id", "amount_nanos", "amount_usd",
        "currency", "event_id", "reverses_id", "idempotency_key", "period", "memo",
    }  # fmt: skip


def test_transfer_filters(client, reader, seeded, session_factory):
    every = _transfers(session_factory)
    wallet = f"user:{BETA}:user-1"
    cases = [
        ({"kind": "credit"}, lambda t: t.kind == "credit"),
        ({"kind": "provider_cost"}, lambda t: t.kind == "provider_cost"),
        ({"account_id": wallet}, lambda t: wallet in (t.debit_account_id, t.credit_account_id)),
        ({"account_id": "provider:openai:payable"}, lambda t: t.credit_account_id == "provider:openai:payable"),
        ({"period": SEPTEMBER}, lambda t: (t.period or t.created_at.strftime("%Y-%m")) == SEPTEMBER),  # credits too
        ({"period": SEPTEMBER, "kind": "credit"}, lambda t: t.kind == "credit" and t.created_at.month == 9),
        ({"event_id": str(every[0].event_id)}, lambda t: t.event_id == every[0].event_id),
        ({"period": OCTOBER, "kind": "usage_charge"}, lambda t: t.period == OCTOBER and t.kind == "usage_charge"),
    ]
    for params, keep in cases:
        expected = [str(t.id) for t in every if keep(t)]
        assert 0 < len(expected) < len(every), params
        assert _walk(client, reader, 9, **params)[0] == expected, params


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"limit": 0}, "validation_error"),
        ({"limit": 1001}, "validation_error"),
        ({"kind": "gift"}, "validation_error"),
        ({"event_id": "not-a-uuid"}, "validation_error"),
        ({"period": "2026-13"}, "invalid_input"),
        ({"period": "9999-12"}, "invalid_input"),  # its end is past what a datetime holds: was a 500
        ({"period": "\uff12\uff10\uff12\uff16-\uff11\uff11"}, "invalid_input"),  # full-width digits
        ({"cursor": "garbage!"}, "invalid_input"),
        ({"cursor": base64.urlsafe_b64encode(b"2026-10-01T00:00:00|zz").decode()}, "invalid_input"),
        ({"cursor": base64.urlsafe_b64encode(b"2026-10-01T00:00:00|" + b"a" * 32).decode()}, "invalid_input"),
        # A time that leaves years 1 to 9999 once in UTC: was a 500 (OverflowError binding it).
        ({"cursor": base64.urlsafe_b64encode(b"0001-01-01T00:00:00+05:00|" + b"0" * 32).decode()}, "invalid_input"),
        ({"cursor": base64.urlsafe_b64encode(b"9999-12-31T23:59:59-05:00|" + b"0" * 32).decode()}, "invalid_input"),
    ],
)
def test_invalid_transfer_queries_are_422(client, reader, params, code):
    body = assert_problem(client.get("/v1/transfers", params=params, headers=reader), 422, code)
    if "cursor" in params:
        assert "invalid cursor" in body["detail"]


@pytest.mark.parametrize(("path", "name"), [("/v1/transfers", "account_id"), ("/v1/balances", "tenant_id"),
                                             ("/v1/invoices", "tenant_id")])  # fmt: skip
def test_an_empty_filter_is_refused(client, reader, alpha, seeded, path, name):
    """No account or tenant id is empty: ``tenant_id=`` answered no accounts or invoices (a 200, as if there were none),
    and a 403 to a tenant-bound token. A 422 now, naming the parameter."""
    for headers in (reader, alpha):
        body = assert_problem(client.get(path, params={name: ""}, headers=headers), 422, "validation_error")
        assert f"query.{name}" in body["detail"]


def test_a_tenant_bound_token_sees_only_transfers_of_its_wallets(client, alpha, seeded, session_factory):
    wallets = _wallets(session_factory, ALPHA)
    expected = [str(t.id) for t in _transfers(session_factory) if wallets & {t.debit_account_id, t.credit_account_id}]
    ids, _ = _walk(client, alpha, 6)
    assert ids == expected and expected
    kinds = {item["kind"] for item in _get(client, "/v1/transfers", alpha, limit=1000).json()["items"]}
    assert kinds == {"usage_charge", "credit"}  # never provider_cost: platform and provider accounts only
    for params in (
        {"account_id": f"user:{BETA}:user-1"},
        {"account_id": "provider:anthropic:cost"},
        {"kind": "provider_cost"},
    ):
        assert _get(client, "/v1/transfers", alpha, **params).json() == {"items": [], "next_cursor": None}
    beta_event = next(e for e in stored_events(session_factory) if e.tenant_id == BETA and e.charge_nanos)
    assert _get(client, "/v1/transfers", alpha, event_id=str(beta_event.event_id)).json()["items"] == []


# -- balances -------------------------------------------------------------------------------------


def test_balances(client, reader, alpha, seeded, session_factory):
    accounts = _get(client, "/v1/balances", reader).json()["accounts"]
    with session_factory() as session:
        stored = {a.id: a.balance_nanos for a in session.scalars(select(AccountRow))}
    assert {a["account_id"]: a["balance_nanos"] for a in accounts} == stored
    assert sum(a["balance_nanos"] for a in accounts) == 0  # double entry
    assert [a["account_id"] for a in accounts] == sorted(stored)
    assert {"platform:revenue", "platform:topups", "provider:anthropic:cost"} <= set(stored)
    wallet = next(a for a in accounts if a["account_id"] == f"user:{ALPHA}:user-1")
    assert wallet["kind"] == "user_wallet" and wallet["tenant_id"] == ALPHA and wallet["user_id"] == "user-1"
    assert wallet["balance_usd"] == export.usd(wallet["balance_nanos"])

    mine = _get(client, "/v1/balances", alpha).json()["accounts"]
    assert {a["account_id"] for a in mine} == _wallets(session_factory, ALPHA)
    assert _get(client, "/v1/balances", alpha, tenant_id=ALPHA).json()["accounts"] == mine
    assert BETA not in str(mine) and "platform" not in str(mine)
    by_filter = _get(client, "/v1/balances", reader, tenant_id=BETA).json()["accounts"]
    assert {a["account_id"] for a in by_filter} == _wallets(session_factory, BETA)
    body = assert_problem(client.get("/v1/balances", params={"tenant_id": BETA}, headers=alpha), 403, "forbidden")
    assert f"token bound to tenant {ALPHA}" in body["detail"]


def _balance_pages(client, headers, limit, **params):
    return _walk(client, headers, limit, path="/v1/balances", items="accounts", ident="account_id", **params)


def test_balances_come_a_page_at_a_time(client, reader, alpha, seeded, session_factory):
    whole = _get(client, "/v1/balances", reader).json()
    assert whole["next_cursor"] is None  # the default page (1,000) holds them all
    everything = [a["account_id"] for a in whole["accounts"]]
    assert len(everything) > 4
    for limit in (1, 2, 3, len(everything) - 1, len(everything)):
        ids, pages = _balance_pages(client, reader, limit)
        assert ids == everything
        assert pages == -(-len(everything) // limit)

    mine, _pages = _balance_pages(client, alpha, 2)
    assert set(mine) == _wallets(session_factory, ALPHA) and len(mine) == len(set(mine))
    # a cursor minted over every account, used by a tenant-bound token: still only its own wallets
    other_cursor = _get(client, "/v1/balances", reader, limit=1).json()["next_cursor"]
    after = _get(client, "/v1/balances", alpha, cursor=other_cursor).json()["accounts"]
    assert {a["account_id"] for a in after} <= _wallets(session_factory, ALPHA)


@pytest.mark.parametrize("cursor", ["not-a-cursor", "YWNjb3VudHw", "YWNjb3VudHx4AHk", "%%%", "dXNlcjphOmI"])
def test_a_bad_balances_cursor_is_422(client, reader, seeded, cursor):
    response = client.get("/v1/balances", params={"cursor": cursor}, headers=reader)
    assert "invalid cursor" in assert_problem(response, 422, "invalid_input")["detail"]


@pytest.mark.parametrize("path", ["/v1/balances", "/v1/transfers", "/v1/events/unpriced", "/v1/invoices"])
def test_a_cursor_longer_than_any_page_gives_is_refused_before_it_is_decoded(client, reader, path):
    whole = "YWNjb3VudHx1c2VyOmE6" + "YWFh" * 1500  # 'account|user:a:' and 4,500 more characters: base64 of a long id
    longest = client.get(path, params={"cursor": whole[:6000]}, headers=reader)
    if path == "/v1/balances":  # an account id as long as one may be: a page after it
        assert longest.status_code == 200, longest.text
    else:  # not one of their cursors: decoded, and refused as such
        assert_problem(longest, 422, "invalid_input")
    assert_problem(client.get(path, params={"cursor": whole + "YWFh"}, headers=reader), 422, "validation_error")


# -- invoices -------------------------------------------------------------------------------------


def _finalize_september(session_factory):
    with session_factory() as session:
        invoice_store.finalize_period(session, SEPTEMBER, T0 + timedelta(days=60), timedelta(hours=72))
        session.commit()


def test_invoice_list_and_detail_equal_the_invoice_store(client, reader, seeded, session_factory):
    _finalize_september(session_factory)
    listed = _get(client, "/v1/invoices", reader).json()["invoices"]
    with session_factory() as session:
        invoices = invoice_store.list_invoices(session)
    assert [(i["tenant_id"], i["user_id"], i["period"], i["status"]) for i in listed] == [
        (i.tenant_id, i.user_id, i.period, i.status) for i in invoices
    ]
    assert {i["status"] for i in listed} == {"draft", "finalized"}
    assert {i["tenant_id"] for i in listed} == {ALPHA, BETA}
    october = _get(client, "/v1/invoices", reader, period=OCTOBER).json()["invoices"]
    assert october and {i["period"] for i in october} == {OCTOBER}
    beta = _get(client, "/v1/invoices", reader, tenant_id=BETA, period=SEPTEMBER).json()["invoices"]
    assert beta and {(i["tenant_id"], i["status"]) for i in beta} == {(BETA, "finalized")}
    for invoice in invoices:
        path = f"/v1/invoices/{invoice.tenant_id}/{invoice.user_id}/{invoice.period}"
        body = _get(client, path, reader).json()
        assert body["status"] == invoice.status and body["calls"] == invoice.calls
        assert (body["total_nanos"], body["rounded_nanos"], body["residue_nanos"]) == (
            invoice.total_nanos,
            invoice.rounded_nanos,
            invoice.residue_nanos,
        )
        assert body["rounded_nanos"] + body["residue_nanos"] == body["total_nanos"]
        assert body["rounded_nanos"] % 10**7 == 0 and body["rounded_usd"] == export.usd(invoice.rounded_nanos)
        assert body["residue_usd"] == export.usd(invoice.residue_nanos)
        assert [
            (line["extension_id"], line["model"], line["calls"], line["billed_nanos"]) for line in body["lines"]
        ] == [(line.extension_id, line.model, line.calls, line.billed_nanos) for line in invoice.lines]
        assert (body["finalized_at"] is None) == (invoice.status == "draft")
        csv = _get(client, path + ".csv", reader)
        assert csv.headers["content-type"].startswith("text/csv")
        assert "attachment" in csv.headers["content-disposition"]
        assert csv.text == export.invoice_csv(invoice)


def _invoice_pages(client, headers, limit, **params):
    """Every page of /v1/invoices, the summaries in order (a page before the last may hold fewer than limit)."""
    found, cursor = [], None
    for _ in range(500):
        query = {"limit": limit, **params} | ({"cursor": cursor} if cursor else {})
        body = _get(client, "/v1/invoices", headers, **query).json()
        assert len(body["invoices"]) <= limit
        found += body["invoices"]
        if (cursor := body["next_cursor"]) is None:
            return found
    raise AssertionError("the walk never ended")


def test_invoices_come_a_page_at_a_time(client, reader, alpha, seeded, session_factory):
    """Walking the pages gives the whole list (``list_invoices``, the CLI's) for any page size; a tenant-bound
    token walks its tenant's alone, even from a cursor naming another tenant."""
    _finalize_september(session_factory)
    with session_factory() as session:
        whole = [InvoiceSummary.of(i).model_dump(mode="json") for i in invoice_store.list_invoices(session)]
    assert len(whole) > 3 and {i["status"] for i in whole} == {"draft", "finalized"}
    assert _get(client, "/v1/invoices", reader).json() == {"invoices": whole, "next_cursor": None}  # default: 100
    for limit in (1, 2, 5):
        assert _invoice_pages(client, reader, limit) == whole
    october = [i for i in whole if i["period"] == OCTOBER]
    assert october and _invoice_pages(client, reader, 2, period=OCTOBER) == october
    assert _invoice_pages(client, alpha, 1) == [i for i in whole if i["tenant_id"] == ALPHA]
    first = _get(client, "/v1/invoices", reader, limit=1).json()
    assert first["invoices"] == whole[:1] and first["next_cursor"]
    for cursor in (first["next_cursor"], encode_invoice_cursor((SEPTEMBER, BETA, "user-1"))):
        after = _get(client, "/v1/invoices", alpha, cursor=cursor).json()["invoices"]
        assert {i["tenant_id"] for i in after} == {ALPHA}


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"cursor": "not-a-cursor"}, "invalid_input"),
        ({"cursor": "YWNjb3VudHx1c2VyOmE6Yg"}, "invalid_input"),  # a balances cursor
        ({"cursor": encode_invoice_cursor((SEPTEMBER, ALPHA, "user-1")), "period": OCTOBER}, "invalid_input"),
        ({"limit": 0}, "validation_error"),
        ({"limit": 1001}, "validation_error"),
    ],
)
def test_invalid_invoice_pages_are_422(client, reader, params, code):
    assert_problem(client.get("/v1/invoices", params=params, headers=reader), 422, code)


def test_missing_invoices_and_bad_periods(client, reader, seeded):
    for path in (
        f"/v1/invoices/{ALPHA}/nobody/{OCTOBER}",
        f"/v1/invoices/{ALPHA}/user-1/2025-01",
        "/v1/invoices/x/y/2026-10",
    ):
        assert_problem(client.get(path, headers=reader), 404, "not_found")
        assert_problem(client.get(path + ".csv", headers=reader), 404, "not_found")
    assert_problem(client.get(f"/v1/invoices/{ALPHA}/user-1/October", headers=reader), 422, "invalid_input")
    assert_problem(client.get(f"/v1/invoices/{ALPHA}/user-1/2026-1.csv", headers=reader), 422, "invalid_input")
    assert_problem(client.get("/v1/invoices", params={"period": "2026/10"}, headers=reader), 422, "invalid_input")


def test_another_tenants_invoice_is_a_404_like_a_missing_one(client, alpha, seeded):
    own = _get(client, f"/v1/invoices/{ALPHA}/user-1/{OCTOBER}", alpha).json()
    assert own["tenant_id"] == ALPHA and own["lines"]
    theirs = client.get(f"/v1/invoices/{BETA}/user-1/{OCTOBER}", headers=alpha)
    missing = client.get(f"/v1/invoices/{BETA}/nobody/{OCTOBER}", headers=alpha)
    assert_problem(theirs, 404, "not_found")
    assert theirs.json()["detail"] == f"no invoice for tenant {BETA}, user user-1, period {OCTOBER}"
    assert_problem(missing, 404, "not_found")
    assert_problem(client.get(f"/v1/invoices/{BETA}/user-1/{OCTOBER}.csv", headers=alpha), 404, "not_found")
    listed = _get(client, "/v1/invoices", alpha).json()["invoices"]
    assert listed and {i["tenant_id"] for i in listed} == {ALPHA}
    assert_problem(client.get("/v1/invoices", params={"tenant_id": BETA}, headers=alpha), 403, "forbidden")


def test_an_invoice_read_sees_one_snapshot_of_the_database(client, reader, seeded, session_factory):
    """The invoice list is read in several queries (finalized invoices, then billed lines): an ingest committed
    between them is not half seen. The read answers the database as at its first query; the next read sees it."""
    engine, done = client.app.state.engine, []
    late = record(0, tenant_id=ALPHA, user_id="late-user", occurred_at=datetime(2026, 10, 3, tzinfo=UTC))

    def commit_between(_conn, _cursor, statement, *_args):
        if done or "FROM invoices" not in statement:
            return
        done.append(statement)
        with session_factory() as other:  # another connection commits while the read is under way
            assert ingest(
                other, [event_from_record(late)], markup_pct=MARKUP, now=datetime(2026, 10, 4, tzinfo=UTC)
            ).inserted
            other.commit()

    event.listen(engine, "after_cursor_execute", commit_between)
    try:
        during = _get(client, "/v1/invoices", reader, period=OCTOBER).json()["invoices"]
    finally:
        event.remove(engine, "after_cursor_execute", commit_between)
    assert done
    assert "late-user" not in {i["user_id"] for i in during}
    after = _get(client, "/v1/invoices", reader, period=OCTOBER).json()["invoices"]
    assert "late-user" in {i["user_id"] for i in after}


# -- ledger CSV -----------------------------------------------------------------------------------


def test_ledger_csv(client, reader, alpha, seeded, session_factory):
    response = _get(client, f"/v1/ledger/{OCTOBER}.csv", reader)
    assert response.headers["content-type"].startswith("text/csv")
    with session_factory() as session:
        assert response.text == export.ledger_csv(session, OCTOBER)
    header, *rows = response.text.splitlines()
    assert header.split(",") == list(export.LEDGER_COLUMNS)
    october = [t for t in _transfers(session_factory) if t.period == OCTOBER]
    assert [row.split(",")[0] for row in rows] == [str(t.id) for t in october]

    mine = _get(client, f"/v1/ledger/{OCTOBER}.csv", alpha)
    assert mine.headers["content-type"].startswith("text/csv")
    wallets = _wallets(session_factory, ALPHA)
    my_header, *my_rows = mine.text.splitlines()
    assert my_header == header
    assert my_rows == [r for r in rows if wallets & set(r.split(",")[3:5])] and my_rows
    assert BETA not in mine.text and "provider:" not in mine.text
    assert_problem(client.get("/v1/ledger/2026-1.csv", headers=reader), 422, "invalid_input")
    assert_problem(client.get("/v1/ledger/9999-12.csv", headers=reader), 422, "invalid_input")
    assert client.get("/v1/ledger/9999-11.csv", headers=reader).status_code == 200
    assert _get(client, "/v1/ledger/2020-01.csv", reader).text.splitlines() == [header]


def test_the_ledger_csv_is_streamed_in_chunks_and_equals_the_whole_export(
    client, reader, alpha, seeded, session_factory, monkeypatch
):
    """Three rows a chunk (and a fetch): every chunk boundary falls inside the export; nothing lost, nothing
    repeated, the same bytes as the export read at once; the same for a tenant's share."""
    whole = _get(client, f"/v1/ledger/{OCTOBER}.csv", reader).text
    mine = _get(client, f"/v1/ledger/{OCTOBER}.csv", alpha).text
    assert len(whole.splitlines()) > 10
    monkeypatch.setattr(export, "CHUNK_ROWS", 3)
    with client.stream("GET", f"/v1/ledger/{OCTOBER}.csv", headers=reader) as response:
        assert response.status_code == 200 and "content-length" not in response.headers
        assert response.headers["content-disposition"] == f'attachment; filename="ledger-{OCTOBER}.csv"'
        streamed = response.read().decode()
    assert streamed == whole
    assert _get(client, f"/v1/ledger/{OCTOBER}.csv", alpha).text == mine
    with session_factory() as session:
        chunks = list(export.ledger_csv_chunks(session, OCTOBER))
    assert len(chunks) == -(-(len(whole.splitlines()) - 1) // 3) and "".join(chunks) == whole


def _ledger_scope(secret_header: str) -> dict:
    """An ASGI request for the October ledger, to drive the app as a server does (TestClient reads whole bodies)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/v1/ledger/{OCTOBER}.csv",
        "raw_path": f"/v1/ledger/{OCTOBER}.csv".encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"authorization", secret_header.encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }


def test_a_client_gone_mid_stream_releases_the_exports_connection_at_once(client, reader, seeded, monkeypatch):
    """The client goes away after the first chunk: the export's session (a pooled connection, its transaction and
    cursor) is released when the response ends, not whenever the garbage collector finds the abandoned
    generator (with no collection, never)."""
    monkeypatch.setattr(export, "CHUNK_ROWS", 3)
    engine, sent, raised, checked_out = client.app.state.engine, [], [], []
    scope = _ledger_scope(reader["Authorization"])

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body" and len(sent) > 1:
            raise OSError("connection reset by peer")  # how the server reports a client gone (ASGI 2.4)
        sent.append(message)

    async def call():
        try:
            await client.app(scope, receive, send)
        except Exception as exc:  # ClientDisconnect; kept, as a server keeps (logs) it: its frames stay alive
            raised.append(exc)
        checked_out.append(engine.pool.checkedout())  # before the event loop's shutdown finalizes what is left

    gc.collect()
    gc.disable()
    try:
        anyio.run(call)
        assert sent[0]["status"] == 200 and sent[1]["body"].startswith(b"id,")
        assert raised and checked_out == [0]
    finally:
        gc.enable()


def test_ledger_exports_streamed_at_once_are_bounded_so_they_never_take_every_connection(
    client, reader, seeded, monkeypatch
):
    """Each export holds a pooled connection while its client reads: unbounded, 15 slow downloads (a read token's)
    took the whole pool and every other request waited 30 s, then failed. One more than the limit is a 503
    ``too_many_exports`` at once; when they end, exports are served again."""
    from metering.api.routers.ledger import MAX_LEDGER_STREAMS

    monkeypatch.setattr(export, "CHUNK_ROWS", 3)
    engine, statuses, first_chunks = client.app.state.engine, [], []
    reading = anyio.Event()  # the clients read slowly: each stays after its first chunk until released
    answered = anyio.Event()  # every request has its status
    checked_out = []

    async def slow_client():
        requested = []

        async def receive():
            if not requested:
                requested.append(True)
                return {"type": "http.request", "body": b"", "more_body": False}
            await reading.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
                if len(statuses) == MAX_LEDGER_STREAMS + 1:
                    answered.set()
            elif message["type"] == "http.response.body" and message.get("more_body"):
                first_chunks.append(message["body"])
                await reading.wait()

        await client.app(_ledger_scope(reader["Authorization"]), receive, send)

    async def main():
        async with anyio.create_task_group() as group:
            for _ in range(MAX_LEDGER_STREAMS + 1):
                group.start_soon(slow_client)
            with anyio.fail_after(10):
                await answered.wait()
            checked_out.append(engine.pool.checkedout())
            reading.set()

    anyio.run(main)
    assert sorted(statuses) == [200] * MAX_LEDGER_STREAMS + [503]
    assert checked_out == [MAX_LEDGER_STREAMS]
    assert engine.pool.checkedout() == 0
    assert _get(client, f"/v1/ledger/{OCTOBER}.csv", reader).status_code == 200  # every slot was given back


def test_a_ledger_csv_whose_query_fails_is_a_503_problem_not_a_cut_off_file(client, reader, seeded):
    engine = client.app.state.engine

    def fail_the_export(_conn, _cursor, statement, *_args):
        if "FROM transfers" in statement:
            raise OperationalError(statement, {}, Exception("server closed the connection unexpectedly"))

    event.listen(engine, "before_cursor_execute", fail_the_export)
    try:
        response = client.get(f"/v1/ledger/{OCTOBER}.csv", headers=reader)
    finally:
        event.remove(engine, "before_cursor_execute", fail_the_export)
    assert_problem(response, 503, "database_unavailable")


# -- held events ----------------------------------------------------------------------------------


def test_unpriced_events_are_listed_a_page_at_a_time(client, reader, alpha, seeded, session_factory):
    held = sorted(
        (e for e in stored_events(session_factory) if e.billing_status == "unpriced"),
        key=lambda e: (e.occurred_at, e.event_id),
    )
    assert len(held) > 5
    ids, cursor = [], None
    while True:
        body = _get(client, "/v1/events/unpriced", reader, limit=4, **({"cursor": cursor} if cursor else {})).json()
        ids += [item["event_id"] for item in body["items"]]
        if (cursor := body["next_cursor"]) is None:
            break
    assert ids == [str(e.event_id) for e in held]
    item = _get(client, "/v1/events/unpriced", reader).json()["items"][0]
    assert item["model"] == "mystery-model-1" and item["input_tokens"] == held[0].input_tokens
    mine = _get(client, "/v1/events/unpriced", alpha, limit=1000).json()
    assert [i["event_id"] for i in mine["items"]] == [str(e.event_id) for e in held if e.tenant_id == ALPHA]
    assert mine["next_cursor"] is None and BETA not in str(mine)
    assert_problem(client.get("/v1/events/unpriced", params={"limit": 1001}, headers=reader), 422, "validation_error")
    assert_problem(client.get("/v1/events/unpriced", params={"cursor": "x"}, headers=reader), 422, "invalid_input")


def test_a_walk_of_held_events_sees_new_ones_after_its_cursor_only(client, reader, session_factory):
    """Held events are walked by (occurred_at, event_id): one held during the walk is listed when it sorts after
    the cursor, not when it sorts before; one priced meanwhile is not listed (docs/api.md)."""
    at = datetime(2026, 10, 5, 12, tzinfo=UTC)

    def hold(*minutes: int) -> list[str]:
        records = [record(m, model="mystery-model-1", occurred_at=at + timedelta(minutes=m)) for m in minutes]
        with session_factory() as session:
            ingest(session, [event_from_record(r) for r in records], now=at + timedelta(hours=2))
            session.commit()
        return [str(r["event_id"]) for r in records]

    m10, m20, m30, m40 = hold(10, 20, 30, 40)
    page = _get(client, "/v1/events/unpriced", reader, limit=2).json()
    assert [i["event_id"] for i in page["items"]] == [m10, m20]
    m5, m50, m60 = hold(5, 50, 60)
    with session_factory() as session:  # a price for the calls of minutes 35 to 55: 40 and 50 are priced
        add_override(session, provider="anthropic", model_pattern="mystery-model-1", id="m",
                     effective_from=at + timedelta(minutes=35), effective_to=at + timedelta(minutes=55),
                     input_mtok=Decimal(1), output_mtok=Decimal(2))  # fmt: skip
        session.commit()
    with session_factory() as session:
        assert reprice_held(session, markup_pct=MARKUP, now=at + timedelta(hours=2)).priced == 2
        session.commit()
    rest = _get(client, "/v1/events/unpriced", reader, limit=2, cursor=page["next_cursor"]).json()
    assert [i["event_id"] for i in rest["items"]] == [m30, m60] and rest["next_cursor"] is None
    assert not {m5, m40, m50} & {i["event_id"] for i in rest["items"]}


# -- quotes ---------------------------------------------------------------------------------------


@pytest.fixture
def marked_up(db_url, tmp_path):
    settings = Settings(env="test", database_url=db_url, data_dir=tmp_path, billing=BillingSettings(markup_pct=MARKUP))
    with TestClient(create_app(settings)) as client:
        yield client


def test_quote_equals_the_rate_cards_and_price_usage(marked_up, reader):
    at = datetime(2026, 10, 1, 12, tzinfo=UTC)
    params = {
        "provider": "anthropic",
        "model": "claude-sonnet-4-6",
        "input_tokens": 12000,
        "output_tokens": 3400,
        "cache_read_tokens": 5000,
        "cache_write_tokens": 1000,
        "at": at.isoformat(),
    }
    body = _get(marked_up, "/v1/prices/quote", reader, **params).json()
    book = PriceBook(markup_pct=MARKUP)
    card = RateCards(book).quote("anthropic", "claude-sonnet-4-6", at, 12000, 3400, 5000, 1000, 0, 0)
    exact = price_usage(
        provider="anthropic",
        model="claude-sonnet-4-6",
        occurred_at=at,
        input_tokens=12000,
        output_tokens=3400,
        cache_read_tokens=5000,
        cache_write_tokens=1000,
        book=book,
    )
    assert card is not None and exact is not None
    assert (body["cost_nanos"], body["price_nanos"]) == (card.cost_nanos, card.price_nanos)
    assert (body["cost_nanos"], body["price_nanos"]) == (exact.cost_nanos, exact.price_nanos)
    assert body["price_nanos"] > body["cost_nanos"] > 0
    assert body["price_usd"] == export.usd(card.price_nanos) and body["cost_usd"] == export.usd(card.cost_nanos)
    assert body["markup_pct"] == "20" and body["source"] == "genai-prices"
    assert body["matched_model"] == "claude-sonnet-4-6" and body["source_version"] == card.source_version
    assert datetime.fromisoformat(body["at"]) == at
    now = _get(marked_up, "/v1/prices/quote", reader, provider="anthropic", model="claude-sonnet-4-6", input_tokens=10)
    assert abs(datetime.fromisoformat(now.json()["at"]) - datetime.now(UTC)) < timedelta(minutes=1)


def test_quote_uses_overrides_and_refuses_unknown_models(marked_up, reader, session_factory):
    params = {"provider": "openai_compatible", "model": "local-llama-3", "input_tokens": 1_000_000}
    response = marked_up.get("/v1/prices/quote", params=params, headers=reader)
    body = assert_problem(response, 404, "unpriced_model")
    assert "local-llama-3" in body["detail"]
    with session_factory() as session:
        add_override(
            session,
            provider="openai_compatible",
            model_pattern="local-*",
            effective_from=datetime(2026, 1, 1, tzinfo=UTC),
            effective_to=None,
            input_mtok=Decimal("0.5"),
            output_mtok=Decimal("1.5"),
            id="ovr-local",
        )
        session.commit()
    quote = _get(marked_up, "/v1/prices/quote", reader, **params, output_tokens=2_000_000).json()
    assert quote["source"] == "override" and quote["source_version"] == "ovr-local"
    assert quote["cost_nanos"] == 3_500_000_000 and quote["price_nanos"] == 4_200_000_000
    assert quote["cost_usd"] == "3.500000000" and quote["price_usd"] == "4.200000000"
    before = {**params, "at": "2025-12-31T23:59:59Z"}
    assert_problem(marked_up.get("/v1/prices/quote", params=before, headers=reader), 404, "unpriced_model")


def test_quote_reads_provider_names_case_insensitively_as_ingest_does(marked_up, reader, session_factory):
    """ "Simulated" prices like "simulated": by the real provider's override. The quote only tried the real
    provider's overrides for the lowercase name, so it quoted genai-prices where ingest charged the override."""
    at = datetime(2026, 10, 1, 12, tzinfo=UTC)
    with session_factory() as session:
        add_override(
            session,
            provider="anthropic",
            model_pattern="claude-sonnet-*",
            effective_from=datetime(2026, 1, 1, tzinfo=UTC),
            effective_to=None,
            input_mtok=Decimal("1"),
            output_mtok=Decimal("2"),
            id="ovr-sonnet",
        )
        event = record(0, provider="Simulated", model="claude-sonnet-4-6", occurred_at=at, input_tokens=1000)
        ingest(session, [event_from_record(event)], markup_pct=MARKUP, now=at + timedelta(minutes=1))
        session.commit()
    (charged,) = stored_events(session_factory)
    assert charged.provider == "simulated" and charged.price_source == "override"
    tokens = {
        name: event[name] for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
    }
    for provider in ("simulated", "Simulated", "SIMULATED"):
        params = {"provider": provider, "model": "claude-sonnet-4-6", "at": at.isoformat(), **tokens}
        quote = _get(marked_up, "/v1/prices/quote", reader, **params).json()
        assert (quote["source"], quote["source_version"]) == ("override", "ovr-sonnet"), provider
        assert (quote["cost_nanos"], quote["price_nanos"]) == (charged.cost_nanos, charged.charge_nanos), provider


def test_a_quote_above_the_per_call_limit_is_refused_as_ingest_refuses_the_call(marked_up, reader, session_factory):
    """Ingest rejects an event priced above MAX_CALL_NANOS; the quote said it would be charged that."""
    at = datetime(2026, 10, 1, 12, tzinfo=UTC)
    with session_factory() as session:
        add_override(
            session,
            provider="openai_compatible",
            model_pattern="pricey",
            effective_from=datetime(2026, 1, 1, tzinfo=UTC),
            effective_to=None,
            input_mtok=Decimal("10"),
            output_mtok=Decimal("10"),
            markup_pct=Decimal(0),
            id="ovr-pricey",
        )
        session.commit()
    limit_tokens = MAX_CALL_NANOS // 10_000  # $10/Mtok is 10,000 nanos a token: at the limit exactly
    base = {"provider": "openai_compatible", "model": "pricey", "at": at.isoformat()}
    quote = _get(marked_up, "/v1/prices/quote", reader, **base, input_tokens=limit_tokens).json()
    assert quote["price_nanos"] == quote["cost_nanos"] == MAX_CALL_NANOS
    over = {**base, "input_tokens": limit_tokens, "output_tokens": 1}
    body = assert_problem(marked_up.get("/v1/prices/quote", params=over, headers=reader), 422, "invalid_input")
    assert "ingest rejects a call priced at $10,000.00001 for one call" in body["detail"]
    with session_factory() as session:
        event = record(0, provider="openai_compatible", model="pricey", occurred_at=at, input_tokens=limit_tokens)
        event.update(output_tokens=1, cache_read_tokens=0, reasoning_tokens=0)
        result = ingest(session, [event_from_record(event)], markup_pct=MARKUP, now=at + timedelta(minutes=1))
    assert result.inserted == 0 and "above the limit" in result.rejected[0].reason


def test_quote_validation(marked_up, reader):
    base = {"provider": "anthropic", "model": "claude-sonnet-4-6"}
    too_much_cache = {**base, "input_tokens": 10, "cache_read_tokens": 8, "cache_write_tokens": 3}
    body = assert_problem(
        marked_up.get("/v1/prices/quote", params=too_much_cache, headers=reader), 422, "invalid_input"
    )
    assert "within input_tokens" in body["detail"]
    for params in ({**base, "input_tokens": -1}, {"model": "claude-sonnet-4-6"}, {**base, "at": "soon"}):
        assert_problem(marked_up.get("/v1/prices/quote", params=params, headers=reader), 422, "validation_error")
    for params in ({**base, "provider": ""}, {**base, "model": ""}):  # was 404 "calls to it are held": none can be
        body = assert_problem(marked_up.get("/v1/prices/quote", params=params, headers=reader), 422, "validation_error")
        assert "at least 1 character" in body["detail"]
    for at in ("1764270000", "1764270000000", "0", "-1.5"):  # read as Unix seconds (or ms) before: priced then
        params = {**base, "input_tokens": 5, "at": at}
        body = assert_problem(marked_up.get("/v1/prices/quote", params=params, headers=reader), 422, "validation_error")
        assert "not a number" in body["detail"]


@pytest.mark.parametrize(("markup", "shown"), [("1e1", "10"), ("0.0000001", "0.0000001"), ("-0.5", "-0.5")])
def test_the_quoted_markup_is_a_plain_decimal(db_url, tmp_path, make_token, markup, shown):
    """A markup Decimal writes with an exponent ("1E+1" from METERING_BILLING__MARKUP_PCT=1e1, "1E-7" from 0.0000001):
    the quote's markup_pct is plain decimal text, as every other decimal the API answers."""
    billing = BillingSettings(markup_pct=Decimal(markup))
    settings = Settings(env="test", database_url=db_url, data_dir=tmp_path, billing=billing)
    params = {"provider": "anthropic", "model": "claude-sonnet-4-6", "input_tokens": 1000}
    with TestClient(create_app(settings)) as client:
        body = _get(client, "/v1/prices/quote", bearer(make_token(Scope.READ)), **params).json()
    assert body["markup_pct"] == shown


# -- every endpoint: scopes and tenant isolation --------------------------------------------------

READS = [
    ("/v1/usage", {"from": "2026-09-29T00:00:00Z", "to": "2026-10-04T00:00:00Z"}),
    ("/v1/transfers", {}),
    ("/v1/balances", {}),
    ("/v1/invoices", {}),
    (f"/v1/invoices/{ALPHA}/user-1/{OCTOBER}", {}),
    (f"/v1/invoices/{ALPHA}/user-1/{OCTOBER}.csv", {}),
    (f"/v1/ledger/{OCTOBER}.csv", {}),
    ("/v1/events/unpriced", {}),
    ("/v1/prices/quote", {"provider": "anthropic", "model": "claude-sonnet-4-6", "input_tokens": 5}),
]


@pytest.mark.parametrize(("path", "params"), READS)
def test_every_read_needs_a_token_with_the_read_scope(client, make_token, path, params):
    assert_problem(client.get(path, params=params), 401, "unauthenticated")
    assert_problem(client.get(path, params=params, headers=bearer("mtr_not-a-real-token")), 401, "unauthenticated")
    for scopes in ((Scope.INGEST,), (Scope.ADMIN,)):
        response = client.get(path, params=params, headers=bearer(make_token(*scopes, tenant=ALPHA)))
        assert "'read' scope" in assert_problem(response, 403, "forbidden")["detail"]


def test_a_tenant_bound_token_never_reads_another_tenant(client, alpha, seeded, session_factory):
    """Every read endpoint, with every way of naming the other tenant: its data never appears."""
    _finalize_september(session_factory)
    window = {"from": "2026-09-29T00:00:00Z", "to": "2026-10-04T00:00:00Z"}
    beta_event = next(e for e in stored_events(session_factory) if e.tenant_id == BETA and e.charge_nanos)
    allowed = [
        ("/v1/usage", window),
        ("/v1/usage", window | {"group_by": "tenant,user,extension,function,purpose,provider,model,byollm,status,day"}),
        ("/v1/usage", window | {"user_id": "user-1"}),
        ("/v1/transfers", {"limit": 1000}),
        ("/v1/transfers", {"account_id": f"user:{BETA}:user-1"}),
        ("/v1/transfers", {"event_id": str(beta_event.event_id)}),
        ("/v1/transfers", {"kind": "credit"}),
        ("/v1/balances", {}),
        ("/v1/invoices", {}),
        ("/v1/invoices", {"period": SEPTEMBER}),
        (f"/v1/ledger/{SEPTEMBER}.csv", {}),
        (f"/v1/ledger/{OCTOBER}.csv", {}),
        ("/v1/events/unpriced", {"limit": 1000}),
    ]
    for path, params in allowed:
        response = _get(client, path, alpha, **params)
        assert BETA not in response.text, (path, params)
    forbidden = [
        ("/v1/usage", window | {"tenant_id": BETA}),
        ("/v1/balances", {"tenant_id": BETA}),
        ("/v1/invoices", {"tenant_id": BETA}),
    ]
    for path, params in forbidden:
        assert_problem(client.get(path, params=params, headers=alpha), 403, "forbidden")
    for period in (SEPTEMBER, OCTOBER):
        for suffix in ("", ".csv"):
            response = client.get(f"/v1/invoices/{BETA}/user-1/{period}{suffix}", headers=alpha)
            assert_problem(response, 404, "not_found")


def test_the_openapi_document_describes_the_read_side(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    models = {
        "/v1/usage": "UsageResponse",
        "/v1/transfers": "TransferPage",
        "/v1/balances": "Balances",
        "/v1/invoices": "Invoices",
        "/v1/invoices/{tenant_id}/{user_id}/{period}": "InvoiceDetail",
        "/v1/events/unpriced": "UnpricedPage",
        "/v1/prices/quote": "QuoteOut",
    }
    for path, model in models.items():
        operation = paths[path]["get"]
        assert operation["security"] == [{"ApiToken": []}], path
        schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{model}"}, path
        for status in ("401", "403", "422"):
            assert list(operation["responses"][status]["content"]) == ["application/problem+json"], (path, status)
    for path in ("/v1/invoices/{tenant_id}/{user_id}/{period}.csv", "/v1/ledger/{period}.csv"):
        assert "text/csv" in paths[path]["get"]["responses"]["200"]["content"], path
    assert "404" in paths["/v1/prices/quote"]["get"]["responses"]
    usage = {p["name"] for p in paths["/v1/usage"]["get"]["parameters"]}
    assert {"from", "to", "group_by", "tenant_id", "byollm", "status"} <= usage
    assert doc["components"]["schemas"]["UsageResponse"]["properties"]["from"]["format"] == "date-time"


def test_csv_file_names_never_carry_raw_ids(client, reader, session_factory):
    tenant = 'acme "ü" co'
    with session_factory() as session:
        ingest(session, [event_from_record(record(0, tenant_id=tenant, occurred_at=T0))], markup_pct=MARKUP, now=T0)
        session.commit()
    response = _get(client, f"/v1/invoices/{tenant}/user-1/{SEPTEMBER}.csv", reader)
    assert response.headers["content-disposition"] == 'attachment; filename="invoice-acme_____co-user-1-2026-09.csv"'
    assert '"acme ""ü"" co"' in response.text  # CSV quoting
