"""account ids up to 1,000 characters: a wallet id of a valid tenant and user can be 806 long

A wallet id is "user:" + the tenant id with ':' and '~' escaped (up to 600 characters) + ":" + the user id (up to
200). At 300, the posting of such an event failed on PostgreSQL (varchar(300)) and failed its whole batch.
PostgreSQL widens a varchar in place (no table rewrite); SQLite recreates the tables (batch mode).

The downgrade refuses on PostgreSQL, naming them, while an account id longer than 300 characters is stored.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 00:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import context, op
from metering.db.migration_script import refuse_when_run

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


_LONG_IDS = (
    "SELECT id FROM accounts WHERE length(id) > 300 UNION SELECT debit_account_id FROM transfers "
    "WHERE length(debit_account_id) > 300 UNION SELECT credit_account_id FROM transfers "
    "WHERE length(credit_account_id) > 300 ORDER BY 1 LIMIT 3"
)


def downgrade() -> None:
    # PostgreSQL cannot narrow the columns while an id longer than 300 characters is stored: refused, naming them
    # (was the database's bare "value too long"). SQLite does not enforce the length: nothing is lost there.
    if op.get_context().dialect.name == "postgresql" and context.is_offline_mode():  # --sql: checked when run
        refuse_when_run("0009", "account ids longer than 300 characters are stored", _LONG_IDS)
    elif op.get_context().dialect.name == "postgresql":
        ids = [row[0] for row in op.get_bind().execute(sa.text(_LONG_IDS))]
        if ids:
            raise RuntimeError(
                f"cannot downgrade below 0009: account ids longer than 300 characters are stored (first: {ids!r}); "
                "nothing was changed"
            )
    _retype(1000, 300)
