"""Events held back: refused by the sink only for being in the future, and in the future by this host's clock too.

The host's clock stepped back (an NTP step, a VM resumed or restored) between a call and its flush: the events
written before the step are ahead of the clock that ingests them (the database sink's is this host's), and ingest
refuses an event more than ``MAX_FUTURE`` ahead. Dead-lettered, a billable call left billing until someone redrove
it. The flusher writes such an event to ``held.jsonl`` instead (a record as in ``rejected.jsonl``) and acknowledges
its batch, so nothing behind it waits; each pass, it delivers the held events that are due by this host's clock and
drops them from the file once the sink took them (a crash in between delivers them again: duplicates). An event
more than ``MAX_HELD_AHEAD`` ahead, which no clock step explains (a producer's bug), is dead-lettered as before.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from metering.billing.ingest import IN_THE_FUTURE, MAX_FUTURE
from metering.events import UsageEvent
from metering.spool.decode import DeadLetters, decode_line

HELD_NAME = "held.jsonl"
MAX_HELD_AHEAD = timedelta(hours=24)


def refused_as_early(reason: str) -> bool:
    """Whether the sink refused the event for its ``occurred_at`` being in the future (ingest's reason: not another
    reason that quotes those words)."""
    return reason.startswith("occurred_at ") and IN_THE_FUTURE in reason


def to_hold(event: UsageEvent, reason: str, now: datetime) -> bool:
    """Whether an event the sink refused with ``reason`` is held rather than dead-lettered."""
    return refused_as_early(reason) and event.occurred_at <= now + MAX_HELD_AHEAD


def too_far_ahead_note() -> str:
    """Said in the dead letter of an event refused as in the future that is not held."""
    hours = MAX_HELD_AHEAD.total_seconds() / 3600
    return f" (more than {hours:g} hours ahead of this host's clock, which no clock step explains: not held)"


def ahead_of(event: UsageEvent, now: datetime) -> str:
    """How far ahead of ``now`` the event is, for the operator."""
    seconds = (event.occurred_at - now).total_seconds()
    return f"{seconds / 60:.1f} minutes" if seconds < 3600 else f"{seconds / 3600:.1f} hours"


def due_at(event: UsageEvent) -> datetime:
    """When this host's clock gets to where ingest takes the event."""
    return event.occurred_at - MAX_FUTURE


class HeldEvents(DeadLetters):
    """``held.jsonl``: written, read and locked as dead letters are (``DeadLetters``), delivered by the flusher."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        # The file as last read (inode, size, mtime) and when its earliest event not yet due is: until then, a file
        # still as it was has nothing due, and is not read and validated again at every pass.
        self._seen: tuple[int, int, int] | None = None
        self._next_due = datetime.max.replace(tzinfo=UTC)

    def deliver_due(
        self,
        now: datetime,
        limit: int,
        deliver: Callable[[list[dict[str, Any]], list[UsageEvent]], set[int]],
    ) -> int:
        """Hand up to ``limit`` events due by ``now`` to ``deliver`` (their records and events), which returns the
        positions of those to keep held; drop the others from the file. Returns how many left it: 0 when none is due,
        or another flusher is at it (its lock is not waited for)."""
        if (seen := self._stat()) is None or (seen == self._seen and now < self._next_due):
            return 0
        with self._locked(wait=False) as locked:
            if not locked:
                return 0
            seen = self._stat()
            lines = self._lines()
            due: list[tuple[int, dict[str, Any], UsageEvent]] = []
            next_due = datetime.max.replace(tzinfo=UTC)
            for position, (_, record) in enumerate(lines):
                event = _event_of(record)
                if record is None or event is None:
                    continue
                if due_at(event) > now:
                    next_due = min(next_due, due_at(event))
                elif len(due) < limit:
                    due.append((position, record, event))
            if not due:
                self._seen, self._next_due = seen, next_due
                return 0
            keep = deliver([record for _, record, _ in due], [event for _, _, event in due])
            settled = {position for i, (position, _, _) in enumerate(due) if i not in keep}
            if settled:
                self._rewrite(
                    b"".join(raw + b"\n" for position, (raw, _) in enumerate(lines) if position not in settled)
                )
            return len(settled)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _event_of(record: dict[str, Any] | None) -> UsageEvent | None:
    """The event a held record's line holds (None for a line that is not one: kept in the file, never dropped)."""
    if record is None or not isinstance(line := record.get("line"), str):
        return None
    event = decode_line(line.encode("utf-8"))
    return event if isinstance(event, UsageEvent) else None
