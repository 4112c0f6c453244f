"""audit log: every admin change through the API (who, what, before and after with secrets redacted)

Written in the transaction of the change itself, so a change that fails leaves no entry.

The downgrade refuses, and changes nothing, while the log holds an entry.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 14:39:14.430281
"""

from collections.abc import Sequence

import sqlalchemy as sa

import metering.db.types
from alembic import context, op
from metering.db.migration_script import refuse_when_run

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("at", metering.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("actor_token_id", sa.Uuid(), nullable=True),
        sa.Column("actor_name", sa.String(length=200), nullable=False),
        sa.Column("tenant_id", sa.String(length=200), nullable=True),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("target", sa.String(length=500), nullable=False),
        sa.Column("before", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("after", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("request_id", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index("ix_audit_log_action_at_id", ["action", "at", "id"], unique=False)
        batch_op.create_index("ix_audit_log_at_id", ["at", "id"], unique=False)
        batch_op.create_index("ix_audit_log_tenant_at_id", ["tenant_id", "at", "id"], unique=False)


def downgrade() -> None:
    # The log is the only record of who changed what (prices, credits, tokens): no upgrade can rebuild it.
    if context.is_offline_mode():  # --sql: the script checks when it is run
        refuse_when_run(
            "0004",
            "the audit log holds entries, the record of admin changes, which dropping it would lose for good",
            "SELECT 1 FROM audit_log",
        )
    else:
        entries = op.get_bind().execute(sa.text("SELECT count(*) FROM audit_log")).scalar_one()
        if entries:
            raise RuntimeError(
                f"cannot downgrade below 0004: the audit log holds {entries} entries, the record of admin changes, "
                "which dropping it would lose for good; nothing was changed"
            )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_tenant_at_id")
        batch_op.drop_index("ix_audit_log_at_id")
        batch_op.drop_index("ix_audit_log_action_at_id")

    op.drop_table("audit_log")
