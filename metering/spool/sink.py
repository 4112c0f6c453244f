"""Sinks: where the flusher delivers batches of validated events. Idempotent on event_id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

import sqlalchemy.exc
from sqlalchemy.orm import Session, sessionmaker

from metering.billing.ingest import ingest
from metering.db.limits import exceeds_program_limit
from metering.events import UsageEvent


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    inserted: int
    duplicates: int
    rejected: tuple[tuple[int, str], ...] = ()  # (index in the batch, reason): dead-lettered, not retried


class RefusedBatchError(Exception):
    """The sink refuses this batch as it is and would refuse it again (not an outage): see ``spool.isolation``.
    ``too_large``: refused for its size, so an event refused alone is refused for its own size."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


# Errors of ingest that the same batch would raise again: a value the database refuses (too long, out of range,
# a constraint), or a bug on some value. By DB-API class name, since ingest writes through SQLAlchemy (wrapped
# errors) and through the raw driver connection (psycopg's or sqlite3's own). An unreachable, locked or
# restarting database, a deadlock or a serialization failure (OperationalError, InterfaceError, a pool timeout)
# is an outage: retried as it is.
_REFUSED_DBAPI = frozenset({"DataError", "IntegrityError", "ProgrammingError", "NotSupportedError"})
_OUTAGE_DBAPI = frozenset({"OperationalError", "InterfaceError", "InternalError"})
_REFUSED_PYTHON = (ArithmeticError, ValueError, TypeError, KeyError, IndexError)


def is_refusal(exc: BaseException) -> bool:
    """Whether ingest would raise ``exc`` again for the same batch (see above)."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return False
    if exceeds_program_limit(exc):  # an OperationalError to psycopg, yet the same batch exceeds it again
        return True
    for error in (exc, getattr(exc, "orig", None)):
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & _OUTAGE_DBAPI:
            return False
        if names & _REFUSED_DBAPI:
            return True
    return isinstance(exc, _REFUSED_PYTHON)


class Sink(Protocol):
    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        """Store the batch durably, or raise (the flusher retries the same batch later)."""
        ...


class DatabaseSink:
    """Ingests batches into the database (events, prices, ledger, rollups), one transaction per batch.

    The flusher is the edge here: this is where the batch's transaction commits."""

    def __init__(self, session_factory: sessionmaker[Session], *, markup_pct: Decimal = Decimal(0)) -> None:
        self._sessions = session_factory
        self._markup = markup_pct

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        try:
            with self._sessions() as session:
                result = ingest(session, events, markup_pct=self._markup)
                session.commit()
        except Exception as exc:
            if is_refusal(exc):
                raise RefusedBatchError(f"the database refuses the batch: {type(exc).__name__}: {exc}") from exc
            raise
        rejected = tuple((r.index, r.reason) for r in result.rejected)
        return DeliveryResult(inserted=result.inserted, duplicates=result.duplicates, rejected=rejected)
