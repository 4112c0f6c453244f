"""Reads made of several queries that must agree with each other: one snapshot of the database for all of them."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session


def read_snapshot(session: Session) -> None:
    """Every query of the transaction this begins, until it ends, sees the database as it was at the first one.

    A draft invoice is read in several queries (its billed lines, then the correction lines of re-rates), and
    ``billing check`` compares stored rollups with a recomputation from the events: a batch or a re-rate committed
    between two of them would give a total that never existed, or a false failure. PostgreSQL: ``REPEATABLE READ,
    READ ONLY``. SQLite: an explicit ``BEGIN`` (its driver runs reads outside a transaction: each query was its own
    snapshot); WAL readers never block writers. Nothing when the session's transaction has begun already (its
    isolation cannot change any more): call it first, on a fresh session.
    """
    if session.in_transaction():
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
    else:
        session.execute(text("BEGIN"))
