"""Spool layout and line framing (pure helpers, plus the tiny file operations they name).

Layout of a spool directory::

    <root>/writer-<N>/lock                 flock'ed by the process that writes to the slot
    <root>/writer-<N>/reader.lock          flock'ed by the flusher that drains the slot (any process)
    <root>/writer-<N>/<seq:012d>.jsonl     segments: one JSON event per line, append-only
    <root>/writer-<N>/cursor               what the sink acknowledged: {"segment": seq, "offset": bytes}
    <root>/rejected.jsonl                  dead letters: lines that are not valid events, with a reason
    <root>/rejected.jsonl.reserve          space kept aside for dead letters, used when the disk is full
    <root>/held.jsonl                      events ahead of this host's clock, delivered once it gets there (held.py)
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import orjson

from metering.spool.brief_locks import brief_open

SLOT_PREFIX = "writer-"
SEGMENT_SUFFIX = ".jsonl"
LOCK_NAME = "lock"  # held by the writer (Spool) that owns the slot
READER_LOCK_NAME = "reader.lock"  # held by the flusher that drains the slot
CURSOR_NAME = "cursor"
DEAD_LETTER_NAME = "rejected.jsonl"
_SEGMENT_RE = re.compile(r"^(\d{12})\.jsonl$")
log = logging.getLogger("metering.spool")
_TOLD_CORRUPT: set[Path] = set()  # cursors warned about (read in a loop by a flush: told once per process)


def segment_name(seq: int) -> str:
    return f"{seq:012d}{SEGMENT_SUFFIX}"


def segment_seq(name: str) -> int | None:
    match = _SEGMENT_RE.match(name)
    return int(match.group(1)) if match else None


def list_segments(slot_dir: Path) -> list[int]:
    """Sequence numbers of the segments in a slot, ascending."""
    try:
        names = os.listdir(slot_dir)
    except FileNotFoundError:
        return []
    return sorted(seq for seq in map(segment_seq, names) if seq is not None)


def list_slots(root: Path) -> list[Path]:
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [root / name for name in entries if name.startswith(SLOT_PREFIX) and (root / name).is_dir()]


@dataclass(frozen=True, slots=True)
class Cursor:
    """Everything before (segment, offset) has been acknowledged by the sink."""

    segment: int = 0
    offset: int = 0


def read_cursor(slot_dir: Path) -> Cursor:
    try:
        with brief_open(slot_dir / CURSOR_NAME, os.O_RDONLY) as fd, open(fd, "rb", closefd=False) as handle:
            # Shared with other readers; excluded by a write in place (``_overwrite``), which a read in its midst
            # saw torn: the new segment with the old offset, a position nothing acknowledged. Released on close
            # (and closed in a child forked meanwhile: see spool.brief_locks).
            fcntl.flock(fd, fcntl.LOCK_SH)
            raw = handle.read()
        data = orjson.loads(raw)
        cursor = Cursor(segment=int(data["segment"]), offset=int(data["offset"]))
        if cursor.segment < 0 or cursor.offset < 0:
            raise ValueError("a cursor position is never negative")
        return cursor
    except FileNotFoundError:
        return Cursor()
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        # A cursor is written by atomic rename, or in place under the lock, so this only happens if someone edited
        # it. Starting over re-delivers, which the idempotent sink turns into duplicates: nothing lost, nothing doubled.
        path = slot_dir / CURSOR_NAME
        if path not in _TOLD_CORRUPT:
            _TOLD_CORRUPT.add(path)
            log.warning(
                "spool: the cursor %s is unreadable (%s): the slot is delivered again from its oldest segment, and the "
                "sink counts what it already has as duplicates; nothing is lost. The next delivery writes a new one",
                path,
                exc,
            )
        return Cursor()


def write_cursor(slot_dir: Path, cursor: Cursor) -> None:
    """Persist the cursor atomically (write a temporary file, then rename over the old one). On a full disk, where
    the temporary file gets no space, the cursor is written over the existing one's bytes instead (see
    ``_overwrite``): the flusher can go on acknowledging, and deleting the segments it consumed frees the disk."""
    data = _cursor_bytes(cursor)
    tmp = slot_dir / f"{CURSOR_NAME}.tmp"
    try:
        tmp.write_bytes(data)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in _DISK_FULL or not _overwrite(slot_dir / CURSOR_NAME, data):
            raise
        return
    os.replace(tmp, slot_dir / CURSOR_NAME)


def ensure_cursor(slot_dir: Path) -> bool:
    """Give a slot without a cursor file one (at the start, as if it had none), so that it can be written over on a
    full disk. Never replaces a cursor (created by a link, which fails if one exists); best effort: whether the slot
    has a cursor file now."""
    path = slot_dir / CURSOR_NAME
    if path.exists():
        return True
    tmp = slot_dir / f"{CURSOR_NAME}.{os.getpid()}.init"
    try:
        tmp.write_bytes(_cursor_bytes(Cursor()))
        os.link(tmp, path)
    except FileExistsError:  # a flusher wrote one meanwhile
        return True
    except OSError:  # the disk: tried again later
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _cursor_bytes(cursor: Cursor) -> bytes:
    return orjson.dumps({"segment": cursor.segment, "offset": cursor.offset})


def _overwrite(path: Path, data: bytes) -> bool:
    """Write ``data`` over the file at ``path`` from its first byte, padded with spaces (JSON whitespace) to its
    length: the file keeps the block it has, so a full disk cannot refuse it. One ``pwrite`` of a few dozen bytes,
    which a killed process cannot tear, under an exclusive ``flock`` that ``read_cursor`` takes shared: a read in
    the midst of it could see the new bytes followed by old ones. False when there is no such file."""
    try:
        with brief_open(path, os.O_WRONLY) as fd:  # closed in a child forked meanwhile (see spool.brief_locks)
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
            padded = data.ljust(os.fstat(fd).st_size)
            if os.pwrite(fd, padded, 0) != len(padded):
                raise OSError(errno.ENOSPC, f"could not write the spool cursor {path}")
    except FileNotFoundError:  # (only the open raises it)
        return False
    return True


def split_lines(buffer: bytes, base_offset: int) -> tuple[list[tuple[int, bytes]], int]:
    """Split ``buffer`` (read from ``base_offset``) into complete lines.

    Returns ``[(offset_of_line, line_without_newline), ...]`` and the offset just past the last complete
    line. A trailing fragment with no newline is not consumed: it is either still being written or torn.
    Empty lines are skipped but consumed.
    """
    lines: list[tuple[int, bytes]] = []
    start = 0
    while True:
        end = buffer.find(b"\n", start)
        if end < 0:
            break
        if end > start:
            lines.append((base_offset + start, buffer[start:end]))
        start = end + 1
    return lines, base_offset + start
