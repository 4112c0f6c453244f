"""Reading a slot from its cursor: batches of complete lines, torn fragments, consumed segments."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from metering.spool.segments import Cursor, list_segments, segment_name, split_lines

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Batch:
    """Lines read from one segment of one slot, and where the cursor goes once they are handled."""

    segment: int
    lines: list[tuple[int, bytes]]  # (byte offset in the segment, line without its newline)
    next_cursor: Cursor
    finished_segment: bool  # the segment is complete and fully read: delete it after acknowledging
    torn: tuple[int, bytes] | None = None  # an incomplete last line of a finished segment


def read_batch(
    slot_dir: Path,
    cursor: Cursor,
    *,
    current_segment: int | None,
    max_lines: int,
    segments: list[int] | None = None,
) -> Batch | None:
    """The next batch after ``cursor``, or None when nothing is ready.

    ``current_segment`` is the segment a live writer is still appending to (None for a slot nobody
    writes to): its trailing fragment may be a write in progress, so it is left for later. Every other
    segment is finished, and a trailing fragment there is a torn write. ``segments`` restricts the read
    to segments listed before the writer's liveness was checked (a writer that claims the slot later
    only ever creates higher-numbered segments).
    """
    for seq in list_segments(slot_dir) if segments is None else segments:
        if seq < cursor.segment:  # acknowledged earlier; deleting it was interrupted
            remove_segment(slot_dir, seq)
            continue
        offset = cursor.offset if seq == cursor.segment else 0
        finished = current_segment is None or seq < current_segment
        lines, end, at_eof, rest = _read_lines(slot_dir / segment_name(seq), offset, max_lines)
        torn = (end, rest) if finished and at_eof and rest else None
        if lines or torn or finished:
            done = finished and at_eof
            next_cursor = Cursor(seq + 1, 0) if done else Cursor(seq, end)
            return Batch(seq, lines, next_cursor, finished_segment=done, torn=torn)
        if seq != cursor.segment:  # nothing new, but the cursor can move up to the live segment
            return Batch(seq, [], Cursor(seq, end), finished_segment=False)
        return None  # the live segment has nothing new
    return None


def _read_lines(path: Path, offset: int, max_lines: int) -> tuple[list[tuple[int, bytes]], int, bool, bytes]:
    """Up to ``max_lines`` complete lines from ``offset``: (lines, end offset, reached EOF, trailing fragment)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            buffer = b""
            at_eof = False
            while buffer.count(b"\n") < max_lines:
                chunk = handle.read(_CHUNK)
                if not chunk:
                    at_eof = True
                    break
                buffer += chunk
    except FileNotFoundError:
        return [], offset, True, b""
    lines, end = split_lines(buffer, offset)
    if len(lines) > max_lines:
        end, lines, at_eof = lines[max_lines][0], lines[:max_lines], False
    # Past ``end`` there is no newline left unless the batch was cut short (then at_eof is False).
    rest = buffer[end - offset :] if at_eof else b""
    return lines, end, at_eof, rest


def remove_segment(slot_dir: Path, seq: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(slot_dir / segment_name(seq))


def pending_lines(slot_dir: Path, cursor: Cursor) -> int:
    """How many complete lines in the slot are not yet acknowledged."""
    total = 0
    for seq in list_segments(slot_dir):
        if seq < cursor.segment:
            continue
        try:
            with open(slot_dir / segment_name(seq), "rb") as handle:
                handle.seek(cursor.offset if seq == cursor.segment else 0)
                while chunk := handle.read(_CHUNK):
                    total += chunk.count(b"\n")
        except FileNotFoundError:
            continue
    return total
