"""Creating a row another transaction may be creating at the same moment (check, then insert)."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from metering.errors import ConflictError


def flush_or_conflict(session: Session, conflict: str) -> None:
    """Flush; when the unique key was taken meanwhile by a concurrent request (both found no row, both inserted),
    a ``ConflictError`` with ``conflict`` (409: retry), not a 500. The caller's transaction is then to be rolled
    back, as after any error."""
    try:
        session.flush()
    except IntegrityError as exc:
        raise ConflictError(conflict) from exc
