"""Turning spool lines into events, and dead-lettering those that are not events (with a reason)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from metering.events import UsageEvent, event_from_record, utcnow, validation_reason
from metering.spool.brief_locks import brief_open

log = logging.getLogger("metering.spool")


@dataclass(frozen=True, slots=True)
class Rejected:
    offset: int
    line: bytes
    reason: str
    event_id: str | None = None


def decode_line(line: bytes) -> UsageEvent | str:
    """The event on this line, or the reason it is not one."""
    try:
        record: Any = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    if not isinstance(record, dict):
        return f"not a JSON object: {type(record).__name__}"
    try:
        return event_from_record(record)
    except ValidationError as exc:
        return validation_reason(exc)


def decode_lines(
    lines: list[tuple[int, bytes]],
) -> tuple[list[UsageEvent], list[tuple[int, bytes]], list[Rejected]]:
    """The events, the (offset, line) each came from, and the lines that are not events."""
    events: list[UsageEvent] = []
    sources: list[tuple[int, bytes]] = []
    rejected: list[Rejected] = []
    for offset, line in lines:
        result = decode_line(line)
        if isinstance(result, str):
            rejected.append(Rejected(offset, line, result, _event_id_of(line)))
        else:
            events.append(result)
            sources.append((offset, line))
    return events, sources, rejected


def _event_id_of(line: bytes) -> str | None:
    try:
        value = orjson.loads(line).get("event_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# Bytes kept aside in ``rejected.jsonl.reserve`` for dead letters. On a full disk, a batch with a line to
# dead-letter could not be acknowledged, and its segment, whose deletion would free the disk, was never consumed:
# the spool stayed full for good. The flusher then deletes the reserve and writes the dead letters in its place.
RESERVE_BYTES = 1 << 20
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_RESERVE_HEADROOM = 64 * 1024  # free bytes left to the appends once the reserve is written


def _room_for_reserve(directory: Path) -> bool:
    """Whether the filesystem has room for the reserve (and some left over); True when it cannot tell."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return True
    return stats.f_bavail * stats.f_frsize >= RESERVE_BYTES + _RESERVE_HEADROOM


