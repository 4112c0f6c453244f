"""PostgreSQL's program limits (SQLSTATE class 54: an index entry or a statement too large, too many columns or
arguments). psycopg raises them as ``OperationalError``, the class of outages, yet the same statement exceeds the
same limit every time: they are refusals of the data, never a reason to retry as is."""

from __future__ import annotations

import sqlite3

PROGRAM_LIMIT_CLASS = "54"
# A write refused because the transaction is read-only: a primary demoted to a standby in a failover, a database made
# read-only for maintenance. An InternalError to psycopg, yet an outage: the same write succeeds once it is writable.
READ_ONLY_SQLSTATE = "25006"


def exceeds_program_limit(exc: BaseException) -> bool:
    """Whether ``exc`` (a driver error, or SQLAlchemy's wrapper of one) is a PostgreSQL program limit."""
    for error in (exc, getattr(exc, "orig", None)):
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(PROGRAM_LIMIT_CLASS):
            return True
    return False


def read_only(exc: BaseException) -> bool:
    """Whether ``exc`` (a driver error, or SQLAlchemy's wrapper of one) is the database refusing a write as read-only:
    PostgreSQL's SQLSTATE 25006, SQLite's SQLITE_READONLY (a file opened read-only, on a read-only mount)."""
    for error in (exc, getattr(exc, "orig", None)):
        if getattr(error, "sqlstate", None) == READ_ONLY_SQLSTATE:
            return True
        if isinstance(error, sqlite3.Error) and (error.sqlite_errorcode or 0) & 0xFF == sqlite3.SQLITE_READONLY:
            return True
    return False


# A table or column the code uses that the database does not have: the code is newer than the database's schema
# (deployed before `metering migrate` ran). PostgreSQL: undefined_table, undefined_column (ProgrammingError);
# SQLite: an OperationalError saying so. Not a refusal of the data, and not an outage that retrying fixes by itself.
_SCHEMA_SQLSTATES = frozenset({"42P01", "42703"})
_SQLITE_SCHEMA = ("no such table", "no such column", "has no column named")


def schema_behind(exc: BaseException) -> bool:
    """Whether ``exc`` (a driver error, or SQLAlchemy's wrapper of one) says the database lacks a table or column.

    Only the driver's own error is read: SQLAlchemy's wrapper's text holds the statement's parameters, so a client's
    value saying "no such table" in a statement that failed for another reason (locked, full, a timeout) read as a
    schema behind the code."""
    driver = getattr(exc, "orig", None) or exc
    if getattr(driver, "sqlstate", None) in _SCHEMA_SQLSTATES:
        return True
    return isinstance(driver, sqlite3.OperationalError) and any(text in str(driver) for text in _SQLITE_SCHEMA)
