"""invoice correction lines: a re-rate of a finalized month shows on the next open invoice

``invoice_lines.correction_of`` names the period whose billed calls a line corrects (null for usage lines).
``ix_transfers_memo_period`` finds a period's re-rate corrections (the only usage transfers with a memo)
without scanning the ledger.

The downgrade refuses, and changes nothing, while an invoice holds a correction line.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 18:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import context, op
from metering.db.migration_script import refuse_when_run

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("invoice_lines", schema=None) as batch_op:
        batch_op.add_column(sa.Column("correction_of", sa.String(length=7), nullable=True))
    op.create_index(
        "ix_transfers_memo_period",
        "transfers",
        ["period"],
        postgresql_where=sa.text("memo IS NOT NULL"),
        sqlite_where=sa.text("memo IS NOT NULL"),
    )


_CORRECTED = (
    "SELECT DISTINCT correction_of FROM invoice_lines WHERE correction_of IS NOT NULL ORDER BY correction_of LIMIT 5"
)


def downgrade() -> None:
    # Dropping correction_of would turn a correction line into a usage line of its invoice's month for good.
    if context.is_offline_mode():  # --sql: the script checks when it is run
        refuse_when_run(
            "0006", "invoices hold correction lines that the older schema cannot tell from usage lines", _CORRECTED
        )
    elif periods := [row[0] for row in op.get_bind().execute(sa.text(_CORRECTED))]:
        raise RuntimeError(
            "cannot downgrade below 0006: invoices hold correction lines (re-rates of the periods "
            f"{periods!r}) that the older schema cannot tell from usage lines; nothing was changed"
        )
    op.drop_index("ix_transfers_memo_period", table_name="transfers")
    with op.batch_alter_table("invoice_lines", schema=None) as batch_op:
        batch_op.drop_column("correction_of")
