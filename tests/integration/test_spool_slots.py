"""The flusher across slots: one slot's trouble never holds up another's, and refused events are dead-lettered once
the sink is known to work. Cases found by a hunt (each failed before the fix)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

from metering.events import UsageEvent
from metering.spool import DeliveryResult, Flusher, Spool, flusher
from metering.spool.decode import DeadLetters
from metering.spool.inspect import slot_states
from metering.spool.sink import RefusedBatchError
from tests.fakes.events import record


class MemorySink:
    """Stores events in memory; refuses (as a service answering 500 would) any batch holding a poisoned id."""

    def __init__(self, poison: set[str] | None = None) -> None:
        self.poison = poison or set()
        self.stored: set[str] = set()

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        if any(str(e.event_id) in self.poison for e in events):
            raise RefusedBatchError("the service refuses (500): internal_error")
        new = {str(e.event_id) for e in events} - self.stored
        self.stored |= new
        return DeliveryResult(inserted=len(new), duplicates=len(events) - len(new))


def ids(records: list[dict]) -> set[str]:
    return {str(r["event_id"]) for r in records}


def dead_letters(root: Path) -> set[str]:
    return {r["event_id"] for r in DeadLetters(root / "rejected.jsonl").read()}


@pytest.mark.parametrize("bad_slot", [0, 1])  # the good slot drained after, or before, the bad one in a pass
def test_a_bad_last_event_of_a_dead_slot_holds_up_no_other_slot_and_is_dead_lettered(
    tmp_path: Path, bad_slot: int
) -> None:
    bad = record(0)
    with Spool(tmp_path) as s0, Spool(tmp_path) as s1:  # writer-0 and writer-1, both gone afterwards
        bad_spool, good_spool = (s0, s1) if bad_slot == 0 else (s1, s0)
        bad_spool.append(orjson.dumps(record(1)))
        bad_spool.append(orjson.dumps(bad))
        good = [record(i) for i in range(5)]
        for r in good:
            good_spool.append(orjson.dumps(r))
    sink = MemorySink({str(bad["event_id"])})
    drainer = Flusher(tmp_path, sink, batch_size=1, interval_s=0.05, max_backoff_s=0.05)
    assert drainer.flush(timeout=10)  # writer-0's bad event is refused, but the sink took writer-1's: its own fault
    drainer.stop(drain=False)
    assert ids(good) <= sink.stored
    assert dead_letters(tmp_path) == {str(bad["event_id"])}


def test_a_bad_last_event_of_an_idle_live_writer_holds_up_no_other_writer(tmp_path: Path) -> None:
    bad = record(0)
    with Spool(tmp_path) as s0, Spool(tmp_path) as s1:
        s0.append(orjson.dumps(bad))  # alive, then idle
        sink = MemorySink({str(bad["event_id"])})
        drainer = Flusher(tmp_path, sink, interval_s=0.05, max_backoff_s=0.05).start()
        good = [record(i) for i in range(3)]
        for r in good:
            s1.append(orjson.dumps(r))
        deadline = time.monotonic() + 10
        while not ids(good) <= sink.stored and time.monotonic() < deadline:
            time.sleep(0.05)
        drainer.stop(drain=False)
    assert ids(good) <= sink.stored


def test_a_second_bad_event_just_behind_a_lone_one_sticks_nothing(tmp_path: Path) -> None:
    """One refused event last in its segment, another in the next one: the look at what follows sent that batch
    whole, it was refused too, and the slot was stuck for good."""
    records = [record(i) for i in range(40)]
    with Spool(tmp_path, segment_bytes=4096) as spool:
        for r in records:
            spool.append(orjson.dumps(r))
        segments = sorted(spool.slot_dir.glob("*.jsonl"))
    first = segments[0].read_bytes().count(b"\n")
    assert 2 < first < 30 and len(segments) > 1
    poison = {str(records[first - 1]["event_id"]), str(records[first + 3]["event_id"])}
    sink = MemorySink(poison)
    drainer = Flusher(tmp_path, sink, batch_size=first - 1, interval_s=0.05, max_backoff_s=0.05)
    assert drainer.flush(timeout=10)
    drainer.stop(drain=False)
    assert ids(records) - poison <= sink.stored
    assert dead_letters(tmp_path) == poison


def test_a_removed_drained_slot_directory_stops_nothing(tmp_path: Path) -> None:
    with Spool(tmp_path) as s0:
        s1 = Spool(tmp_path).open()
        s0.append(orjson.dumps(record(0)))
    sink = MemorySink()
    drainer = Flusher(tmp_path, sink, interval_s=0.05, max_backoff_s=0.05).start()
    try:
        assert drainer.flush(timeout=5)
        shutil.rmtree(tmp_path / "writer-0")  # an operator removes the dead, drained slot
        later = [record(i) for i in range(3)]
        for r in later:
            s1.append(orjson.dumps(r))
        assert drainer.flush(timeout=5)
    finally:
        drainer.stop(drain=False)
        s1.close()
    assert ids(later) <= sink.stored


def test_more_slots_than_locks_held_at_once_are_all_drained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader lock is a file descriptor: 1,100 slots under `ulimit -n 1024` delivered nothing. Drained slots
    without a writer are released, and at most MAX_HELD_SLOTS are held at once."""
    monkeypatch.setattr(flusher, "MAX_HELD_SLOTS", 4)
    records = []
    spools = [Spool(tmp_path).open() for _ in range(10)]  # ten slots, each with one event, then closed
    for spool in spools:
        records.append(r := record(0))
        spool.append(orjson.dumps(r))
    for spool in spools:
        spool.close()
    sink = MemorySink()
    drainer = Flusher(tmp_path, sink, interval_s=0.05, max_backoff_s=0.05)
    for _ in range(5):
        drainer.flush(timeout=5)
    drainer.stop(drain=False)
    assert ids(records) <= sink.stored
    assert all(state.pending == 0 for state in slot_states(tmp_path))


