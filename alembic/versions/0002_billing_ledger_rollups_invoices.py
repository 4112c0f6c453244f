"""billing: price overrides, ledger (accounts, transfers), rollups, invoices; billing state on events

Events stored before this revision get the billing state ingest gives an event without a price (Policy A: a
BYOLLM call is excluded with its shadow cost unknown, a failed call without usage is not billable, any other is
held 'unpriced'), and hourly rollups counting them, so usage and `metering billing check` agree with the raw
events at once; `metering billing reprice` then prices the held ones and fills in the BYOLLM shadow costs.

On PostgreSQL the upgrade refuses, naming them, and changes nothing, while an event's seven names are too wide
together to key a rollup row (0001 stored such events; ingest rejects them since).

The downgrade refuses, and changes nothing, while the ledger holds a transfer, an invoice or a price override.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 13:53:22.320595
"""

from collections.abc import Sequence

import sqlalchemy as sa

import metering.db.types
from alembic import context, op
from metering.db.migration_script import refuse_while_held

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(length=300), nullable=False),
        sa.Column("kind", sa.String(length=30), nullable=False),
        sa.Column("tenant_id", sa.String(length=200), nullable=True),
        sa.Column("user_id", sa.String(length=200), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("balance_nanos", sa.BigInteger(), nullable=False),
        sa.Column("created_at", metering.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
    )
    op.create_table(
        "invoice_lines",
        sa.Column("invoice_id", sa.Uuid(), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("extension_id", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("is_late", sa.Boolean(), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("billed_nanos", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("invoice_id", "line_no", name=op.f("pk_invoice_lines")),
    )
    op.create_table(
        "invoices",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("total_nanos", sa.BigInteger(), nullable=False),
        sa.Column("rounded_nanos", sa.BigInteger(), nullable=False),
        sa.Column("residue_nanos", sa.BigInteger(), nullable=False),
        sa.Column("finalized_at", metering.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        sa.UniqueConstraint("tenant_id", "user_id", "period", name="uq_invoices_user_period"),
    )
    op.create_table(
        "price_overrides",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=50), nullable=False),
        sa.Column("model_pattern", sa.String(length=200), nullable=False),
        sa.Column("effective_from", metering.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("effective_to", metering.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("input_nanos_per_mtok", sa.BigInteger(), nullable=False),
        sa.Column("output_nanos_per_mtok", sa.BigInteger(), nullable=False),
        sa.Column("cache_read_nanos_per_mtok", sa.BigInteger(), nullable=True),
        sa.Column("cache_write_nanos_per_mtok", sa.BigInteger(), nullable=True),
        sa.Column("markup_pct", sa.String(length=32), nullable=True),
        sa.Column("note", sa.String(length=500), nullable=True),
        sa.Column("created_at", metering.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_price_overrides")),
    )
    op.create_table(
        "transfers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("debit_account_id", sa.String(length=300), nullable=False),
        sa.Column("credit_account_id", sa.String(length=300), nullable=False),
        sa.Column("amount_nanos", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("kind", sa.String(length=30), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=True),
        sa.Column("reverses_id", sa.Uuid(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("period", sa.String(length=7), nullable=True),
        sa.Column("memo", sa.String(length=500), nullable=True),
        sa.Column("created_at", metering.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount_nanos > 0", name=op.f("ck_transfers_amount_positive")),
        sa.CheckConstraint("debit_account_id <> credit_account_id", name=op.f("ck_transfers_two_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transfers")),
    )
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.create_index("ix_transfers_created", ["created_at", "id"], unique=False)
        batch_op.create_index(
            "uq_transfers_idempotency_key",
            ["idempotency_key"],
            unique=True,
            postgresql_where=sa.text("idempotency_key IS NOT NULL"),
            sqlite_where=sa.text("idempotency_key IS NOT NULL"),
        )
        batch_op.create_index("ix_transfers_event", ["event_id"], unique=False)

    op.create_table(
        "usage_rollups",
        sa.Column("hour", metering.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("extension_id", sa.String(length=200), nullable=False),
        sa.Column("function", sa.String(length=200), nullable=False),
        sa.Column("purpose", sa.String(length=200), nullable=False),
        sa.Column("provider", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("is_byollm", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_read_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("billed_nanos", sa.BigInteger(), nullable=False),
        sa.Column("shadow_nanos", sa.BigInteger(), nullable=False),
        sa.Column("cost_nanos", sa.BigInteger(), nullable=False),
        sa.Column("latency_us_sum", sa.BigInteger(), nullable=False),
        sa.Column("error_count", sa.BigInteger(), nullable=False),
        sa.Column("unpriced_count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "hour",
            "tenant_id",
            "user_id",
            "extension_id",
            "function",
            "purpose",
            "provider",
            "model",
            "is_byollm",
            "status",
            name=op.f("pk_usage_rollups"),
        ),
    )
    with op.batch_alter_table("usage_rollups", schema=None) as batch_op:
        batch_op.create_index("ix_usage_rollups_tenant_hour", ["tenant_id", "hour"], unique=False)

    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ingest_batch", sa.Uuid(), nullable=True))
        batch_op.add_column(
            sa.Column("billing_status", sa.String(length=20), server_default="unpriced", nullable=False)
        )
        batch_op.add_column(sa.Column("charge_nanos", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("cost_nanos", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("shadow_nanos", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("markup_pct", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("price_source", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("price_version", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("invoice_period", sa.String(length=7), nullable=True))
        batch_op.add_column(sa.Column("is_late", sa.Boolean(), server_default=sa.false(), nullable=False))
    _bill_stored_events()


_KEYS = "tenant_id, user_id, extension_id, function, purpose, provider, model, is_byollm, status"


def _bill_stored_events() -> None:
    """The events already stored: Policy A without a price, and their hourly rollups (as ingest would)."""
    op.execute(
        "UPDATE usage_events SET billing_status = CASE WHEN is_byollm THEN 'excluded_byollm' "
        "WHEN status IN ('error', 'cancelled') AND (usage_completeness = 'missing' "
        "OR input_tokens + output_tokens = 0) THEN 'not_billable' ELSE 'unpriced' END"
    )
    if op.get_bind().dialect.name == "postgresql":
        hour = "date_trunc('hour', occurred_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
        latency = "CAST(floor(latency_ms * 1000 + 0.5) AS BIGINT)"
    else:  # moments are stored as naive UTC text, 'YYYY-MM-DD HH:MM:SS.ffffff'
        hour = "strftime('%Y-%m-%d %H:00:00.000000', occurred_at)"
        latency = "CAST(latency_ms * 1000 + 0.5 AS INTEGER)"
    rollups = (
        f"INSERT INTO usage_rollups (hour, {_KEYS}, calls, input_tokens, output_tokens, cache_read_tokens, "
        "cache_write_tokens, reasoning_tokens, billed_nanos, shadow_nanos, cost_nanos, latency_us_sum, error_count, "
        f"unpriced_count) SELECT {hour}, {_KEYS}, count(*), sum(input_tokens), sum(output_tokens), "
        f"sum(cache_read_tokens), sum(cache_write_tokens), sum(reasoning_tokens), 0, 0, 0, sum({latency}), "
        "sum(CASE WHEN status = 'error' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN billing_status = 'unpriced' THEN 1 ELSE 0 END) "
        f"FROM usage_events GROUP BY {hour}, {_KEYS}"
    )
    if op.get_bind().dialect.name != "postgresql" or context.is_offline_mode():  # --sql: a script, nothing runs
        op.execute(rollups)
        return
    # The same statement; only its failure over names PostgreSQL cannot index is reported better (it was the bare
    # 'index row size … exceeds btree version 4 maximum 2704'): what succeeded before does the same.
    bind = op.get_bind()
    try:
        with bind.begin_nested():
            bind.execute(sa.text(rollups))
    except sa.exc.OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != "54000":  # program_limit_exceeded
            raise
        _refuse_wide_names(bind, exc)


_NAMES = "tenant_id, user_id, extension_id, function, purpose, provider, model"
_NAME_BYTES = " + ".join(f"octet_length({name})" for name in _NAMES.split(", "))
_MAX_NAME_BYTES = 2600  # metering.billing.rollup.MAX_NAME_BYTES: what ingest accepts since (room for the key's rest)


def _refuse_wide_names(bind: sa.Connection, exc: Exception) -> None:
    count, widest = bind.execute(
        sa.text(f"SELECT count(*), max({_NAME_BYTES}) FROM usage_events WHERE {_NAME_BYTES} > {_MAX_NAME_BYTES}")
    ).one()
    if not count:
        raise exc
    first = [str(row[0]) for row in bind.execute(sa.text(
        f"SELECT event_id FROM usage_events WHERE {_NAME_BYTES} > {_MAX_NAME_BYTES} ORDER BY event_id LIMIT 3"
    ))]  # fmt: skip
    raise RuntimeError(
        f"cannot upgrade to 0002: {count} stored events have names ({_NAMES}) taking up to {widest} bytes together "
        f"in UTF-8, more than PostgreSQL can index as a rollup's key ({_MAX_NAME_BYTES}; first: {first!r}); "
        "shorten or delete them, then upgrade again; nothing was changed"
    ) from exc


def downgrade() -> None:
    # Below 0002 there is no ledger: the upgrade would hold the events as unpriced again, but could not restore a
    # credit, a charge, a balance, an invoice or a price override. Refused while any exists.
    ledger = ("transfers", "invoices", "price_overrides")
    refuse_while_held("0002", "the ledger", ledger, "which dropping it would lose for good")
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.drop_column("is_late")
        batch_op.drop_column("invoice_period")
        batch_op.drop_column("price_version")
        batch_op.drop_column("price_source")
        batch_op.drop_column("markup_pct")
        batch_op.drop_column("shadow_nanos")
        batch_op.drop_column("cost_nanos")
        batch_op.drop_column("charge_nanos")
        batch_op.drop_column("billing_status")
        batch_op.drop_column("ingest_batch")

    with op.batch_alter_table("usage_rollups", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_rollups_tenant_hour")

    op.drop_table("usage_rollups")
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.drop_index("ix_transfers_event")
        batch_op.drop_index("uq_transfers_idempotency_key")
        batch_op.drop_index("ix_transfers_created")

    op.drop_table("transfers")
    op.drop_table("price_overrides")
    op.drop_table("invoices")
    op.drop_table("invoice_lines")
    op.drop_table("accounts")
