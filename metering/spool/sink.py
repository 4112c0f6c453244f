"""Sinks: where the flusher delivers batches of validated events. Idempotent on event_id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from metering.billing.ingest import ingest
from metering.events import UsageEvent


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    inserted: int
    duplicates: int
    rejected: tuple[tuple[int, str], ...] = ()  # (index in the batch, reason): dead-lettered, not retried


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
        with self._sessions() as session:
            result = ingest(session, events, markup_pct=self._markup)
            session.commit()
        rejected = tuple((r.index, r.reason) for r in result.rejected)
        return DeliveryResult(inserted=result.inserted, duplicates=result.duplicates, rejected=rejected)
