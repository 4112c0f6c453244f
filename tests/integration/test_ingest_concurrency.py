"""Two OS processes ingest the same events at once, in different overlapping batches (PostgreSQL and
SQLite): each event is stored and charged exactly once, and the ledger is what one ingest would give."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from sqlalchemy import func, select

from metering.billing.checks import run_checks
from metering.db.models import TransferRow, UsageEventRow
from tests.fakes.events import record

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_ingesting_the_same_events_post_each_once(tmp_path: Path, db_url: str, session_factory):
    now = datetime.now(UTC)
    records = [
        record(i, user_id=f"u{i % 9}", is_byollm=i % 5 == 0, occurred_at=now - timedelta(minutes=i % 120))
        for i in range(400)
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in records))
    start = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.integration.ingest_child", db_url, str(path), str(seed), str(start)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    time.sleep(1.0)  # both have imported and connected
    start.touch()
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (_out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
        assert "error" not in err, err  # no deadlock, no retry needed
    totals = [json.loads(out) for out, _ in outputs]
    assert sum(t["inserted"] for t in totals) == 400
    assert sum(t["inserted"] + t["duplicates"] for t in totals) == 2 * 3 * 400

    billed = sum(1 for r in records if not r["is_byollm"])
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(UsageEventRow)) == 400
        charges = session.scalar(select(func.count()).where(TransferRow.kind == "usage_charge"))
        report = run_checks(session)
    assert charges == billed
    assert report.problems == []


def test_the_checks_read_one_snapshot_while_ingest_commits(session_factory, monkeypatch):
    """`metering billing check` on a live system: a batch committed while the checks run (here: after the stored
    rollups were read, before the raw events are recomputed) is seen by all of their reads or by none. Each read
    saw the database as of its own start, so a healthy ledger failed the check (exit 1) with rollups 'not equal'
    to the events."""
    from metering.billing import checks
    from metering.billing.ingest import ingest

    now = datetime.now(UTC)
    with session_factory() as session:
        ingest(session, [record(0, occurred_at=now)])
        session.commit()
    normal = checks._normal

    def ingest_meanwhile(key, chars, flag):
        if not getattr(ingest_meanwhile, "done", False):
            ingest_meanwhile.done = True
            with session_factory() as other:
                ingest(other, [record(1, occurred_at=now)])
                other.commit()
        return normal(key, chars, flag)

    monkeypatch.setattr(checks, "_normal", ingest_meanwhile)
    with session_factory() as session:
        report = run_checks(session)
    assert ingest_meanwhile.done
    assert report.problems == []
    with session_factory() as session:
        assert run_checks(session).problems == []
        assert session.scalar(select(func.count()).select_from(UsageEventRow)) == 2
