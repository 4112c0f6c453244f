"""PostgreSQL: a migration's statements wait at most ``lock_timeout`` for a table another transaction holds.

An ``ALTER TABLE`` waiting for its ACCESS EXCLUSIVE lock behind an open transaction (a ledger export streamed to a
slow client keeps its read open) makes every later query on that table queue behind it: the service stalls for as
long as that transaction lasts. Bounded, the run fails instead, rolls back (it is one transaction) and says which
table to retry on. The advisory lock that keeps two runs apart is taken before, without a limit."""

from __future__ import annotations

import re

from metering.errors import MigrationLockTimeoutError

LOCK_NOT_AVAILABLE = "55P03"  # lock_not_available: what a lock_timeout raises

# The table a DDL or DML statement names first: ALTER TABLE x, CREATE INDEX … ON x, UPDATE x, INSERT INTO x, …
_TABLE = re.compile(
    r"\b(?:TABLE|ON|INTO|UPDATE|FROM)\s+(?:ONLY\s+|IF\s+(?:NOT\s+)?EXISTS\s+)*((?:\"[^\"]+\"|\w+)(?:\.(?:\"[^\"]+\"|\w+))?)",
    re.IGNORECASE,
)


def lock_timeout_sql(seconds: float) -> str:
    """``SET LOCAL lock_timeout`` for the rest of the run's transaction; 0 waits as long as it takes."""
    return f"SET LOCAL lock_timeout = {round(seconds * 1000)}"


def is_lock_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` (a driver error, or SQLAlchemy's wrapper of one) is PostgreSQL's lock_not_available."""
    return any(getattr(error, "sqlstate", None) == LOCK_NOT_AVAILABLE for error in (exc, getattr(exc, "orig", None)))


def table_of(statement: str | None) -> str | None:
    """The table ``statement`` names first (unquoted), or None."""
    found = _TABLE.search(statement or "")
    return found[1].replace('"', "") if found else None


def lock_timeout_error(statement: str | None, seconds: float) -> MigrationLockTimeoutError:
    table = table_of(statement)
    what = f"a lock on {table}" if table else "a lock on a table this migration changes"
    return MigrationLockTimeoutError(
        f"migration stopped: another transaction holds {what} (waited {seconds:g} s, "
        "METERING_MIGRATION_LOCK_TIMEOUT_S); nothing was changed: retry when that transaction ends (a long export, "
        "an open session: see pg_stat_activity), or set a longer timeout (0 waits as long as it takes, and every "
        "query on that table waits meanwhile)"
    )