class DeadLetters:
    """``rejected.jsonl``: one JSON record per rejected line, appended with one write each.

    Writers and ``redrive`` hold an ``flock`` on ``rejected.jsonl.lock``, so a redrive that rewrites the file
    never drops a record appended meanwhile."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reserve = path.with_name(path.name + ".reserve")

    def keep_reserve(self) -> None:
        """Make sure ``RESERVE_BYTES`` are kept aside for dead letters (best effort: not on a disk already full)."""
        try:
            if self.reserve.stat().st_size >= RESERVE_BYTES:
                return
        except FileNotFoundError:
            pass
        # One name, written under the lock (not while a redrive or a dead letter holds it: the next pass): what a
        # process killed while writing it left (named after its pid, it stayed for good: up to 1 MiB per kill) is
        # written over, or removed first to free its room. Best effort: any error leaves the reserve for later.
        with contextlib.suppress(OSError), self._locked(wait=False) as locked:
            if locked:
                self._put_reserve_aside()

    def _put_reserve_aside(self) -> None:
        tmp = self.reserve.with_name(f"{self.reserve.name}.tmp")
        tmp.unlink(missing_ok=True)
        if not _room_for_reserve(self.reserve.parent):  # writing it would take the last free bytes until it failed:
            return  # an append landing meanwhile failed (ENOSPC) on a disk with room for it, at every flusher pass
        try:
            tmp.write_bytes(os.urandom(RESERVE_BYTES))  # incompressible: a compressing filesystem keeps it whole
            os.replace(tmp, self.reserve)
        except OSError:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _locked(self, *, wait: bool = True) -> Iterator[bool]:
        """Hold ``rejected.jsonl.lock``; without ``wait``, only if nobody holds it (yields whether it is held)."""
        # Closed on leaving, which releases the flock; a child forked meanwhile does not keep it held (brief_locks).
        with brief_open(self.path.with_name(self.path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600) as fd:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True

    def redrive(
        self, select: Callable[[dict[str, Any]], bool], append: Callable[[bytes], None]
    ) -> list[dict[str, Any]]:
        """Hand the line of every selected record to ``append`` (the spool: the flusher delivers it again), then
        drop those records from the file; returns them. A crash in between leaves a record both spooled and
        dead-lettered: redriving it again only counts a duplicate (ingest is idempotent on event_id)."""
        with self._locked():
            lines = self._lines()
            taken = _once([record for _, record in lines if record is not None and select(record)])
            if not taken:
                return []
            for record in taken:
                append(str(record["line"]).encode("utf-8"))
            # Kept as they were: the records not selected (nor a repeat of one: see _once), and lines that are not
            # records (never dropped).
            gone = {_identity(record) for record in taken}
            self._rewrite(
                b"".join(raw + b"\n" for raw, record in lines if record is None or _identity(record) not in gone)
            )
        return taken

    def _rewrite(self, kept: bytes) -> None:
        """Replace the file with ``kept`` (under the lock): all of it, or (a short write, the disk full) unchanged."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, kept)  # a short write (disk full) raises: the file is never replaced by a part of it
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, self.path)

    def write(self, slot: str, segment: int, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        now = utcnow().isoformat()
        with self._locked():
            try:
                self._append(slot, segment, rejected, now)
            except OSError as exc:
                if exc.errno not in DISK_FULL or not self._release_reserve():
                    raise
                self._append(slot, segment, rejected, now)  # in the space the reserve held

    def _release_reserve(self) -> bool:
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return False
        log.warning("spool: the disk is full; the space kept aside for dead letters (%s) is used", self.reserve)
        return True

    def _append(self, slot: str, segment: int, rejected: list[Rejected], now: str) -> None:
        """All the records, or (the disk full) none: a short write is cut off again and raises, so the flusher
        keeps the batch and retries it. A line another writer left torn (a crash) is ended first, so it stays
        one unreadable line and the records after it stay readable."""
        data = b"".join(
            orjson.dumps(
                {
                    "rejected_at": now,
                    "slot": slot,
                    "segment": segment,
                    "offset": item.offset,
                    "event_id": item.event_id,
                    "reason": item.reason,
                    "line": item.line.decode("utf-8", errors="replace"),
                }
            )
            + b"\n"
            for item in rejected
        )
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by a crash: never glue a record to it
                data = b"\n" + data
            try:
                _write_all(fd, data)
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        """Every record; a line that is not one (left by a crash mid-write, or an edit) is skipped with a warning,
        never a reason to refuse the others."""
        return _once([record for _, record in self._lines() if record is not None])

    def _lines(self) -> list[tuple[bytes, dict[str, Any] | None]]:
        """Each non-empty line with its record (None: not a record)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines: list[tuple[bytes, dict[str, Any] | None]] = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                log.warning("%s:%d is not a dead-letter record; skipped", self.path, number)
                record = None
            lines.append((line, record))
        return lines


def _identity(record: dict[str, Any]) -> tuple[str, str, str, str]:
    """What makes a dead letter the one it is: its line and where it was read (slot, segment, offset)."""
    return (str(record.get("slot")), str(record.get("segment")), str(record.get("offset")), str(record.get("line")))


def _once(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records without repeats of an earlier one (the same line from the same place): a flusher killed after it
    dead-lettered a batch's lines, before its cursor passed them, dead-letters them again when the batch is replayed;
    each was counted by ``spool status``, listed and redriven twice."""
    seen: set[tuple[str, str, str, str]] = set()
    unique = []
    for record in records:
        if (identity := _identity(record)) not in seen:
            seen.add(identity)
            unique.append(record)
    return unique


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written: a short write is retried, and a full disk raises."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, f"could not write to the spool's dead letters (wrote {written} bytes)")
        view = view[written:]
