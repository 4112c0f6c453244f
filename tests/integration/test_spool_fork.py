"""A process that forks with an open spool (a prefork server or task queue, multiprocessing's fork) and whose child
meters calls: the child's appends are delivered like the parent's (no database)."""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from metering.events import UsageEvent
from metering.spool import DeliveryResult, Flusher, Spool
from metering.spool import flusher as flusher_module
from metering.spool import writer as writer_module
from metering.spool.decode import DeadLetters
from metering.spool.segments import READER_LOCK_NAME
from tests.fakes.events import record


class FileSink:
    """Appends the ids it is given to a file, so that what a child process delivered is seen by the test."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        with open(self.path, "a") as out:
            out.writelines(f"{e.event_id}\n" for e in events)
        return DeliveryResult(inserted=len(events), duplicates=0)

    def ids(self) -> list[str]:
        return self.path.read_text().split() if self.path.exists() else []


class LingeringChild:
    """Children forked by ``fork()`` (from any thread) that live on, as prefork workers do, until ``end()``."""

    def __init__(self) -> None:
        self._go_r, self._go_w = os.pipe()
        self._out_r, self._out_w = os.pipe()
        self.pids: list[int] = []

    def fork(self) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child: lives on until told to exit)
            os.write(self._out_w, b"x")
            os.read(self._go_r, 1)
            os._exit(0)
        self.pids.append(pid)

    def wait_running(self) -> None:
        """Until a child runs (its fork hooks have run)."""
        os.read(self._out_r, 1)

    def end(self) -> None:
        os.write(self._go_w, b"x" * max(1, len(self.pids)))
        for pid in self.pids:
            os.waitpid(pid, 0)
        for fd in (self._go_r, self._go_w, self._out_r, self._out_w):
            os.close(fd)


def _in_child(body: Callable[[], object], *, before: Callable[[], None] | None = None) -> str:
    """Fork; the child waits for the parent's ``before`` (if any), runs ``body`` and reports its result, or its
    error, through a pipe. The parent kills a child that reports nothing in 30 s (a deadlock) and fails."""
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.read(go_r, 1)
            report = f"ok {body()}"
        except BaseException as exc:
            report = f"error {type(exc).__name__}: {exc}"
        os.write(out_w, report.encode())
        os._exit(0)
    os.close(out_w)
    if before is not None:
        before()
    os.write(go_w, b"x")
    ready, _, _ = select.select([out_r], [], [], 30)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    report = os.read(out_r, 4096).decode() if ready else "no report: the child hung"
    for fd in (go_r, go_w, out_r):
        os.close(fd)
    return report


def test_an_event_a_forked_child_appends_after_the_parent_rotated_is_delivered(tmp_path: Path) -> None:
    """The child appended to the segment it inherited, while the parent, its flusher seeing that segment finished
    (the parent had rotated), delivered it and deleted it: the child's append returned, and its event was lost.
    The child now claims a slot of its own at its first append."""
    sink = FileSink(tmp_path / "delivered")
    child_event = record(999)
    appended = [record(0)]
    with Spool(tmp_path / "spool", segment_bytes=4096) as spool:
        spool.append(orjson.dumps(appended[0]))
        flusher = Flusher(spool, sink)

        def parent_rotates_and_flushes() -> None:
            while spool.current_segment == 1:
                appended.append(record(len(appended)))
                spool.append(orjson.dumps(appended[-1]))
            assert flusher.flush(timeout=10)

        assert _in_child(lambda: spool.append(orjson.dumps(child_event)), before=parent_rotates_and_flushes) == (
            "ok None"
        )
        assert flusher.flush(timeout=10), flusher.stats.last_error
        flusher.stop()
    assert sorted(sink.ids()) == sorted(str(r["event_id"]) for r in [*appended, child_event])


def test_a_child_forked_while_another_thread_appends_can_append(tmp_path: Path) -> None:
    """A thread of the parent held the spool's lock (mid-append) when another forked: the child inherited it held,
    and its first append waited for ever."""
    sink = FileSink(tmp_path / "delivered")
    with Spool(tmp_path / "spool") as spool:
        held, release = threading.Event(), threading.Event()

        def appending() -> None:
            with spool._lock:  # as an append in progress holds it
                held.set()
                release.wait()

        thread = threading.Thread(target=appending)
        thread.start()
        held.wait()
        child_event = record(1)
        report = _in_child(lambda: spool.append(orjson.dumps(child_event)))
        release.set()
        thread.join()
        assert report == "ok None"
        flusher = Flusher(spool, sink)
        assert flusher.flush(timeout=10), flusher.stats.last_error
        flusher.stop()
    assert sink.ids() == [str(child_event["event_id"])]


def test_a_childs_flusher_neither_hangs_nor_drains_the_slots_the_parents_flusher_holds(tmp_path: Path) -> None:
    """The child inherited the flusher's reader locks (file descriptors: held by the child too), so its flush()
    drained the parent's slots alongside the parent's flusher (two flushers on one slot); and, when the parent's
    flusher thread was in a pass at the fork, the lock of that pass, held for ever in the child, hung its flush()."""
    parent_sink, child_sink = FileSink(tmp_path / "parent"), FileSink(tmp_path / "child")
    events = [record(i) for i in range(3)]
    with Spool(tmp_path / "spool") as spool:
        flusher = Flusher(spool, parent_sink)
        spool.append(orjson.dumps(events[0]))
        assert flusher.flush(timeout=10)  # the flusher holds its slot's reader lock from now on
        spool.append(orjson.dumps(events[1]))  # not delivered yet
        flusher.sink = child_sink  # what the child's copy of the flusher delivers to
        with flusher._pass_lock:  # the parent's flusher thread in a pass at the fork
            report = _in_child(lambda: (spool.append(orjson.dumps(events[2])), flusher.flush(timeout=10))[1])
        flusher.sink = parent_sink
        assert report == "ok True"
        assert flusher.flush(timeout=10), flusher.stats.last_error
        flusher.stop()
    # The child delivered its own event (its slot), and the parent's flusher the parent's: none twice.
    assert child_sink.ids() == [str(events[2]["event_id"])]
    assert sorted(parent_sink.ids()) == sorted(str(e["event_id"]) for e in events[:2])


def test_a_child_forked_while_a_thread_held_the_dead_letters_lock_does_not_keep_it(tmp_path: Path) -> None:
    """A thread of the parent held the dead letters' lock (writing dead letters, putting the reserve aside) when
    another forked: the child's copy of that descriptor, which nothing there closes, kept the lock held for the
    child's whole life, and the parent's next dead letter (or redrive) waited for it: the flusher hung."""
    letters = DeadLetters(tmp_path / "rejected.jsonl")
    held, release = threading.Event(), threading.Event()

    def writing_dead_letters() -> None:
        with letters._locked():
            held.set()
            release.wait()

    thread = threading.Thread(target=writing_dead_letters)
    thread.start()
    held.wait()
    child = LingeringChild()
    child.fork()
    try:
        child.wait_running()
        release.set()
        thread.join()
        with letters._locked(wait=False) as locked:  # the parent's thread let it go: nobody holds it now
            assert locked
    finally:
        child.end()


# A test's own step in every fork of this process (os.register_at_fork has no way to undo a registration): registered
# after the spool's hooks, it runs before theirs.
_BEFORE_FORK: list[Callable[[], None]] = []
os.register_at_fork(before=lambda: [step() for step in _BEFORE_FORK])


def test_a_child_forked_as_a_thread_opened_the_dead_letters_lock_does_not_keep_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread of the parent had opened the dead letters' lock file but not yet registered the descriptor (nor taken
    the lock) when another thread forked: the child kept a copy the fork hook did not close, the thread then locked
    the shared open file, and its close did not release the lock, held by the child's copy for the child's whole life.
    A fork now waits for a thread between opening such a descriptor and registering it."""
    letters = DeadLetters(tmp_path / "rejected.jsonl")
    lock_path = str(tmp_path / "rejected.jsonl.lock")
    opened, proceed, forking = threading.Event(), threading.Event(), threading.Event()
    real_open = os.open

    def pausing_open(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        fd = real_open(path, flags, mode, **kwargs)
        if str(path) == lock_path and threading.current_thread() is writer:
            opened.set()
            proceed.wait()
        return fd

    def writing_dead_letters() -> None:
        with letters._locked():
            pass

    writer = threading.Thread(target=writing_dead_letters)
    monkeypatch.setattr(os, "open", pausing_open)
    _BEFORE_FORK.append(forking.set)
    child = LingeringChild()
    forker = threading.Thread(target=child.fork)
    try:
        writer.start()
        opened.wait()
        forker.start()
        forking.wait()  # the fork is under way (this step runs before the spool's own)
        proceed.set()
        writer.join()
        forker.join()
        child.wait_running()
        with letters._locked(wait=False) as locked:  # the parent's thread let it go: nobody holds it now
            assert locked
    finally:
        _BEFORE_FORK.clear()
        proceed.set()
        child.end()


def test_a_child_forked_while_another_thread_opens_the_spool_can_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread of the parent was opening the spool (its lock held, its slot being claimed) when another forked: the
    spool was not yet among those the fork hook resets, so the child inherited its lock held by a thread it does not
    have, and its first append hung for good (it also kept the slot's lock). A fork now waits for a slot's claim."""
    spool = Spool(tmp_path / "spool")
    claiming, proceed, forking = threading.Event(), threading.Event(), threading.Event()
    real_try_lock = writer_module.try_lock

    def pausing_try_lock(path: Path) -> int | None:
        fd = real_try_lock(path)
        if threading.current_thread() is opener:
            claiming.set()
            proceed.wait()
        return fd

    monkeypatch.setattr(writer_module, "try_lock", pausing_try_lock)
    opener = threading.Thread(target=spool.open)
    reports: list[str] = []

    def fork() -> None:
        reports.append(_in_child(lambda: spool.append(orjson.dumps(record(1)))))

    forker = threading.Thread(target=fork)
    _BEFORE_FORK.append(forking.set)
    try:
        opener.start()
        claiming.wait()
        forker.start()
        forking.wait()  # the fork is under way (this step runs before the spool's own)
        proceed.set()
        opener.join()
        forker.join()
    finally:
        _BEFORE_FORK.clear()
        proceed.set()
        spool.close()
    assert reports == ["ok None"]


def test_a_child_forked_as_the_flusher_took_a_reader_lock_does_not_keep_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flusher's thread had taken a slot's reader lock but not yet recorded its descriptor (every pass claims the
    slots with something to read) when another thread forked: the child kept a copy its fork hook did not close, so
    the lock stayed held for the child's whole life once the parent let it go, and no flusher or drainer could
    deliver that slot any more. A fork now waits for a lock being taken and recorded (or forgotten and closed)."""
    sink = FileSink(tmp_path / "delivered")
    spool = Spool(tmp_path / "spool").open()
    event = record(1)
    spool.append(orjson.dumps(event))
    assert spool.slot_dir is not None
    reader_lock = spool.slot_dir / READER_LOCK_NAME
    flusher = Flusher(spool, sink)
    locked, proceed, forking = threading.Event(), threading.Event(), threading.Event()
    real_try_lock = flusher_module.try_lock

    def pausing_try_lock(path: Path) -> int | None:
        fd = real_try_lock(path)
        if threading.current_thread() is flushing and path == reader_lock and not locked.is_set():
            locked.set()
            proceed.wait()
        return fd

    monkeypatch.setattr(flusher_module, "try_lock", pausing_try_lock)
    flushing = threading.Thread(target=flusher.flush, args=(10,))
    child = LingeringChild()
    forker = threading.Thread(target=child.fork)
    _BEFORE_FORK.append(forking.set)
    try:
        flushing.start()
        locked.wait()
        forker.start()
        forking.wait()  # the fork is under way (this step runs before the spool's own)
        _BEFORE_FORK.clear()
        proceed.set()
        flushing.join()
        forker.join()
        child.wait_running()
        flusher.stop()  # lets the reader lock go
        spool.close()
        assert sink.ids() == [str(event["event_id"])]
        fd = real_try_lock(reader_lock)  # while the child lives
        assert fd is not None, "the child keeps the slot's reader lock"
        os.close(fd)
    finally:
        _BEFORE_FORK.clear()
        proceed.set()
        child.end()