def test_slots_beyond_the_locks_held_at_once_are_drained_though_live_writers_hold_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live writers' slots are never released as idle: they used up the locks and a dead slot's event was never
    delivered while flush() said done (found by a review)."""
    monkeypatch.setattr(flusher, "MAX_HELD_SLOTS", 2)
    with Spool(tmp_path) as s0, Spool(tmp_path) as s1:
        s0.append(orjson.dumps(record(0)))
        s1.append(orjson.dumps(record(1)))
        with Spool(tmp_path) as s2:
            late = record(2)
            s2.append(orjson.dumps(late))
        sink = MemorySink()
        drainer = Flusher(tmp_path, sink, interval_s=0.05, max_backoff_s=0.05)
        assert drainer.flush(timeout=10)
        drainer.stop(drain=False)
        assert str(late["event_id"]) in sink.stored and len(sink.stored) == 3


def test_the_last_segment_of_a_writer_that_died_once_drained_is_deleted(tmp_path: Path) -> None:
    """A drainer read a live writer's newest segment to its end (the cursor at its end, the segment kept: the writer
    appends to it); the writer then died. The slot had nothing unread, so no drainer claimed it again and the
    segment stayed on disk for good (`spool status`: one segment, until a writer took the slot again)."""
    sink = MemorySink()
    with Spool(tmp_path) as spool:
        records = [record(i) for i in range(3)]
        for r in records:
            spool.append(orjson.dumps(r))
        live = Flusher(tmp_path, sink)  # another process's drainer: the writer is alive
        assert live.flush(timeout=10)
        live.stop(drain=False)
        assert [s.segments for s in slot_states(tmp_path)] == [1]  # kept: the writer still appends to it
    drainer = Flusher(tmp_path, sink)  # the writer is gone
    assert drainer.flush(timeout=10)
    drainer.stop(drain=False)
    assert sink.stored == ids(records)
    assert [(s.segments, s.pending) for s in slot_states(tmp_path)] == [(0, 0)]


def test_a_flush_without_a_thread_keeps_its_timeout_on_a_dead_writers_backlog(tmp_path: Path) -> None:
    """`metering spool drain --timeout 1` (and a writer's flush at exit, with no flusher thread) drained a dead
    writer's slot to its end before looking at the clock: a backlog ran past the timeout, for as long as it took."""

    class SlowSink(MemorySink):
        def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
            time.sleep(0.02)
            return super().deliver(events)

    records = [record(i) for i in range(200)]
    with Spool(tmp_path) as spool:  # gone afterwards: a dead writer's slot, 200 batches of one at 20 ms each
        for r in records:
            spool.append(orjson.dumps(r))
    sink = SlowSink()
    drainer = Flusher(tmp_path, sink, batch_size=1)
    started = time.monotonic()
    assert drainer.flush(timeout=0.5) is False
    assert time.monotonic() - started < 2.0
    assert 0 < len(sink.stored) < len(records)
    assert drainer.flush(timeout=30)  # the rest, later: nothing lost, nothing doubled
    drainer.stop(drain=False)
    assert sink.stored == ids(records)
    assert [(s.segments, s.pending) for s in slot_states(tmp_path)] == [(0, 0)]
