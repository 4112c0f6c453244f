"""rejected.jsonl on a full disk: all of a write or none of it, and a line that is not a record never hides the others.

Found by a hunt: redrive replaced the file with a short write of what it kept (the rest lost, exit 0), and a short
append left a torn record the next one was glued to (status and redrive then failed for good)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import orjson
import pytest

from metering.spool import Spool, decode
from metering.spool.decode import DeadLetters, Rejected
from metering.spool.segments import read_cursor


def rejected(n: int) -> list[Rejected]:
    return [Rejected(i, orjson.dumps({"event_id": f"e{i}", "pad": "x" * 200}), "a reason", f"e{i}") for i in range(n)]


def disk_full_after(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """``os.write`` writes at most ``budget`` more bytes in all (short writes), then fails with ENOSPC."""
    left = [budget]
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = real_write(fd, bytes(data[: left[0]]))
        left[0] -= written
        return written

    monkeypatch.setattr(decode.os, "write", write)


def test_an_append_that_runs_out_of_space_leaves_nothing_torn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    letters = DeadLetters(tmp_path / "rejected.jsonl")
    letters.write("writer-0", 1, rejected(2))
    before = letters.path.read_bytes()
    with monkeypatch.context() as patch:
        disk_full_after(patch, 300)  # part of the next record fits
        with pytest.raises(OSError):
            letters.write("writer-0", 2, rejected(3))
    assert letters.path.read_bytes() == before  # cut back: the flusher keeps the batch and retries it
    letters.write("writer-0", 2, rejected(3))  # room again
    assert [r["event_id"] for r in letters.read()] == ["e0", "e1", "e0", "e1", "e2"]


def test_a_redrive_that_runs_out_of_space_keeps_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    letters = DeadLetters(tmp_path / "rejected.jsonl")
    letters.write("writer-0", 1, rejected(20))
    before = letters.path.read_bytes()
    taken: list[bytes] = []
    with monkeypatch.context() as patch:
        disk_full_after(patch, len(before) // 2)
        with pytest.raises(OSError):
            letters.redrive(lambda r: r["event_id"] == "e0", taken.append)
    assert letters.path.read_bytes() == before  # never replaced by a part of what it kept
    assert not (tmp_path / "rejected.jsonl.tmp").exists()


def test_a_line_that_is_not_a_record_is_skipped_by_readers_and_kept_by_redrive(tmp_path: Path) -> None:
    letters = DeadLetters(tmp_path / "rejected.jsonl")
    letters.write("writer-0", 1, rejected(2))
    with letters.path.open("ab") as f:
        f.write(b'{"rejected_at": "2026-11-28T00:00:00", "slo\n')  # torn by a crash mid-write
    letters.write("writer-0", 2, rejected(1))
    assert [r["event_id"] for r in letters.read()] == ["e0", "e1", "e0"]
    taken: list[bytes] = []
    letters.redrive(lambda r: r["segment"] == 1, taken.append)
    assert len(taken) == 2
    assert b'"slo' in letters.path.read_bytes()  # the unreadable line is still there for a person to look at
    assert [r["event_id"] for r in letters.read()] == ["e0"]


@pytest.mark.parametrize("cursor", [b'{"segment": 1, "offset": -1}', b'{"segment": -3, "offset": 0}'])
def test_a_negative_cursor_starts_over(tmp_path: Path, cursor: bytes) -> None:
    (tmp_path / "cursor").write_bytes(cursor)
    position = read_cursor(tmp_path)
    assert (position.segment, position.offset) == (0, 0)  # re-delivery: the idempotent sink counts duplicates


def test_a_record_appended_after_a_line_torn_by_a_crash_stays_readable(tmp_path: Path) -> None:
    letters = DeadLetters(tmp_path / "rejected.jsonl")
    letters.write("writer-0", 1, rejected(1))
    with letters.path.open("ab") as f:
        f.write(b'{"rejected_at": "2026')  # a crash mid-write: no newline
    letters.write("writer-0", 2, rejected(2))
    assert [r["segment"] for r in letters.read()] == [1, 2, 2]


def test_a_dead_letter_lock_that_cannot_be_opened_never_stops_a_writer_from_opening(tmp_path: Path) -> None:
    """Putting the reserve aside is best effort: a lock file it cannot open (another user's, here a directory in its
    place) leaves the reserve for later and the spool opens."""
    (tmp_path / "rejected.jsonl.lock").mkdir()
    with Spool(tmp_path) as spool:
        spool.append(b'{"a":1}')
    assert not (tmp_path / "rejected.jsonl.reserve").exists()
