"""Migrations rendered as a script for a DBA (``alembic upgrade|downgrade … --sql``: offline, no connection).

A downgrade that refuses to lose data counts the rows first: while rendering there is no database to count in.
On PostgreSQL the script makes the check itself when it is run (a ``DO`` block raising the refusal, in the
script's one transaction: nothing is changed). SQLite has no way for a script to stop itself (no procedural SQL,
and its shell goes on after an error unless told to bail): rendering such a step fails instead, naming it
(``alembic/env.py``), so no script that would drop the data unchecked is ever printed.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text

from alembic import context, op


class NotScriptable(Exception):
    """A step an offline script cannot hold on this dialect; ``alembic/env.py`` names the step and what to do."""


def refuse_when_run(revision: str, reason: str, *blocking: str) -> None:
    """The offline form of a downgrade's refusal: the script fails with ``cannot downgrade below {revision}:
    {reason}; nothing was changed`` when any of the ``blocking`` queries (plain SQL, no ``$$``) finds a row."""
    if op.get_context().dialect.name != "postgresql":
        raise NotScriptable("its refusal first looks for the data it would lose, which a SQLite script cannot do")
    # A literal of RAISE's format: a quote doubled, and a '%' (a placeholder to RAISE)
    message = f"cannot downgrade below {revision}: {reason}; nothing was changed".replace("'", "''").replace("%", "%%")
    condition = " OR ".join(f"EXISTS ({query})" for query in blocking)
    # Written as is, as op.execute() would write it: through text(), a colon started a bind parameter and, for
    # psycopg, a '%' came out doubled (a LIKE or a literal of a query then no longer what it says).
    impl = op.get_context().impl
    impl.static_output(
        f"DO $$ BEGIN IF {condition} THEN RAISE EXCEPTION '{message}'; END IF; END $$" + impl.command_terminator
    )


def refuse_while_held(revision: str, holder: str, tables: Sequence[str], loss: str) -> None:
    """A downgrade dropping ``tables`` refused while any holds a row: ``cannot downgrade below {revision}: {holder}
    holds {n table, ...}, {loss}; nothing was changed``; offline, the script checks when it is run."""
    if context.is_offline_mode():
        refuse_when_run(
            revision, f"{holder} holds rows of {', '.join(tables)}, {loss}", *(f"SELECT 1 FROM {t}" for t in tables)
        )
        return
    bind = op.get_bind()
    counts = {table: bind.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() for table in tables}
    if any(counts.values()):
        held = ", ".join(f"{n} {table}" for table, n in counts.items() if n)
        raise RuntimeError(f"cannot downgrade below {revision}: {holder} holds {held}, {loss}; nothing was changed")
