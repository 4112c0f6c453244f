"""invoke requests: the Idempotency-Key of POST …:invoke, so a retry does not run (and pay for) an invocation twice

A key is claimed per tenant before the handler runs and completed with the status and body it answered; a
retry with the same key gets that response back. Kept 24 h.

The downgrade refuses, and changes nothing, while a key claimed in the last 24 h is stored.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 23:30:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

import metering.db.types
from alembic import context, op
from metering.db.migration_script import refuse_when_run

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "invoke_requests",
        sa.Column("tenant_id", sa.String(length=200), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("invocation_id", sa.Uuid(), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("claimed_at", metering.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("completed_at", metering.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", sa.JSON(none_as_null=True), nullable=True),
        sa.CheckConstraint("state IN ('running', 'done')", name=op.f("ck_invoke_requests_state")),
        sa.PrimaryKeyConstraint("tenant_id", "idempotency_key", name=op.f("pk_invoke_requests")),
    )
    with op.batch_alter_table("invoke_requests", schema=None) as batch_op:
        batch_op.create_index("ix_invoke_requests_claimed_at", ["claimed_at"], unique=False)


# How long a key answers its retries (``metering.db.invoke_requests.RETENTION`` when this revision was written);
# the next claim deletes older ones.
_KEPT = timedelta(hours=24)


def downgrade() -> None:
    # A kept key answers a retry with its stored outcome (or, still running, refuses to run it again): dropping it
    # would let the retry run, and pay for, the invocation a second time. Refused while any is kept; older keys,
    # which the service deletes anyway, do not block.
    if context.is_offline_mode():  # --sql: the script checks when it is run, against the time it is run at
        refuse_when_run(
            "0008",
            "invoke idempotency keys claimed in the last 24 h would be dropped (a retry of their requests would "
            "run, and be billed, again)",
            "SELECT 1 FROM invoke_requests WHERE claimed_at >= now() - interval "
            f"'{int(_KEPT.total_seconds())} seconds'",
        )
    else:
        claims = sa.table("invoke_requests", sa.column("claimed_at", metering.db.types.UTCDateTime(timezone=True)))
        since = datetime.now(UTC) - _KEPT
        kept = op.get_bind().execute(sa.select(sa.func.count()).where(claims.c.claimed_at >= since)).scalar_one()
        if kept:
            raise RuntimeError(
                f"cannot downgrade below 0008: {kept} invoke idempotency keys claimed in the last 24 h would be "
                "dropped (a retry of their requests would run, and be billed, again); nothing was changed"
            )
    with op.batch_alter_table("invoke_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_invoke_requests_claimed_at")

    op.drop_table("invoke_requests")
