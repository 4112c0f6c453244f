"""credit and adjustment idempotency keys per tenant: one tenant's key no longer blocks or reveals another's

A key was unique across all tenants: a tenant could not use a key another tenant had used (409), and the
conflict told it the key was taken. Keys are now unique per (tenant, key), like the keys of POST …:invoke.
Stored keys get the tenant of the wallet their transfer credited or debited.

The downgrade restores the global index; it refuses (and changes nothing) while one key is used by two tenants.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 03:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import context, op
from metering.db.migration_script import refuse_when_run

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYED = sa.text("idempotency_key IS NOT NULL")


def _global_index() -> None:
    op.create_index(  # as 0002 created it
        "uq_transfers_idempotency_key",
        "transfers",
        ["idempotency_key"],
        unique=True,
        postgresql_where=KEYED,
        sqlite_where=KEYED,
    )


def upgrade() -> None:
    op.add_column("transfers", sa.Column("idempotency_tenant_id", sa.String(length=200), nullable=True))
    # A keyed transfer (a credit or an adjustment) has one user wallet on either side: its tenant owns the key.
    op.execute(
        """
        UPDATE transfers SET idempotency_tenant_id = (
            SELECT accounts.tenant_id FROM accounts
            WHERE accounts.kind = 'user_wallet'
              AND accounts.id IN (transfers.debit_account_id, transfers.credit_account_id)
        )
        WHERE idempotency_key IS NOT NULL
        """
    )
    op.drop_index("uq_transfers_idempotency_key", table_name="transfers")
    op.create_index(
        "uq_transfers_tenant_idempotency_key",
        "transfers",
        ["idempotency_tenant_id", "idempotency_key"],
        unique=True,
        postgresql_where=KEYED,
        sqlite_where=KEYED,
    )


_SHARED = (
    "SELECT idempotency_key FROM transfers WHERE idempotency_key IS NOT NULL "
    "GROUP BY idempotency_key HAVING COUNT(*) > 1 ORDER BY idempotency_key LIMIT 5"
)


def downgrade() -> None:
    if context.is_offline_mode():  # --sql: the script checks when it is run
        refuse_when_run(
            "0010",
            "idempotency keys used by more than one tenant would break the global unique index",
            _SHARED,
        )
    elif keys := [row[0] for row in op.get_bind().execute(sa.text(_SHARED))]:
        raise RuntimeError(
            "cannot downgrade below 0010: idempotency keys used by more than one tenant would break the global "
            f"unique index (first: {keys!r}); nothing was changed"
        )
    op.drop_index("uq_transfers_tenant_idempotency_key", table_name="transfers")
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.drop_column("idempotency_tenant_id")
    _global_index()
