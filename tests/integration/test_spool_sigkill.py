"""SIGKILL in the middle of a burst, then a restart: every acknowledged event is stored exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from metering.config import Settings
from metering.db.models import UsageEventRow
from metering.spool.decode import DeadLetters
from metering.wiring import open_services

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def run_and_kill(data_dir: Path, url: str, acks_before_kill: int) -> list[str]:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.spool_child", str(data_dir), url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: list[str] = []
    assert child.stdout is not None
    try:
        for raw in child.stdout:
            if raw.startswith("ack "):
                acked.append(raw.split()[1])
            if len(acked) >= acks_before_kill:
                os.kill(child.pid, signal.SIGKILL)
                break
        else:
            pytest.fail(f"child exited early: {child.stderr.read() if child.stderr else ''}")
    finally:
        child.kill()
        child.wait(timeout=30)
    # Whatever was acknowledged but not yet read from the pipe still counts as acknowledged.
    acked.extend(raw.split()[1] for raw in child.stdout.read().splitlines() if raw.startswith("ack "))
    assert child.returncode == -signal.SIGKILL
    return acked


@pytest.mark.parametrize("round_", [1, 2])
def test_sigkill_mid_burst_then_restart_delivers_every_acknowledged_event_once(
    tmp_path: Path, db_url: str, session_factory, round_: int
) -> None:
    acked: list[str] = []
    for _ in range(round_):  # a second round: killed again while the first round's spool is reclaimed
        acked += run_and_kill(tmp_path, db_url, acks_before_kill=1_500)
    assert len(acked) >= 1_500 * round_

    with session_factory() as session:
        before = session.scalar(select(func.count()).select_from(UsageEventRow))
    assert before < len(acked) or round_ == 2  # the kill left events in the spool, not yet delivered

    services = open_services(Settings(data_dir=tmp_path, database_url=db_url), run_migrations=False)
    try:
        assert services.flusher.flush(timeout=120)
        stats = services.flusher.stats
    finally:
        services.close()

    with session_factory() as session:
        counts = {
            event_id: n
            for event_id, n in session.execute(
                select(UsageEventRow.event_id, func.count()).group_by(UsageEventRow.event_id)
            )
        }
        users = set(session.scalars(select(UsageEventRow.user_id).distinct()))
    stored = {str(event_id): n for event_id, n in counts.items()}
    missing = [event_id for event_id in acked if event_id not in stored]
    assert missing == [], f"{len(missing)} acknowledged events lost"
    assert all(n == 1 for n in stored.values())
    assert users == {"killed-user"}
    assert stats.pending == 0
    # The only thing a kill may leave is one torn, never-acknowledged line per killed writer.
    dead = DeadLetters(tmp_path / "spool" / "rejected.jsonl").read()
    assert len(dead) <= round_ and all(d["reason"].startswith("torn write") for d in dead)
