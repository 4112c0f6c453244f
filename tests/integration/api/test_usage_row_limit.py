"""GET /v1/usage answers at most ``METERING_API__MAX_USAGE_ROWS`` rows: a query that would answer more is a `422`
`too_many_rows` telling the client to narrow it, and the database stops at one row past the limit (a LIMIT in the SQL),
so the service never holds more. It had no limit: `group_by=hour,user,model` over years built a response of any size
in memory. Answers within the limit are unchanged. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from metering.api.app import create_app
from metering.auth import Scope
from metering.billing.usage_queries import usage
from metering.config import ApiSettings, Settings
from metering.errors import TooManyRowsError
from tests.integration.api.conftest import app_settings, assert_problem, bearer
from tests.integration.api.read_data import T0, seed

START = T0.replace(hour=0)
END = START + timedelta(days=5)
WINDOW = {"from": START.isoformat(), "to": END.isoformat()}
LIMIT = 4  # the seeded events fall on 4 UTC days and in 55 hours


@pytest.fixture
def events(session_factory):
    seed(session_factory)


def _get(client, headers, **params):
    return client.get("/v1/usage", params={**WINDOW, **params}, headers=headers)


def test_a_query_answering_more_rows_than_the_limit_is_a_422_asking_to_narrow_it(
    client, db_url, tmp_path, make_token, events
):
    reader = bearer(make_token(Scope.READ))
    queries = [
        {"group_by": "day"},  # 4 rows: daily rollups for whole days, hourly ones for the edges (a UNION)
        {"group_by": "hour"},  # 55 rows: the hourly rollup alone
        {"group_by": "tenant,user,day"},  # per-user daily and hourly rollups
        {"group_by": "hour,user,model", "tenant_id": "tenant-beta"},  # per-user hourly rollups
        {"group_by": "day", "from": (START + timedelta(hours=22)).isoformat()},  # from the edge hours
        {},
    ]
    unbounded = [_get(client, reader, **params) for params in queries]
    assert all(response.status_code == 200 for response in unbounded), [r.text for r in unbounded]
    counts = [len(response.json()["rows"]) for response in unbounded]
    assert counts[0] == LIMIT and counts[1] > LIMIT and counts[2] > LIMIT and counts[3] > LIMIT and counts[-1] == 1
    with TestClient(create_app(app_settings(db_url, tmp_path, max_usage_rows=LIMIT))) as bounded:
        for params, before, count in zip(queries, unbounded, counts, strict=True):
            response = _get(bounded, reader, **params)
            if count <= LIMIT:  # the same answer, byte for byte
                assert response.status_code == 200 and response.content == before.content, params
                continue
            body = assert_problem(response, 422, "too_many_rows")
            assert f"more than {LIMIT} rows" in body["detail"], body
            assert "narrow the window" in body["detail"] and "group_by" in body["detail"], body


def test_the_database_stops_one_row_past_the_limit(session_factory, engine, events):
    """The limit is the query's LIMIT (rows past it are never fetched), not a count of rows already loaded."""
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with session_factory() as session:
            for group_by in (["hour"], ["day"], ["tenant", "user", "hour"]):
                statements.clear()
                with pytest.raises(TooManyRowsError):
                    usage(session, START, END, group_by, max_rows=LIMIT if group_by != ["day"] else LIMIT - 1)
                [(sql, parameters)] = statements
                assert "LIMIT" in sql.upper(), sql
                values = parameters.values() if isinstance(parameters, dict) else parameters
                assert (LIMIT + 1 if group_by != ["day"] else LIMIT) in list(values), (sql, parameters)
            assert len(usage(session, START, END, ["day"], max_rows=LIMIT)) == LIMIT
    finally:
        event.remove(engine, "before_cursor_execute", capture)


def test_the_limit_is_a_setting_with_a_sane_default():
    assert Settings(env="test").api.max_usage_rows == 50_000
    assert ApiSettings(max_usage_rows=1).max_usage_rows == 1
    for wrong in (0, -1, 1_000_001):
        with pytest.raises(ValueError, match="max_usage_rows"):
            ApiSettings(max_usage_rows=wrong)
