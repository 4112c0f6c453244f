"""A spool whose disk filled up (ENOSPC, a real one: a small tmpfs) recovers by itself once its sink takes the
events: nothing lost, nothing doubled, and the calls can append again. Needs the right to mount a tmpfs (root)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from metering.db.engine import make_engine, make_session_factory
from metering.db.models import UsageEventRow
from metering.errors import SpoolError
from metering.events import UsageEvent
from metering.spool import DatabaseSink, DeliveryResult, Flusher, Spool
from metering.spool.decode import RESERVE_BYTES, DeadLetters
from tests.fakes.events import record

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def _tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size``: writes past it fail with ENOSPC, as on a full disk."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with _tmpfs(tmp_path / "disk", "256k") as mount:
        yield mount


@pytest.fixture
def disk_with_reserve(tmp_path: Path) -> Iterator[Path]:
    """Room for the spool's dead-letter reserve (1 MiB) and some events."""
    with _tmpfs(tmp_path / "disk", "1280k") as mount:
        yield mount


def _stored(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session:
        return {str(i) for i in session.scalars(select(UsageEventRow.event_id))}


def _fill(spool: Spool, start: int = 0) -> list[dict]:
    """Append events until the disk is full; the events whose append returned."""
    appended = []
    with pytest.raises(SpoolError, match=r"No space left|short write"):
        for i in range(start, start + 10_000):
            rec = record(i)
            spool.append(orjson.dumps(rec))
            appended.append(rec)
    return appended


def test_a_spool_that_filled_its_disk_drains_and_takes_events_again(small_disk: Path, session_factory) -> None:
    """The flusher delivered the first batch, then could not persist its cursor (a new file: ENOSPC), so it
    delivered the same batch again and again and never freed a segment: the spool stayed full for good, and every
    metered call failed with spool_error though the database was up."""
    with Spool(small_disk / "spool", segment_bytes=1 << 20) as spool:  # one segment holds the whole disk
        appended = _fill(spool)
        flusher = Flusher(spool, DatabaseSink(session_factory), batch_size=100, max_backoff_s=0.05)
        assert flusher.flush(timeout=20), flusher.stats.last_error
        assert flusher.stats.delivered == len(appended) and flusher.stats.duplicates == 0
        assert _stored(session_factory) == {str(r["event_id"]) for r in appended}
        more = _fill(spool, start=len(appended))  # the disk is free again: calls append (until it fills anew)
        assert len(more) > 50
        assert flusher.flush(timeout=20), flusher.stats.last_error
        flusher.stop()
    assert _stored(session_factory) == {str(r["event_id"]) for r in [*appended, *more]}
    # The appends the full disk cut short left no partial line behind (it would need a dead letter: more space).
    assert DeadLetters(small_disk / "spool" / "rejected.jsonl").read() == []


def test_an_event_to_dead_letter_on_a_full_disk_holds_up_nothing(disk_with_reserve: Path, session_factory) -> None:
    """An event the sink rejects, in the segment that filled the disk: its dead letter needed space, so the batch was
    never acknowledged, the segment never consumed, and the spool stayed full for good (the same batch ingested
    again and again: thousands of duplicates). The flusher kept no space aside for dead letters; now it does."""
    down = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    with Spool(disk_with_reserve / "spool", segment_bytes=4 << 20) as spool:  # one segment holds the whole disk
        over_limit = record(0, input_tokens=10**9, output_tokens=10**9)  # rejected by ingest: priced > $10,000
        spool.append(orjson.dumps(over_limit))
        waiting = Flusher(spool, DatabaseSink(make_session_factory(down)), max_backoff_s=0.05)
        assert not waiting.flush(timeout=0.3)  # the database is down meanwhile: the spool fills up
        waiting.stop(drain=False)
        appended = _fill(spool, start=1)
        flusher = Flusher(spool, DatabaseSink(session_factory), batch_size=100, max_backoff_s=0.05)
        assert flusher.flush(timeout=20), flusher.stats.last_error
        assert (flusher.stats.delivered, flusher.stats.rejected, flusher.stats.pending) == (len(appended), 1, 0)
        flusher.stop()
    down.dispose()
    assert _stored(session_factory) == {str(r["event_id"]) for r in appended}
    [dead] = DeadLetters(disk_with_reserve / "spool" / "rejected.jsonl").read()
    assert RESERVE_BYTES <= 1 << 20  # what the disk above leaves room for
    assert dead["event_id"] == str(over_limit["event_id"]) and "10,000" in dead["reason"]


def test_the_writer_keeps_room_for_dead_letters_though_no_flusher_ran_before_the_disk_filled(
    disk_with_reserve: Path, session_factory
) -> None:
    """With an external drainer that was not running while the calls filled the disk, no flusher had put the reserve
    aside: the first batch with a line to dead-letter wedged the spool. The writer puts it aside when it opens."""
    with Spool(disk_with_reserve / "spool", segment_bytes=4 << 20) as spool:
        over_limit = record(0, input_tokens=10**9, output_tokens=10**9)
        spool.append(orjson.dumps(over_limit))
        appended = _fill(spool, start=1)
        flusher = Flusher(spool, DatabaseSink(session_factory), batch_size=100, max_backoff_s=0.05)
        assert flusher.flush(timeout=20), flusher.stats.last_error
        assert (flusher.stats.delivered, flusher.stats.rejected, flusher.stats.pending) == (len(appended), 1, 0)
        flusher.stop()
    assert _stored(session_factory) == {str(r["event_id"]) for r in appended}


def test_putting_the_reserve_aside_never_fails_appends_on_a_disk_with_less_than_it_free(tmp_path: Path) -> None:
    """With less than 1 MiB free (a disk nearly full, not full), each flusher pass (every 0.5 s) tried to write the
    reserve anyway: the write took every free byte before it failed and was deleted, and an append landing meanwhile
    failed with ENOSPC (the metered call with spool_error) though the disk had room for it. The reserve is put aside
    only when the disk has room for it."""
    with _tmpfs(tmp_path / "disk", "2m") as disk, Spool(disk / "spool", segment_bytes=4 << 20) as spool:
        dead_letters = DeadLetters(disk / "spool" / "rejected.jsonl")
        dead_letters.reserve.unlink()  # used up by dead letters on a full disk earlier
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "other").write_bytes(b"x" * (free - 1000 * 1024))  # what else fills the disk: 1,000 KB left
        failures: list[SpoolError] = []
        started, passes_done = threading.Event(), threading.Event()

        def append() -> None:
            started.set()
            for _ in range(450_000):  # at most 900 KB: the disk has room for every one
                if passes_done.is_set():
                    break
                try:
                    spool.append(b"1")  # the smallest line: the most appends the room left allows
                except SpoolError as exc:
                    failures.append(exc)

        appender = threading.Thread(target=append)
        appender.start()
        started.wait()
        while appender.is_alive() and not failures:  # flusher passes while the calls append
            dead_letters.keep_reserve()
        passes_done.set()
        appender.join()
        assert failures == []
        assert not dead_letters.reserve.exists()  # no room for it: not put aside


