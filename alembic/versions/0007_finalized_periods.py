"""finalized periods: finalizing a month closes it for every user, not only those it issued an invoice to

Before, a month counted as finalized only for users with a finalized invoice in it, so an event of a closed
month for a user who had none was billed in that month (a new invoice for a month already finalized). The table
is filled from the finalized invoices already stored.

The downgrade refuses, and changes nothing, while a finalized month has no finalized invoice (the upgrade could not
restore it: the month would reopen).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 21:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

import metering.db.types
from alembic import context, op
from metering.db.migration_script import refuse_when_run

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "finalized_periods",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("finalized_at", metering.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("period"),
    )
    op.execute(
        "INSERT INTO finalized_periods (period, finalized_at) "
        "SELECT period, min(finalized_at) FROM invoices WHERE status = 'finalized' GROUP BY period"
    )


_UNRESTORED = (
    "SELECT period FROM finalized_periods WHERE NOT EXISTS (SELECT 1 FROM invoices "
    "WHERE invoices.status = 'finalized' AND invoices.period = finalized_periods.period) "
    "ORDER BY period LIMIT 5"
)


def downgrade() -> None:
    # The upgrade restores only the months with a finalized invoice (at their first invoice's time): a month
    # finalized without an invoice (nobody billed in it) would be reopened for good, so the downgrade refuses.
    if context.is_offline_mode():  # --sql: the script checks when it is run
        refuse_when_run("0007", "finalized periods that no finalized invoice records would be reopened", _UNRESTORED)
    elif periods := [row[0] for row in op.get_bind().execute(sa.text(_UNRESTORED))]:
        raise RuntimeError(
            "cannot downgrade below 0007: finalized periods that no finalized invoice records would be reopened "
            f"(first: {periods!r}); nothing was changed"
        )
    op.drop_table("finalized_periods")
