"""A read-only view of a spool directory (for ``metering spool status`` and monitoring)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from metering.errors import SpoolError
from metering.spool.reader import pending_lines
from metering.spool.segments import (
    LOCK_NAME,
    READER_LOCK_NAME,
    Cursor,
    list_segments,
    list_slots,
    read_cursor,
    segment_name,
)
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


def reader_alive(slot: Path) -> bool:
    """True while some flusher holds the slot's reader lock (a service's flusher thread, a drain)."""
    return not lock_free(slot / READER_LOCK_NAME)


def check_readable(root: Path) -> Path:
    """``root``, once it is known to be a directory this process can list, or absent (nothing spooled yet): a
    ``SpoolError`` otherwise (a path that is a file, or under one; no permission), not an ``OSError`` from deep in a
    command (``metering spool status``, ``drain``, ``redrive`` printed a traceback)."""
    try:
        os.listdir(root)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SpoolError(f"cannot read the spool at {root}: {exc.strerror or exc}") from None
    return root


def check_writable(root: Path) -> None:
    """A ``SpoolError`` unless this process can create ``root`` (when absent) and write a file in it: checked by a
    service before it starts, not by its first invoke (``metering serve`` started, then failed each with 503)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SpoolError(f"cannot open the spool at {root}: {exc.strerror or exc}") from None


def check_deliverable(root: Path) -> None:
    """A ``SpoolError`` unless this process can write in the spool and in each of its slots, as a drain must (each
    slot's reader lock and cursor, dead letters): on a read-only filesystem, or run by a user who may only read the
    spool, a drain took no slot, waited to its timeout and said nothing of why."""
    for directory in [root, *list_slots(root)] if root.is_dir() else []:
        try:
            fd, probe = tempfile.mkstemp(prefix=".probe.", dir=directory)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise SpoolError(
                f"cannot deliver the spool at {directory}: {exc.strerror or exc}: a drain writes each slot's cursor "
                "there; make it writable, or run the drain as the user that owns it"
            ) from None


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


_TAIL = 64 * 1024


def delivery_marks(root: Path) -> dict[Path, Cursor]:
    """Per slot with complete lines past its cursor: the position just past its last complete line now. Once the
    slot's cursor reaches it, every event spooled there before is delivered (or dead-lettered), whichever flusher
    held the slot (``metering spool drain`` cannot take one another flusher holds, and waits for it instead)."""
    marks = {}
    for slot in list_slots(root):
        segments = list_segments(slot)
        mark = _end_of_last_line(slot, segments[-1]) if segments else None
        if mark is not None and not _at_or_past(read_cursor(slot), mark):
            marks[slot] = mark
    return marks


def undelivered(marks: dict[Path, Cursor]) -> dict[Path, int]:
    """The slots of ``marks`` whose cursor has not reached their mark yet, with their pending events."""
    left = {}
    for slot, mark in marks.items():
        cursor = read_cursor(slot)
        if list_segments(slot) and not _at_or_past(cursor, mark):
            left[slot] = pending_lines(slot, cursor)
    return left


def _end_of_last_line(slot: Path, seq: int) -> Cursor | None:
    """Just past the last newline of a segment (its start when it has none: the segments before it are complete);
    None once it is gone (consumed meanwhile)."""
    try:
        with open(slot / segment_name(seq), "rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            while end > 0:
                start = max(0, end - _TAIL)
                handle.seek(start)
                newline = handle.read(end - start).rfind(b"\n")
                if newline >= 0:
                    return Cursor(seq, start + newline + 1)
                end = start
    except FileNotFoundError:
        return None
    return Cursor(seq, 0)


def _at_or_past(cursor: Cursor, mark: Cursor) -> bool:
    return (cursor.segment, cursor.offset) >= (mark.segment, mark.offset)