def test_appends_refused_by_a_full_disk_leave_no_segment_each(small_disk: Path) -> None:
    """Every append the full disk refused rotated to a new segment, though the refusal left nothing in the one it
    was written to (cut off, or never written): a call failing with spool_error left an empty segment file each
    (on a tmpfs, or any filesystem whose inodes are not counted in blocks: one per refused call for as long as the
    disk stayed full), each then a batch of its own and a cursor write for the flusher."""
    with Spool(small_disk / "spool", segment_bytes=1 << 20) as spool:
        _fill(spool)
        for i in range(200):
            with pytest.raises(SpoolError):
                spool.append(orjson.dumps(record(i)))
        assert spool.slot_dir is not None
        assert len(list(spool.slot_dir.glob("*.jsonl"))) <= 2


class _MemorySink:
    def __init__(self) -> None:
        self.stored: list[str] = []

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        self.stored += [str(e.event_id) for e in events]
        return DeliveryResult(inserted=len(events), duplicates=0)


def test_a_slot_claimed_on_a_full_disk_can_acknowledge_once_its_events_fill_the_disk_again(small_disk: Path) -> None:
    """A slot claimed while the disk was full got no cursor file (its temporary file got no space), and none later:
    once room was freed elsewhere and its own events filled the disk again, the flusher could write its cursor
    neither anew nor over an old one, never acknowledged a batch, never deleted a segment, and the spool stayed full
    for good (the same batch delivered again and again). The writer now gives the slot its cursor file at its first
    append, before the event takes the room."""
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while os.write(fd, b"x" * 512):
            pass
    os.close(fd)
    with Spool(small_disk / "spool", segment_bytes=1 << 20) as spool:
        assert spool.slot_dir is not None and not (spool.slot_dir / "cursor").exists()
        filler.unlink()  # room freed elsewhere
        appended = _fill(spool)
        sink = _MemorySink()
        flusher = Flusher(spool, sink, batch_size=100, max_backoff_s=0.05)
        assert flusher.flush(timeout=20), flusher.stats.last_error
        flusher.stop()
    assert sink.stored == [str(r["event_id"]) for r in appended]


