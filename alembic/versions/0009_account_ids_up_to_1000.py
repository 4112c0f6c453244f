"""account ids up to 1,000 characters: a wallet id of a valid tenant and user can be 806 long

A wallet id is "user:" + the tenant id with ':' and '~' escaped (up to 600 characters) + ":" + the user id (up to
200). At 300, the posting of such an event failed on PostgreSQL (varchar(300)) and failed its whole batch.
PostgreSQL widens a varchar in place (no table rewrite); SQLite recreates the tables (batch mode).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 00:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (("accounts", "id"), ("transfers", "debit_account_id"), ("transfers", "credit_account_id"))


def _retype(old: int, new: int) -> None:
    for table in ("accounts", "transfers"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name in (c for t, c in COLUMNS if t == table):
                batch_op.alter_column(
                    name, existing_type=sa.String(length=old), type_=sa.String(length=new), existing_nullable=False
                )


def upgrade() -> None:
    _retype(300, 1000)


def downgrade() -> None:
    # Fails (on PostgreSQL) if an id longer than 300 characters is stored: nothing is truncated silently.
    _retype(1000, 300)
