"""Spool writer: one ``os.write`` per event to an ``O_APPEND`` segment in a slot this process owns.

Once ``append`` returns, the event is in the kernel's page cache and survives the process being killed
(SIGKILL); with ``fsync=True`` it also survives power loss, at a far higher cost per call.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import weakref
from pathlib import Path
from types import TracebackType

from metering.errors import SpoolError
from metering.spool.brief_locks import ForkGuard
from metering.spool.decode import DeadLetters
from metering.spool.segments import (
    DEAD_LETTER_NAME,
    LOCK_NAME,
    SLOT_PREFIX,
    Cursor,
    ensure_cursor,
    list_segments,
    read_cursor,
    segment_name,
)

DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
MAX_SLOTS = 4096


def try_lock(path: Path) -> int | None:
    """Open ``path`` and take an exclusive, non-blocking flock; the fd, or None if someone holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lock_free(path: Path) -> bool:
    """Whether nobody holds the flock on ``path`` (taken and let go at once, a fork waiting: see ``fork_guard``).
    Opened read-only, never created (a lock file nobody made is held by nobody): opened for writing, a probe on a
    read-only filesystem (``metering spool status``) raised OSError. A lock another user made (0600) still raises
    PermissionError: ``spool status`` says so in one line."""
    with fork_guard():
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
    return True


def fork_guard() -> ForkGuard:
    """Hold it from taking a lock descriptor to recording it where the fork hooks close it (and from forgetting one
    to closing it): a fork waits for it, so no child keeps a copy of one, holding the lock for its whole life."""
    return _FORK_GUARD


