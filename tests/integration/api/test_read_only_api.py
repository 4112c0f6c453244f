"""A database that refuses writes (a PostgreSQL primary demoted to a standby in a failover, a database made read-only
for maintenance; a SQLite file opened read-only): reads keep answering, writes are `503 database_unavailable`.

A token's `last_used_at` is written on a request when it is due: that write failed, so every read of a token whose
touch was due answered 503 although it needs no write."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from metering.api.app import create_app
from metering.auth import Scope, create_token
from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory
from metering.db.models import ApiTokenRow
from tests.conftest import BACKENDS, temporary_pg_database
from tests.fakes.events import mixed_records
from tests.integration.api.admin_helpers import offline_settings
from tests.integration.api.conftest import assert_problem, bearer

WINDOW = {"from": "2026-09-01T00:00:00Z", "to": "2026-10-01T00:00:00Z"}


@dataclass(frozen=True)
class ReadOnly:
    writable_url: str  # the same database, for the test's own checks (PostgreSQL: it is read-only for every session)
    read_only_url: str  # the service's
    tokens: dict[Scope, str]


def _tokens(url: str) -> dict[Scope, str]:
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            tokens = {scope: create_token(session, scope.value, [scope])[1] for scope in Scope}
            session.commit()
    finally:
        engine.dispose()
    return tokens


@pytest.fixture(params=BACKENDS)
def read_only(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReadOnly]:
    if request.param == "sqlite":
        path = tmp_path / "metering.db"
        url = f"sqlite:///{path}"
        migrate.upgrade(url)
        yield ReadOnly(url, f"sqlite:///file:{path}?mode=ro&uri=true", _tokens(url))
        return
    with temporary_pg_database() as url:
        migrate.upgrade(url)
        tokens = _tokens(url)
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{make_url(url).database}" SET default_transaction_read_only = on'))
                conn.commit()
        finally:
            engine.dispose()
        yield ReadOnly(url, url, tokens)


def _last_used(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(select(ApiTokenRow.last_used_at)))
    finally:
        engine.dispose()


def test_reads_keep_answering_on_a_read_only_database_and_writes_are_503(
    read_only: ReadOnly, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader, admin = bearer(read_only.tokens[Scope.READ]), bearer(read_only.tokens[Scope.ADMIN])
    ingest = bearer(read_only.tokens[Scope.INGEST])
    app = create_app(offline_settings(read_only.read_only_url, tmp_path))
    with TestClient(app) as client, caplog.at_level(logging.WARNING):
        for _ in range(3):  # each time the touch is due (never written)
            usage = client.get("/v1/usage", params=WINDOW, headers=reader)
            assert usage.status_code == 200, usage.text
            assert client.get("/v1/balances", headers=reader).status_code == 200
            assert client.get("/v1/transfers", headers=reader).status_code == 200
            assert client.get("/v1/audit", headers=admin).status_code == 200
        reads = ["/v1/invoices", "/v1/ledger/2026-09.csv", "/v1/events/unpriced"]
        admin_reads = ["/v1/admin/purposes", "/v1/admin/budgets", "/v1/admin/price-overrides"]
        answered = {path: client.get(path, headers=reader).status_code for path in reads}
        answered |= {path: client.get(path, headers=admin).status_code for path in admin_reads}
        assert answered == {path: 200 for path in reads + admin_reads}
        batch = orjson.dumps({"events": mixed_records(2)})
        written = client.post("/v1/events", content=batch, headers={**ingest, "Content-Type": "application/json"})
        assert_problem(written, 503, "database_unavailable")
        credit = {"tenant_id": "acme", "user_id": "alice", "amount": "1.00"}
        refused = client.post("/v1/admin/credits", json=credit, headers={**admin, "Idempotency-Key": "k1"})
        assert_problem(refused, 503, "database_unavailable")
    assert _last_used(read_only.writable_url) == [None, None, None]  # skipped, not half-written
    skipped = [r for r in caplog.records if "last_used_at" in r.getMessage()]
    assert len(skipped) == 1, [r.getMessage() for r in skipped]  # said once, not on every request
