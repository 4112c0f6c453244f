"""Descriptors that hold an ``flock`` for a moment (dead letters being written, a cursor read or written over): a
process forked meanwhile by another thread (a prefork server, a task queue) got a copy of the descriptor, which
nothing in the child closes, so the lock stayed held for the child's whole life and the parent's next wait for it
(its flusher dead-lettering) hung. Registered while open; closed in the child of a fork.

Opening and registering, and unregistering and closing, are each one step under ``_GUARD``, which a fork takes
first: a child forked between the ``open`` and the registration kept an unregistered copy, and the lock the parent
took next on the open file they share stayed held by that copy (likewise between the unregistration and the close)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HELD: set[int] = set()
_GUARD = threading.Lock()  # never held across anything but an open or a close: a fork waits for it


@contextmanager
def brief_open(path: Path | str, flags: int, mode: int = 0o600) -> Iterator[int]:
    """``os.open(path, flags, mode)``, closed on leaving (releasing any ``flock`` taken on it); a descriptor that a
    child of a fork meanwhile gets is closed there. Raises what ``os.open`` raises."""
    with _GUARD:
        fd = os.open(path, flags, mode)
        _HELD.add(fd)
    try:
        yield fd
    finally:
        with _GUARD:
            _HELD.discard(fd)
            os.close(fd)


def _before_fork() -> None:
    _GUARD.acquire()


def _after_fork_in_parent() -> None:
    _GUARD.release()


def _after_fork_in_child() -> None:
    global _GUARD
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's own descriptor keeps the lock for as long as the parent holds it
    _HELD.clear()
    _GUARD = threading.Lock()  # (the inherited one is held, taken by this thread before the fork)


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
