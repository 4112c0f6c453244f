"""The spool's files: framing, cursors, slots, rotation, torn writes (no database)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from metering.errors import SpoolError
from metering.spool import Spool
from metering.spool.reader import pending_lines, read_batch
from metering.spool.segments import Cursor, list_segments, read_cursor, segment_name, split_lines, write_cursor


def test_split_lines_keeps_the_incomplete_tail_unconsumed() -> None:
    lines, end = split_lines(b'{"a":1}\n\n{"b":2}\n{"c":', 100)
    assert lines == [(100, b'{"a":1}'), (109, b'{"b":2}')]
    assert end == 117  # just past the second newline; the fragment '{"c":' is left for later


def test_cursor_round_trips_and_a_corrupt_cursor_restarts_from_zero(tmp_path: Path) -> None:
    assert read_cursor(tmp_path) == Cursor(0, 0)
    write_cursor(tmp_path, Cursor(7, 4096))
    assert read_cursor(tmp_path) == Cursor(7, 4096)
    (tmp_path / "cursor").write_bytes(b"garbage")
    assert read_cursor(tmp_path) == Cursor(0, 0)


def test_each_open_spool_claims_its_own_slot_and_close_releases_it(tmp_path: Path) -> None:
    first = Spool(tmp_path).open()
    second = Spool(tmp_path).open()
    assert first.slot_dir is not None and second.slot_dir is not None
    assert first.slot_dir.name == "writer-0" and second.slot_dir.name == "writer-1"
    first.close()
    third = Spool(tmp_path).open()
    assert third.slot_dir == first.slot_dir
    # A reopened slot never appends to an old segment: it may end in a torn line.
    assert third.current_segment > 1
    second.close()
    third.close()


def test_append_writes_one_line_per_event_and_rotates_by_size(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=4096) as spool:
        payload = b'{"n":"' + b"x" * 1000 + b'"}'
        for _ in range(9):
            spool.append(payload)
        assert spool.slot_dir is not None
        segments = list_segments(spool.slot_dir)
        # A segment is closed by the append that takes it to 4096 bytes or more: the 5th line of 1009.
        sizes = [os.path.getsize(spool.slot_dir / segment_name(seq)) for seq in segments]
        assert sizes == [5 * 1009, 4 * 1009]
        assert pending_lines(spool.slot_dir, Cursor(0, 0)) == 9


def test_bad_lines_and_a_closed_spool_are_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path).open()
    with pytest.raises(ValueError, match="newline"):
        spool.append(b'{"a":\n1}')
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        spool.append(b"{}")


def test_an_unusable_directory_is_a_clear_spool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError, match="cannot open the spool"):
        Spool(blocker / "spool").open()


def _slot(tmp_path: Path, segments: dict[int, bytes]) -> Path:
    slot = tmp_path / "writer-0"
    slot.mkdir()
    for seq, data in segments.items():
        (slot / segment_name(seq)).write_bytes(data)
    return slot


def test_read_batch_leaves_a_live_segments_partial_line_for_later(tmp_path: Path) -> None:
    slot = _slot(tmp_path, {1: b"a\nb\nhalf"})
    batch = read_batch(slot, Cursor(), current_segment=1, max_lines=10)
    assert batch is not None and [line for _, line in batch.lines] == [b"a", b"b"]
    assert batch.next_cursor == Cursor(1, 4) and not batch.finished_segment and batch.torn is None
    assert read_batch(slot, batch.next_cursor, current_segment=1, max_lines=10) is None


def test_read_batch_dead_letters_a_torn_line_in_a_finished_segment(tmp_path: Path) -> None:
    slot = _slot(tmp_path, {1: b"a\nb\nhalf", 2: b"c\n"})
    batch = read_batch(slot, Cursor(), current_segment=2, max_lines=10)
    assert batch is not None and batch.torn == (4, b"half") and batch.finished_segment
    assert batch.next_cursor == Cursor(2, 0)
    nxt = read_batch(slot, batch.next_cursor, current_segment=2, max_lines=10)
    assert nxt is not None and [line for _, line in nxt.lines] == [b"c"] and not nxt.finished_segment


def test_read_batch_respects_max_lines_and_resumes_exactly(tmp_path: Path) -> None:
    slot = _slot(tmp_path, {3: b"".join(b"%d\n" % i for i in range(25))})
    cursor, seen = Cursor(3, 0), []
    while (batch := read_batch(slot, cursor, current_segment=None, max_lines=10)) is not None:
        seen.extend(int(line) for _, line in batch.lines)
        cursor = batch.next_cursor
        if batch.finished_segment:
            os.unlink(slot / segment_name(batch.segment))
    assert seen == list(range(25)) and cursor == Cursor(4, 0)


def test_segments_before_the_cursor_are_removed(tmp_path: Path) -> None:
    slot = _slot(tmp_path, {1: b"old\n", 2: b"new\n"})
    batch = read_batch(slot, Cursor(2, 0), current_segment=None, max_lines=10)
    assert batch is not None and [line for _, line in batch.lines] == [b"new"]
    assert list_segments(slot) == [2]


def test_a_corrupt_cursor_is_told_once_with_what_happens(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cursor that is not one (edited, or a disk error) made the flusher start the slot over without a word: the
    operator saw duplicates counted and a cursor of 0:0 in `spool status`, and nothing said why."""
    (tmp_path / "cursor").write_bytes(b'{"segment": 7, "offs')
    with caplog.at_level(logging.WARNING, logger="metering.spool"):
        assert read_cursor(tmp_path) == Cursor(0, 0)
        assert read_cursor(tmp_path) == Cursor(0, 0)  # read in a loop by a flush: told once
    [warning] = [r.getMessage() for r in caplog.records]
    assert str(tmp_path / "cursor") in warning and "from its oldest segment" in warning, warning
    assert "duplicates" in warning, warning
