"""api tokens: hashed bearer tokens for the HTTP service (scopes, optional tenant binding)

The secret itself is never stored: only its SHA-256 (hex) and its first 8 characters for display.

The downgrade refuses, and changes nothing, while a token is stored (active or revoked).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 14:23:39.192237
"""

from collections.abc import Sequence

import sqlalchemy as sa

import metering.db.types
from alembic import context, op
from metering.db.migration_script import refuse_when_run

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=8), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("tenant_id", sa.String(length=200), nullable=True),
        sa.Column("created_at", metering.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", metering.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", metering.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.create_index("ix_api_tokens_prefix", ["prefix"], unique=False)


def downgrade() -> None:
    # The secrets are not stored: upgrading again cannot bring a token back, so every client holding one would be
    # locked out (and a revoked one is the record of who had access). Refused while any is stored.
    if context.is_offline_mode():  # --sql: the script checks when it is run
        refuse_when_run(
            "0003",
            "api tokens (active or revoked) would be dropped for good (every client holding one locked out)",
            "SELECT 1 FROM api_tokens",
        )
    else:
        active, revoked = (
            op.get_bind()
            .execute(sa.text("SELECT count(*) - count(revoked_at), count(revoked_at) FROM api_tokens"))
            .one()
        )
        if active or revoked:
            raise RuntimeError(
                f"cannot downgrade below 0003: {active + revoked} api tokens ({active} active, {revoked} revoked) "
                "would be dropped for good (every client holding one locked out); nothing was changed"
            )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_index("ix_api_tokens_prefix")

    op.drop_table("api_tokens")