class Spool:
    """The appending side of the spool. Thread-safe; one slot (``writer-N/``) per open Spool."""

    def __init__(
        self, directory: Path | str, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES, fsync: bool = False
    ) -> None:
        if segment_bytes < 4096:
            raise ValueError("segment_bytes must be at least 4096")
        self.root = Path(directory)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.slot_dir: Path | None = None
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._seq = 0
        self._size = 0
        self._end = (0, 0)  # (segment, offset) just past the last append (see position()); a tuple: the hot path
        self._has_cursor = False
        self._closed = True

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> Spool:
        _OPEN.add(self)  # before its lock is taken: a child forked from now on replaces it (_after_fork_in_child)
        with self._lock:
            self._claim()
        return self

    def _claim(self) -> None:
        """Claim a free slot and start a new segment in it. A fork waits for it (``fork_guard``): a child forked
        meanwhile copied the slot's lock descriptor before the spool recorded it, and nothing there closed it."""
        with fork_guard():
            self._claim_slot()

    def _claim_slot(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for index in range(MAX_SLOTS):
                slot = self.root / f"{SLOT_PREFIX}{index}"
                slot.mkdir(exist_ok=True)
                fd = try_lock(slot / LOCK_NAME)
                if fd is not None:
                    break
            else:
                raise SpoolError(f"no free spool slot under {self.root} ({MAX_SLOTS} writers hold one)")
        except OSError as exc:
            raise SpoolError(f"cannot open the spool at {self.root}: {exc}") from exc
        self.slot_dir, self._lock_fd = slot, fd
        # A cursor file to write over when the disk is full (segments.write_cursor); claimed on a full disk, the slot
        # gets it at an append (before the event takes the room): without it, once its events filled the disk, its
        # flusher could never acknowledge them, delete a segment, and so free the disk.
        self._has_cursor = ensure_cursor(slot)
        DeadLetters(self.root / DEAD_LETTER_NAME).keep_reserve()  # and room for dead letters, drainer or not
        try:
            # Never append to a segment left by a previous owner: it may end with a torn line.
            self._seq = max([*list_segments(slot), read_cursor(slot).segment, 0]) + 1
            self._open_segment()
            self._end = (self._seq, self._size)
        except OSError as exc:
            os.close(fd)  # the slot is free again
            self.slot_dir, self._lock_fd = None, None
            raise SpoolError(f"cannot open a segment in the spool at {slot}: {exc}") from exc
        self._closed = False

    def _after_fork_in_child(self) -> None:
        """The slot, its lock and its segment stay the parent's: the child claims a slot of its own at its first
        append. Appending to the inherited segment lost events: the parent, which tracks only its own appends,
        rotated, and its flusher deleted that segment once delivered, under the child's later appends."""
        self._lock = threading.Lock()  # another thread of the parent may have held it at the fork: held for ever here
        if self._closed:
            return
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)  # the parent's own descriptor keeps its slot locked
        self._fd = self._lock_fd = None
        self.slot_dir = None
        self._seq = self._size = 0
        self._end = (0, 0)

    def close(self) -> None:
        with self._lock, fork_guard():  # a child forked between the close and forgetting it: see fork_guard
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock: the slot can be claimed or drained
                self._lock_fd = None

    def __enter__(self) -> Spool:
        return self if not self._closed else self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def current_segment(self) -> int:
        """The segment being appended to; every lower-numbered segment in the slot is complete."""
        return self._seq

    def position(self) -> Cursor:
        """Just past the last append (at first, the start of the slot's first segment): everything before it has been
        written. Not where the next one lands: after a rotation that could not create the next segment, that one is
        not there yet, and a drainer in another process cannot tell that the full one is finished; a flush() waited
        for a cursor past it, which no flusher wrote, to its timeout."""
        with self._lock:
            return Cursor(*self._end)

    # -- appending -----------------------------------------------------------------------------

    def append(self, line: bytes) -> None:
        """Durably append one serialised event (a single line of JSON without a newline)."""
        if b"\n" in line:
            raise ValueError("a spool line must not contain a newline")
        self.append_line(line + b"\n")

    def append_line(self, data: bytes) -> None:
        """``append`` for data that already is exactly one line ending in ``\\n`` (e.g. orjson's
        ``OPT_APPEND_NEWLINE`` output, which never contains another newline): one ``write``, no copy."""
        with self._lock:
            if self._closed:
                raise SpoolError("the spool is closed")
            if self.slot_dir is None:  # opened before this process was forked from its parent
                self._claim()
            if not self._has_cursor:
                assert self.slot_dir is not None
                self._has_cursor = ensure_cursor(self.slot_dir)
            clean = False  # the segment is known to end where it did before this append
            try:
                if self._fd is None:  # a previous rotation could not open a segment: retry now
                    self._open_segment()
                assert self._fd is not None
                try:
                    written = os.write(self._fd, data)
                except OSError:
                    clean = True  # nothing was written (a write that wrote some bytes returns their count)
                    raise
                if written != len(data):  # a short write on a regular file: the disk is full
                    # Cut the partial line off again (this process alone writes to the segment): it would need a
                    # dead letter, which a full disk refuses too, and the flusher could never get past it.
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, self._size)
                        clean = True
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
                if self.fsync:
                    os.fdatasync(self._fd)
            except OSError as exc:
                # Whatever reached the file and could not be cut off is a torn line: leave it in a finished
                # segment, where the reader dead-letters it, and carry on in a fresh one. A segment with events is
                # finished too (the flusher deletes it once delivered: that frees a full disk), but a fresh one the
                # refusal left empty is kept: rotating it again at each refused call left an empty file per call.
                if not clean or self._size > 0:
                    self._rotate()
                raise SpoolError(f"could not append the usage event to the spool: {exc}") from exc
            self._size += written
            self._end = (self._seq, self._size)  # not a Cursor: 0.3 µs an append, built by position() instead
            if self._size >= self.segment_bytes:
                self._rotate()

    def _open_segment(self) -> None:
        assert self.slot_dir is not None
        path = self.slot_dir / segment_name(self._seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._seq, self._size = self._seq + 1, 0  # the next append lands there, though it may not be opened now
        try:
            self._open_segment()
        except OSError:
            self._fd = None  # the next append retries, and raises SpoolError if it still cannot


# Open spools, for the child of a fork (a prefork server or task queue): see ``Spool._after_fork_in_child``.
_OPEN: weakref.WeakSet[Spool] = weakref.WeakSet()
# See fork_guard; a fork takes it first. (Made after spool.brief_locks' guard, whose lock a slot's claim
# takes inside this one: registered after it, since this module imports that one.)
_FORK_GUARD = ForkGuard()


def _after_fork_in_child() -> None:
    for spool in list(_OPEN):
        spool._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
