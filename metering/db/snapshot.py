"""Reads made of several queries that must agree with each other: one snapshot of the database for all of them."""

from __future__ import annotations

from sqlalchemy.orm import Session


def read_snapshot(session: Session) -> None:
    """Every query of the session's transaction, until it ends, sees the database as it was at the first one.

    A draft invoice is read in several queries (its billed lines, then the correction lines of re-rates); a
    re-rate or a late ingest committed between them would give a total that never existed. Call before the
    transaction's first query (a fresh session). PostgreSQL: the transaction is ``REPEATABLE READ``. SQLite: it
    is begun explicitly (the driver begins none for reads: each query was its own snapshot); WAL readers never
    block writers.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    else:
        session.connection().exec_driver_sql("BEGIN")
