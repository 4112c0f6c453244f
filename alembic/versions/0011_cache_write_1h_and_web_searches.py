"""1-hour cache writes and web searches: what Anthropic charges beyond the four token kinds

An event now says how many of its cache-write tokens were written for an hour (``cache_write_1h_tokens``, part of
``cache_write_tokens``: Anthropic prices them at 2x input, against 1.25x for 5-minute writes) and how many web
searches the provider ran for it (``web_searches``, $10 per 1,000 at Anthropic). Before, both were billed as if they
were 5-minute writes and free. Events stored before have 0 of each, which is what they were billed for.

A price override gains a price for each (``cache_write_1h_nanos_per_mtok``: NULL is the cache-write price;
``web_search_nanos_per_k``: per 1,000 searches, NULL holds an event with searches as unpriced).

The downgrade refuses, and changes nothing, while a stored event or override uses them: dropping them would lose
what an event was billed for.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28 06:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import context, op
from metering.db.migration_script import refuse_when_run

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cache_write_1h_tokens", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("web_searches", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("price_overrides", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cache_write_1h_nanos_per_mtok", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("web_search_nanos_per_k", sa.BigInteger(), nullable=True))


def _in_use(sql: str) -> list[str]:
    return [str(row[0]) for row in op.get_bind().execute(sa.text(sql))]


_EVENTS = (
    "SELECT event_id FROM usage_events WHERE cache_write_1h_tokens > 0 OR web_searches > 0 ORDER BY event_id LIMIT 5"
)
_OVERRIDES = (
    "SELECT id FROM price_overrides WHERE cache_write_1h_nanos_per_mtok IS NOT NULL "
    "OR web_search_nanos_per_k IS NOT NULL ORDER BY id LIMIT 5"
)


def downgrade() -> None:
    if context.is_offline_mode():  # --sql: the script checks when it is run
        refuse_when_run(
            "0011",
            "stored events or price overrides use 1-hour cache writes or web searches; dropping them would lose "
            "what was billed",
            _EVENTS,
            _OVERRIDES,
        )
        events, overrides = [], []
    else:
        events, overrides = _in_use(_EVENTS), _in_use(_OVERRIDES)
    if events or overrides:
        raise RuntimeError(
            "cannot downgrade below 0011: stored events or price overrides use 1-hour cache writes or web searches "
            f"(first events: {events!r}; first overrides: {overrides!r}); dropping them would lose what was billed; "
            "nothing was changed"
        )
    with op.batch_alter_table("price_overrides", schema=None) as batch_op:
        batch_op.drop_column("web_search_nanos_per_k")
        batch_op.drop_column("cache_write_1h_nanos_per_mtok")
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.drop_column("web_searches")
        batch_op.drop_column("cache_write_1h_tokens")
