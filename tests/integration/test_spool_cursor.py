"""The cursor file as other processes read it while a flusher writes it (no database)."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

from metering.events import UsageEvent
from metering.spool import DeliveryResult, Flusher, Spool
from metering.spool.segments import READER_LOCK_NAME
from metering.spool.writer import try_lock
from tests.fakes.events import record


class NoSink:
    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        raise AssertionError("another process's flusher holds the slot: this one delivers nothing")


def _waiting_for_lock_on(path: Path) -> bool:
    """Whether some process waits for an flock on ``path`` (a ``->`` line of /proc/locks names its inode)."""
    inode = f":{os.stat(path).st_ino} "
    with open("/proc/locks") as locks:
        return any("->" in line and inode in line for line in locks)


def test_a_flush_never_takes_a_cursor_half_written_over_in_place_as_reached(tmp_path: Path) -> None:
    """On a full disk the drainer writes the cursor over the old one's bytes; a writer's flush() reading it meanwhile
    saw the new segment number followed by the old offset (a torn read), a position past its events, and returned
    True though the drainer had acknowledged only the first of them. The in-place write now holds an flock that
    readers take too: the torn bytes below, under that lock, are what such a reader met half-way through it."""
    if not Path("/proc/locks").exists():
        pytest.skip("needs /proc/locks to see the reader wait")
    slot = tmp_path / "writer-0"
    slot.mkdir()
    (slot / "cursor").write_bytes(b'{"segment":0,"offset":99999}')  # what the drainer acknowledged before
    with Spool(tmp_path) as spool:
        assert spool.current_segment == 1
        for i in range(3):
            spool.append(orjson.dumps(record(i)))
        first_line = len(orjson.dumps(record(0))) + 1
        assert spool.position().offset < 99999  # the old offset lies past every event of the new segment
        drainer = try_lock(slot / READER_LOCK_NAME)  # the drainer (another process) holds the slot
        assert drainer is not None
        fd = os.open(slot / "cursor", os.O_WRONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # the drainer's in-place write of (1, first_line) ...
        os.pwrite(fd, b'{"segment":1,"offset":', 0)  # ... half-way: the old offset still follows
        result: list[bool] = []
        waiting = threading.Thread(target=lambda: result.append(Flusher(spool, NoSink()).flush(timeout=0.5)))
        waiting.start()
        while waiting.is_alive() and not _waiting_for_lock_on(slot / "cursor"):
            waiting.join(0.01)
        os.pwrite(fd, f'{{"segment":1,"offset":{first_line}}}'.encode().ljust(28), 0)  # the write completes
        os.close(fd)
        waiting.join()
        os.close(drainer)
    assert result == [False]  # two of its three events are not acknowledged yet


class ListSink:
    def __init__(self) -> None:
        self.ids: list[str] = []

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        self.ids += [str(e.event_id) for e in events]
        return DeliveryResult(inserted=len(events), duplicates=0)


def test_a_flush_waiting_for_a_drainers_cursor_delivers_itself_once_the_drainer_lets_the_slot_go(
    tmp_path: Path,
) -> None:
    """A writer's flush() without a flusher thread (METERING_SPOOL__FLUSHER=external) found a drainer holding its slot
    and waited for its cursor; the drainer stopped (a deploy stops both) before it had read the last events, and the
    flush waited to its timeout and returned False, the events left behind, though nothing held the slot any more."""
    if not Path("/proc/locks").exists():
        pytest.skip("needs /proc/locks to see the flush wait")
    with Spool(tmp_path) as spool:
        assert spool.slot_dir is not None
        events = [record(i) for i in range(3)]
        for event in events:
            spool.append(orjson.dumps(event))
        drainer = try_lock(spool.slot_dir / READER_LOCK_NAME)  # the drainer (another process) holds the slot
        assert drainer is not None
        cursor = os.open(spool.slot_dir / "cursor", os.O_WRONLY)
        fcntl.flock(cursor, fcntl.LOCK_EX)  # the drainer writing its cursor: the flush's next look waits for it
        sink = ListSink()
        result: list[bool] = []
        flushing = threading.Thread(target=lambda: result.append(Flusher(spool, sink).flush(timeout=30)))
        flushing.start()
        while flushing.is_alive() and not _waiting_for_lock_on(spool.slot_dir / "cursor"):
            flushing.join(0.01)
        os.close(drainer)  # the drainer stops, the cursor where it was (at the start)
        os.close(cursor)
        flushing.join()
    assert result == [True]
    assert sink.ids == [str(e["event_id"]) for e in events]
