"""SIGKILL in a loop: writer processes killed mid-append and restarted (reclaiming the dead ones' slots), external
drainers (`metering spool drain --follow`, two at once), writers' flusher threads and `metering spool redrive`
(racing the drainers) killed at random moments. Every event whose append returned, and every dead-lettered event
redriven, is stored exactly once, none is left dead-lettered, and a slot's cursor is never ahead of what is
stored."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from sqlalchemy import func, select

from metering.db.models import UsageEventRow
from metering.spool.decode import DeadLetters, Rejected
from metering.spool.segments import list_segments, list_slots, read_cursor, segment_name
from tests.fakes.events import record

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


class Procs:
    def __init__(self, tmp: Path, url: str) -> None:
        self.tmp, self.url, self.count = tmp, url, 0
        self.spool_dir = tmp / "spool"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
        self.env.update(
            METERING_DATA_DIR=str(tmp),
            METERING_DATABASE_URL=url,
            METERING_SPOOL__FLUSH_INTERVAL_S="0.005",
            METERING_SPOOL__BATCH_SIZE="13",
            METERING_SPOOL__SEGMENT_BYTES="4096",
        )
        self.outputs: list[Path] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        self.count += 1
        out = self.tmp / f"out-{self.count}"
        self.outputs.append(out)
        with open(out, "wb") as handle:
            return subprocess.Popen(
                [sys.executable, "-m", *args], cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT
            )

    def writer(self, seed: int, *, flusher: bool) -> subprocess.Popen[bytes]:
        args = [str(self.spool_dir), str(seed), *([self.url] if flusher else [])]
        return self.start("tests.integration.spool_writer_child", *args)

    def redrive(self) -> subprocess.Popen[bytes]:
        return self.start("metering.cli.main", "spool", "redrive")

    def drainer(self) -> subprocess.Popen[bytes]:
        return self.start("metering.cli.main", "spool", "drain", "--follow")

    def acked(self) -> list[str]:
        """Every event a writer reported as appended (a line cut off by the kill was never reported)."""
        ids = []
        for out in self.outputs:
            for raw in out.read_bytes().split(b"\n")[:-1]:
                if raw.startswith(b"ack "):
                    ids.append(raw[4:].decode())
        return ids


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def stored(sessions) -> dict[str, int]:
    with sessions() as session:
        rows = session.execute(select(UsageEventRow.event_id, func.count()).group_by(UsageEventRow.event_id))
        return {str(event_id): n for event_id, n in rows}


def cursor_lines(spool_dir: Path) -> list[str]:
    """The ids of the lines before each slot's cursor that are still on disk (the rest of the cursor's segment)."""
    ids = []
    for slot in list_slots(spool_dir):
        cursor = read_cursor(slot)
        try:
            data = (slot / segment_name(cursor.segment)).read_bytes()[: cursor.offset]
        except FileNotFoundError:
            continue
        ids += [orjson.loads(raw)["event_id"] for raw in data.split(b"\n") if raw]
    return ids


@pytest.mark.parametrize("seed", [1])
def test_writers_and_drainers_killed_in_a_loop_lose_and_double_nothing(
    tmp_path: Path, db_url: str, session_factory, seed: int
) -> None:
    rng = random.Random(seed)
    procs = Procs(tmp_path, db_url)
    writers = [procs.writer(seed * 100 + i, flusher=i == 0) for i in range(4)]
    drainers = [procs.drainer(), procs.drainer()]
    kills = {"writer": 0, "drainer": 0, "checks": 0, "redrive": 0, "redrives": 0}
    procs.spool_dir.mkdir()
    letters = DeadLetters(procs.spool_dir / "rejected.jsonl")
    refused: list[str] = []  # events a sink once refused, dead-lettered: redriven, they must be stored once
    redrive: subprocess.Popen[bytes] | None = None
    # At least 20 s of kills, then on until the writers have reported 500 appends (a loaded machine gets there
    # later; the count is what makes the run meaningful, not the clock), within a hard cap.
    start = time.monotonic()
    try:
        while time.monotonic() - start < 20 or (len(procs.acked()) <= 500 and time.monotonic() - start < 180):
            time.sleep(rng.uniform(0.05, 0.4))
            if redrive is not None and redrive.poll() is None and rng.random() < 0.25:
                kill(redrive)  # mid-redrive: spooled and still dead-lettered at worst (a duplicate)
                kills["redrive"] += 1
            if rng.random() < 0.3 and (redrive is None or redrive.poll() is not None):
                bad = [record(i, user_id="redriven") for i in range(rng.randint(1, 20))]
                refused += [str(r["event_id"]) for r in bad]
                letters.write("writer-9", 1, [
                    Rejected(i, orjson.dumps(r), "rejected by the sink: DataError: fixed since", str(r["event_id"]))
                    for i, r in enumerate(bad)
                ])  # fmt: skip
                redrive = procs.redrive()
                kills["redrives"] += 1
            if rng.random() < 0.6:
                index = rng.randrange(len(writers))
                kill(writers[index])
                kills["writer"] += 1
                writers[index] = procs.writer(seed * 100 + procs.count, flusher=rng.random() < 0.3)
            else:
                index = rng.randrange(len(drainers))
                kill(drainers[index])
                kills["drainer"] += 1
                # What a cursor acknowledges is stored (the cursor read first: it only moves on after the sink).
                before_cursor = cursor_lines(procs.spool_dir)
                have = stored(session_factory)
                assert [i for i in before_cursor if i not in have] == []
                kills["checks"] += 1
                drainers[index] = procs.drainer()
        for proc in writers:
            kill(proc)
        for proc in drainers:
            kill(proc)
        if redrive is not None:
            redrive.wait(timeout=30)
        done = subprocess.run(
            [sys.executable, "-m", "metering.cli.main", "spool", "redrive"],
            cwd=ROOT, env=procs.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        done = subprocess.run(
            [sys.executable, "-m", "metering.cli.main", "spool", "drain", "--timeout", "60"],
            cwd=ROOT, env=procs.env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        for proc in writers + drainers + ([redrive] if redrive else []):
            proc.kill()
            proc.wait(timeout=30)

    acked = procs.acked()
    have = stored(session_factory)
    print(f"events acked={len(acked)} stored={len(have)} kills={kills}")
    assert len(acked) > 500
    assert [i for i in acked if i not in have] == [], "acknowledged events lost"
    assert [i for i in refused if i not in have] == [], "redriven events lost"
    assert {i: n for i, n in have.items() if n != 1} == {}
    dead = DeadLetters(procs.spool_dir / "rejected.jsonl").read()
    assert {d["event_id"] for d in dead} & {*acked, *refused} == set()
    assert all(d["reason"].startswith("torn write") for d in dead), dead[:3]
    for slot in list_slots(procs.spool_dir):  # everything delivered and deleted, but a last, empty segment
        assert all((slot / segment_name(seq)).stat().st_size == 0 for seq in list_segments(slot)), slot
