"""A spool whose disk filled up (ENOSPC, a real one: a small tmpfs) recovers by itself once its sink takes the
events: nothing lost, nothing doubled, and the calls can append again. Needs the right to mount a tmpfs (root)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from metering.db.models import UsageEventRow
from metering.errors import SpoolError
from metering.spool import DatabaseSink, Flusher, Spool
from metering.spool.decode import DeadLetters
from tests.fakes.events import record


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: writes past it fail with ENOSPC, as on a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


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
