"""A read-only view of a spool directory (for ``metering spool status`` and monitoring)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metering.spool.reader import pending_lines
from metering.spool.segments import LOCK_NAME, Cursor, list_segments, list_slots, read_cursor
from metering.spool.writer import lock_free


@dataclass(frozen=True, slots=True)
class SlotState:
    slot: str
    writer_alive: bool
    segments: int
    cursor: Cursor
    pending: int


def writer_alive(slot: Path) -> bool:
    """True while some process holds the slot's writer lock (this one included)."""
    return not lock_free(slot / LOCK_NAME)


def slot_states(root: Path) -> list[SlotState]:
    states = []
    for slot in list_slots(root):
        cursor = read_cursor(slot)
        states.append(
            SlotState(
                slot=slot.name,
                writer_alive=writer_alive(slot),
                segments=len(list_segments(slot)),
                cursor=cursor,
                pending=pending_lines(slot, cursor),
            )
        )
    return states
