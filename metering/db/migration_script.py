"""Migrations rendered as a script for a DBA (``alembic upgrade|downgrade … --sql``: offline, no connection).

A downgrade that refuses to lose data counts the rows first: while rendering there is no database to count in.
On PostgreSQL the script makes the check itself when it is run (a ``DO`` block raising the refusal, in the
script's one transaction: nothing is changed). SQLite has no way for a script to stop itself (no procedural SQL,
and its shell goes on after an error unless told to bail): rendering such a step fails instead, naming it
(``alembic/env.py``), so no script that would drop the data unchecked is ever printed.
"""

from __future__ import annotations

from alembic import op


class NotScriptable(Exception):
    """A step an offline script cannot hold on this dialect; ``alembic/env.py`` names the step and what to do."""


def refuse_when_run(revision: str, reason: str, *blocking: str) -> None:
    """The offline form of a downgrade's refusal: the script fails with ``cannot downgrade below {revision}:
    {reason}; nothing was changed`` when any of the ``blocking`` queries (plain SQL, no ``$$``) finds a row."""
    if op.get_context().dialect.name != "postgresql":
        raise NotScriptable("its refusal first looks for the data it would lose, which a SQLite script cannot do")
    message = f"cannot downgrade below {revision}: {reason}; nothing was changed".replace("'", "''")
    assert "%" not in message, "RAISE reads % as a placeholder"
    condition = " OR ".join(f"EXISTS ({query})" for query in blocking)
    # text(): a backslash keeps a colon from being read as a bind parameter
    op.execute(f"DO $$ BEGIN IF {condition} THEN RAISE EXCEPTION '{message}'; END IF; END $$".replace(":", "\\:"))
