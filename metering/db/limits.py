"""PostgreSQL's program limits (SQLSTATE class 54: an index entry or a statement too large, too many columns or
arguments). psycopg raises them as ``OperationalError``, the class of outages, yet the same statement exceeds the
same limit every time: they are refusals of the data, never a reason to retry as is."""

from __future__ import annotations

PROGRAM_LIMIT_CLASS = "54"


def exceeds_program_limit(exc: BaseException) -> bool:
    """Whether ``exc`` (a driver error, or SQLAlchemy's wrapper of one) is a PostgreSQL program limit."""
    for error in (exc, getattr(exc, "orig", None)):
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(PROGRAM_LIMIT_CLASS):
            return True
    return False