_KILLED_MID_RESERVE = """
import resource, signal, sys
from pathlib import Path
from metering.spool.decode import DeadLetters
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; by default it kills, as SIGKILL would
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
DeadLetters(Path(sys.argv[1])).keep_reserve()  # killed once the reserve's temporary file reaches 256 KiB
"""


def test_a_process_killed_while_putting_the_reserve_aside_leaves_no_space_taken_for_good(tmp_path: Path) -> None:
    """The reserve was written to a temporary file named after the process (``rejected.jsonl.reserve.<pid>.tmp``):
    a process killed while writing it (the reserve is written at each start, and at each flusher pass after a full
    disk used it: a crash-looping service) left up to 1 MiB behind that nothing ever removed, one file per kill, on
    the disk the reserve is there to help. One name now, written under a lock: a leftover is written over."""
    spool = tmp_path / "spool"
    spool.mkdir()
    for _ in range(3):
        killed = subprocess.run([sys.executable, "-c", _KILLED_MID_RESERVE, str(spool / "rejected.jsonl")], cwd=ROOT)
        assert killed.returncode == -signal.SIGXFSZ
    DeadLetters(spool / "rejected.jsonl").keep_reserve()  # the next start
    left = {path.name: path.stat().st_size for path in spool.iterdir() if path.stat().st_size}
    assert left == {"rejected.jsonl.reserve": RESERVE_BYTES}


@pytest.mark.parametrize("drainer", [False, True], ids=["own-flusher", "external-drainer"])
def test_a_flush_after_a_rotation_that_could_not_open_the_next_segment_says_delivered(
    tmp_path: Path, drainer: bool
) -> None:
    """An append that filled its segment rotates; when the next segment cannot be created (no inode left here; a
    process out of file descriptors, a directory made read-only), the spool kept the full segment's size as the
    position of the next append: a flush() then waited for the cursor to pass bytes nobody had written, for its whole
    timeout, and said False (a `metering run` at exit: "not delivered") though every event was delivered. The position
    is now the end of the last append, which a drainer in another process reaches too (it cannot tell that the full
    segment is finished before the next one exists)."""
    with _tmpfs(tmp_path / "disk", "512k") as mount:
        subprocess.run(["mount", "-o", "remount,nr_inodes=64", str(mount)], check=True)
        with Spool(mount / "spool", segment_bytes=4096) as spool:
            sink = _MemorySink()
            external = Flusher(mount / "spool", sink, interval_s=0.01).start() if drainer else None
            flusher = Flusher(spool, sink if external is None else _MemorySink(), max_backoff_s=0.05)
            appended: list[str] = []
            if external is not None:  # the drainer takes the slot (and keeps it) with its first event; else a flush()
                rec = record(0)  # claims it first and delivers inline, to its own sink: the case would test nothing
                spool.append(orjson.dumps(rec))
                appended.append(str(rec["event_id"]))
                deadline = time.monotonic() + 10
                while sink.stored != appended and time.monotonic() < deadline:
                    time.sleep(0.01)
            assert flusher.flush(timeout=10)  # the slot's files made (its cursor among them), taken by the drainer
            with contextlib.suppress(OSError):
                for n in range(1000):  # every inode left taken
                    (mount / f"filler-{n}").touch()
            first = spool.current_segment
            while spool.current_segment == first:  # until an append fills the segment: the rotation fails
                rec = record(len(appended))
                spool.append(orjson.dumps(rec))
                appended.append(str(rec["event_id"]))
            assert spool.slot_dir is not None
            assert not (spool.slot_dir / f"{spool.current_segment:012d}.jsonl").exists()
            assert flusher.flush(timeout=10), flusher.stats
            flusher.stop()
            if external is not None:
                external.stop()
    assert sink.stored == appended
