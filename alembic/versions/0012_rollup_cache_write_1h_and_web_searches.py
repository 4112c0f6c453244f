"""rollups count 1-hour cache writes and web searches

0011 stored both on each event and billed them, but the rollups (hourly, platform hourly and daily, user daily)
kept only the four token kinds and the money: usage queries and ``/metrics`` could not say how many searches an
extension ran or how many cache writes were 1-hour ones. Each rollup gains ``cache_write_1h_tokens`` (part of
``cache_write_tokens``) and ``web_searches``, filled from the stored events so ``metering billing check`` holds
from the start. On PostgreSQL the two covering indexes are rebuilt to include them (index-only scans).

The downgrade drops them (the events still hold both).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-28 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NEW = ("cache_write_1h_tokens", "web_searches")
_DIMENSIONS = ("extension_id", "function", "purpose", "provider", "model", "is_byollm", "status")
_COUNTERS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "billed_nanos",
    "shadow_nanos",
    "cost_nanos",
    "latency_us_sum",
    "error_count",
    "unpriced_count",
)
# (table, its time column, its other key columns)
_ROLLUPS = (
    ("usage_rollups", "hour", ("tenant_id", "user_id", *_DIMENSIONS)),
    ("platform_usage_hourly", "hour", _DIMENSIONS),
    ("platform_usage_daily", "day", _DIMENSIONS),
    ("user_usage_daily", "day", ("tenant_id", "user_id")),
)


def _covering_indexes(counters: Sequence[str]) -> None:
    """PostgreSQL: (re)create the two covering indexes of 0005 including ``counters``."""
    op.drop_index("ix_usage_rollups_tenant_hour", table_name="usage_rollups")
    op.create_index(
        "ix_usage_rollups_tenant_hour",
        "usage_rollups",
        ["tenant_id", "hour"],
        postgresql_include=["user_id", *counters],
    )
    op.drop_index("ix_platform_usage_hourly_extension_hour", table_name="platform_usage_hourly")
    op.create_index(
        "ix_platform_usage_hourly_extension_hour",
        "platform_usage_hourly",
        ["extension_id", "hour"],
        postgresql_include=list(counters),
    )


def backfill_statements(postgresql: bool) -> list[str]:
    """Each rollup row's two new counters summed from its events (only events with either: the rest add 0)."""
    if postgresql:
        times = {
            "hour": "date_trunc('hour', occurred_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
            "day": "CAST(occurred_at AT TIME ZONE 'UTC' AS DATE)",
        }
        same_time, key = "{table}.{column} = s.t", "{table}.{k}"
    else:  # SQLite keeps moments as text: compare the hour or the date as text
        times = {"hour": "strftime('%Y-%m-%d %H:00:00', occurred_at)", "day": "substr(occurred_at, 1, 10)"}
        same_time = "substr({table}.{column}, 1, {chars}) = s.t"
        # '+': no index of the rollup table for its key columns (the time, under substr, can use none), so SQLite
        # reads the table once and finds each row's sums in an index of s; else, for each group of s, it read every
        # rollup row of the group's tenant (or extension) through their index: a tenant's year, times its groups
        key = "+{table}.{k}"
    statements = []
    for table, column, keys in _ROLLUPS:
        expression = times[column]
        matches = " AND ".join(f"{key.format(table=table, k=k)} = s.{k}" for k in keys)
        time_match = same_time.format(table=table, column=column, chars=19 if column == "hour" else 10)
        statements.append(
            f"UPDATE {table} SET cache_write_1h_tokens = s.a, web_searches = s.w FROM ("
            f"SELECT {expression} AS t, {', '.join(keys)}, sum(cache_write_1h_tokens) AS a, sum(web_searches) AS w "
            "FROM usage_events WHERE cache_write_1h_tokens > 0 OR web_searches > 0 "
            f"GROUP BY {expression}, {', '.join(keys)}) AS s WHERE {time_match} AND {matches}"
        )
    return statements


def upgrade() -> None:
    for table, _column, _keys in _ROLLUPS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name in _NEW:
                batch_op.add_column(sa.Column(name, sa.BigInteger(), server_default="0", nullable=False))
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in backfill_statements(postgresql):
        op.execute(statement)
    if postgresql:
        _covering_indexes((*_COUNTERS, *_NEW))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _covering_indexes(_COUNTERS)
    for table, _column, _keys in reversed(_ROLLUPS):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name in reversed(_NEW):
                batch_op.drop_column(name)
