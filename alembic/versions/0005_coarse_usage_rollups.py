"""coarse usage rollups: usage_rollups summed over tenants and users (per hour and per UTC day), and per UTC day,
tenant and user; usage indexes

Platform-wide usage queries (no tenant or user in the filters or groups) read the platform rollups instead of the
per-user hourly rollups: ~1/20 and ~1/500 of the rows; queries by tenant, user and day only read
user_usage_daily. Ingest writes them in the same transaction; the upgrade fills them from the existing
usage_rollups, so they agree from the start (``metering billing check`` proves it).
Also: platform hours by extension (an extension's usage per hour), and on PostgreSQL both that index and
``ix_usage_rollups_tenant_hour`` covering (index-only scans of an extension's or a tenant's window).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 17:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

import metering.db.types
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

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


def _columns(time_column: sa.Column) -> list[sa.Column]:
    dimensions = [
        sa.Column(name, sa.String(length=20 if name == "status" else 200), nullable=False)
        for name in _DIMENSIONS
        if name != "is_byollm"
    ]
    dimensions.insert(5, sa.Column("is_byollm", sa.Boolean(), nullable=False))
    return [time_column, *dimensions, *(sa.Column(name, sa.BigInteger(), nullable=False) for name in _COUNTERS)]


def upgrade() -> None:
    for table, time_column in (
        ("platform_usage_hourly", sa.Column("hour", metering.db.types.UTCDateTime(timezone=True), nullable=False)),
        ("platform_usage_daily", sa.Column("day", sa.Date(), nullable=False)),
    ):
        op.create_table(
            table,
            *_columns(time_column),
            sa.PrimaryKeyConstraint(time_column.name, *_DIMENSIONS, name=op.f(f"pk_{table}")),
        )
    op.create_table(
        "user_usage_daily",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("tenant_id", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in _COUNTERS),
        sa.PrimaryKeyConstraint("day", "tenant_id", "user_id", name=op.f("pk_user_usage_daily")),
    )
    op.create_index("ix_user_usage_daily_tenant_day", "user_usage_daily", ["tenant_id", "day"])
    op.create_index(
        "ix_platform_usage_hourly_extension_hour",
        "platform_usage_hourly",
        ["extension_id", "hour"],
        postgresql_include=list(_COUNTERS),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:  # a tenant's usage over a window as an index-only scan
        op.drop_index("ix_usage_rollups_tenant_hour", table_name="usage_rollups")
        op.create_index(
            "ix_usage_rollups_tenant_hour",
            "usage_rollups",
            ["tenant_id", "hour"],
            postgresql_include=["user_id", *_COUNTERS],
        )
    day = "CAST(timezone('UTC', hour) AS DATE)" if postgresql else "substr(hour, 1, 10)"
    dimensions, counters = ", ".join(_DIMENSIONS), ", ".join(_COUNTERS)
    sums = ", ".join(f"sum({c})" for c in _COUNTERS)
    backfills = (
        ("platform_usage_hourly", "hour", "hour", dimensions),
        ("platform_usage_daily", "day", day, dimensions),
        ("user_usage_daily", "day", day, "tenant_id, user_id"),
    )
    for table, time_column, expression, keys in backfills:
        op.execute(
            f"INSERT INTO {table} ({time_column}, {keys}, {counters}) "
            f"SELECT {expression}, {keys}, {sums} FROM usage_rollups GROUP BY {expression}, {keys}"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_usage_rollups_tenant_hour", table_name="usage_rollups")
        op.create_index("ix_usage_rollups_tenant_hour", "usage_rollups", ["tenant_id", "hour"])
    op.drop_table("user_usage_daily")
    op.drop_table("platform_usage_daily")
    op.drop_table("platform_usage_hourly")
