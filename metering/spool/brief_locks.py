"""Descriptors that hold an ``flock`` for a moment (dead letters being written, a cursor read or written over): a
process forked meanwhile by another thread (a prefork server, a task queue) got a copy of the descriptor, which
nothing in the child closes, so the lock stayed held for the child's whole life and the parent's next wait for it
(its flusher dead-lettering) hung. Registered while held; closed in the child of a fork."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

_HELD: set[int] = set()


@contextmanager
def brief(fd: int) -> Iterator[int]:
    """While in it, ``fd`` (which the caller closes afterwards) is closed in the child of a fork."""
    _HELD.add(fd)
    try:
        yield fd
    finally:
        _HELD.discard(fd)  # before the caller closes it: a child never closes a number reused meanwhile


def _after_fork_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's own descriptor keeps the lock for as long as the parent holds it
    _HELD.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
