"""The table a migration's statement waited for, as its lock_timeout error names it."""

from __future__ import annotations

import pytest

from metering.db.migration_locks import lock_timeout_sql, table_of


@pytest.mark.parametrize(
    ("statement", "table"),
    [
        ("ALTER TABLE user_usage_daily ADD COLUMN web_searches BIGINT", "user_usage_daily"),
        ('ALTER TABLE ONLY "usage_events" ADD CONSTRAINT x', "usage_events"),
        ("CREATE INDEX ix_a ON usage_rollups (tenant_id)", "usage_rollups"),
        ("DROP TABLE IF EXISTS public.api_tokens", "public.api_tokens"),
        ("UPDATE usage_events SET x = 1", "usage_events"),
        ("INSERT INTO accounts (id) VALUES (1)", "accounts"),
        ("SELECT 1", None),
        (None, None),
    ],
)
def test_the_table_a_statement_names_first(statement: str | None, table: str | None) -> None:
    assert table_of(statement) == table


def test_the_timeout_is_set_in_whole_milliseconds_and_0_waits_as_long_as_it_takes() -> None:
    assert lock_timeout_sql(5) == "SET LOCAL lock_timeout = 5000"
    assert lock_timeout_sql(0.2) == "SET LOCAL lock_timeout = 200"
    assert lock_timeout_sql(0) == "SET LOCAL lock_timeout = 0"
