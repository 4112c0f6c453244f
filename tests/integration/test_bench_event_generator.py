"""bench/usage_query.py generates its events in SQL, one INSERT over ``store.EVENT_COLUMNS``: it must name a value
for every column, in order. (Migration 0011's two columns made it fail: "INSERT has more target columns than
expressions".) PostgreSQL only, as the benchmark."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text

from bench.usage_query import generate_sql


def test_the_usage_query_benchmarks_events_insert_into_usage_events(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("the benchmark's SQL is PostgreSQL's")
    start = datetime(2026, 11, 1, tzinfo=UTC)
    sql = generate_sql(10, start, 3600.0, start)
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT setseed(0.5)")
        conn.connection.driver_connection.execute(sql, {"lo": 0, "hi": 10})  # type: ignore[union-attr]
        calls, hours, searches, over = conn.execute(
            text(
                "SELECT count(*), sum(cache_write_1h_tokens), sum(web_searches), "
                "count(*) FILTER (WHERE cache_read_tokens + cache_write_tokens > input_tokens) FROM usage_events"
            )
        ).one()
    assert (calls, hours, searches, over) == (16, 0, 0, 0)  # 8 calls per 5 invocations
