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


class ForkGuard:
    """A lock a fork of this process waits for (``with guard:``): held only from taking a descriptor to recording it
    where the fork hooks close it, or from forgetting one to closing it, so that no child is forked in between. The
    forking thread takes it before the fork and lets it go after it in the parent; the child gets a new one (the
    inherited one is held, by a thread the child does not have). Its before-hook runs before those of the guards
    made earlier (``os.register_at_fork`` runs them in reverse order): a guard taken inside another must be made
    first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        os.register_at_fork(before=self._acquire, after_in_parent=self._release, after_in_child=self._renew)

    def __enter__(self) -> ForkGuard:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def _acquire(self) -> None:
        self._lock.acquire()

    def _release(self) -> None:
        self._lock.release()

    def _renew(self) -> None:
        self._lock = threading.Lock()


_HELD: set[int] = set()
_GUARD = ForkGuard()  # never held across anything but an open or a close


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


def _after_fork_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's own descriptor keeps the lock for as long as the parent holds it
    _HELD.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
