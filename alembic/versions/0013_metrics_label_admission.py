"""metrics label admission: the values and label sets that have their own series on /metrics, kept once chosen

/metrics folded the values beyond the top N of their label (by calls) into ``other`` anew at every scrape: a model
that overtook one of the top N took its whole all-time sum out of ``other``, which stepped down (Prometheus read a
counter reset). A value (a label set) is now admitted once, at a scrape, and keeps its series; these two tables hold
what was admitted, in order (``position``). Empty at first: the first scrape admits the top N as before.

The downgrade drops them: the next scrape after upgrading again admits afresh by the ranking of that time.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-28 20:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "metrics_label_values",
        sa.Column("label", sa.String(length=20), nullable=False),
        sa.Column("value", sa.String(length=200), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("label", "value", name=op.f("pk_metrics_label_values")),
        sa.UniqueConstraint("label", "position", name="uq_metrics_label_values_position"),
    )
    op.create_table(
        "metrics_label_sets",
        sa.Column("provider", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("purpose", sa.String(length=200), nullable=False),
        sa.Column("extension", sa.String(length=200), nullable=False),
        sa.Column("is_byollm", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint(
            "provider", "model", "purpose", "extension", "is_byollm", "status", name=op.f("pk_metrics_label_sets")
        ),
        sa.UniqueConstraint("position", name=op.f("uq_metrics_label_sets_position")),
    )


def downgrade() -> None:
    op.drop_table("metrics_label_sets")
    op.drop_table("metrics_label_values")
