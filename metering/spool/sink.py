"""Sinks: where the flusher delivers batches of validated events. Idempotent on event_id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from metering.db.event_store import insert_events
from metering.events import UsageEvent


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    inserted: int
    duplicates: int


class Sink(Protocol):
    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        """Store the batch durably, or raise (the flusher retries the same batch later)."""
        ...


class DatabaseSink:
    """Writes raw events to the database, one transaction per batch (the flusher is the edge that commits)."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._sessions = session_factory

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        with self._sessions() as session:
            result = insert_events(session, events)
            session.commit()
        return DeliveryResult(inserted=len(result.inserted), duplicates=result.duplicates)
