"""The host's clock steps back (an NTP step, a VM resumed) between a call and its flush: the events written before
the step are in the future by the clock that ingests them. Database sink, real spool, SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from metering.billing.ingest import MAX_FUTURE
from metering.db.models import UsageEventRow
from metering.spool import DatabaseSink, Flusher, Spool
from metering.spool.decode import DeadLetters, Rejected
from metering.spool.held import HELD_NAME, MAX_HELD_AHEAD, HeldEvents
from tests.fakes.events import record
from tests.integration.test_cli import bare_env, metering


def stored_ids(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session:
        return {str(i) for i in session.scalars(select(UsageEventRow.event_id))}


def test_an_event_ahead_of_a_clock_stepped_back_is_held_not_dead_lettered_and_ingested_once_due(
    tmp_path: Path, session_factory, caplog: pytest.LogCaptureFixture
) -> None:
    """Such an event was dead-lettered ("rejected by the sink: occurred_at … is in the future"): a billable call out
    of billing until someone redrove it. It is held now (``held.jsonl``, with a warning), the events around and
    after it delivered meanwhile, and ingested once the clock gets there; one past ``MAX_HELD_AHEAD`` (no clock step
    explains it) is still dead-lettered."""
    now = datetime.now(UTC)
    ahead = record(1, occurred_at=(now + MAX_FUTURE + timedelta(seconds=4)).isoformat())
    far = record(3, occurred_at=(now + MAX_HELD_AHEAD + timedelta(hours=1)).isoformat())
    before, after, later = record(0), record(2), record(4)
    caplog.set_level(logging.WARNING, logger="metering.spool")
    with Spool(tmp_path) as spool:
        flusher = Flusher(spool, DatabaseSink(session_factory), interval_s=0.05)
        for rec in (before, ahead, after, far):
            spool.append(orjson.dumps(rec))
        assert flusher.flush(timeout=30)  # the slot is not held up behind the event
        first = flusher.stats
        assert stored_ids(session_factory) == {before["event_id"], after["event_id"]}
        spool.append(orjson.dumps(later))  # delivered while the early event is still held
        assert flusher.flush(timeout=30)
        assert stored_ids(session_factory) == {before["event_id"], after["event_id"], later["event_id"]}
        [held] = HeldEvents(tmp_path / HELD_NAME).read()
        assert held["event_id"] == ahead["event_id"] and "in the future" in held["reason"]
        shown = metering(["spool", "status"], bare_env(tmp_path, METERING_SPOOL__DIR=str(tmp_path), COLUMNS="300"))
        assert shown.returncode == 0, shown.stderr
        assert f"held {ahead['event_id']}  due " in shown.stdout and "pending=0 rejected=1 held=1" in shown.stdout
        due = datetime.fromisoformat(ahead["occurred_at"]) - MAX_FUTURE
        time.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()) + 0.5)  # the clock gets there
        assert flusher.flush(timeout=30)
        last = flusher.stats
        flusher.stop()
    assert stored_ids(session_factory) == {r["event_id"] for r in (before, ahead, after, later)}
    assert (first.delivered, first.rejected, first.held, first.pending) == (2, 1, 1, 0), first
    assert (last.delivered, last.duplicates, last.rejected, last.held, last.pending) == (4, 0, 1, 0, 0), last
    [dead] = DeadLetters(tmp_path / "rejected.jsonl").read()
    assert dead["event_id"] == far["event_id"] and "in the future" in dead["reason"]
    assert f"more than {MAX_HELD_AHEAD.total_seconds() / 3600:g} hours ahead" in dead["reason"]
    assert HeldEvents(tmp_path / HELD_NAME).read() == []
    [warning] = [r.getMessage() for r in caplog.records if ahead["event_id"] in r.getMessage()]
    assert "ahead of this host's clock" in warning and "held" in warning


def test_held_events_whose_time_came_are_delivered_a_batch_at_a_time_and_the_ones_refused_otherwise_dead_lettered(
    tmp_path: Path, session_factory
) -> None:
    """What a flusher held before (its spool left as it was: a restart, another process): the events now due are
    delivered by the next flusher's passes, ``batch_size`` at a time; one refused for another reason once due is
    dead-lettered with it; a line that is not an event stays in the file (never dropped)."""
    from tests.fakes.wide_names import wide_names

    records = [record(i) for i in range(5)]
    wide = record(5, **wide_names(3150))
    held = HeldEvents(tmp_path / HELD_NAME)
    reason = "rejected by the sink: occurred_at … is in the future (now …)"
    lines = [orjson.dumps(rec) for rec in (*records, wide)]
    held.write("writer-0", 0, [Rejected(i * 100, item, reason, None) for i, item in enumerate(lines)])
    with (tmp_path / HELD_NAME).open("ab") as file:
        file.write(b"not a record\n")
    flusher = Flusher(tmp_path, DatabaseSink(session_factory), batch_size=2, max_backoff_s=0.05)
    assert flusher.flush(timeout=30)
    stats = flusher.stats
    flusher.stop()
    assert stored_ids(session_factory) == {r["event_id"] for r in records}
    assert (stats.delivered, stats.rejected, stats.held) == (5, 1, 0), stats
    [dead] = DeadLetters(tmp_path / "rejected.jsonl").read()
    assert dead["line"] == lines[-1].decode() and "3150 bytes" in dead["reason"] and dead["slot"] == "writer-0"
    assert (tmp_path / HELD_NAME).read_bytes() == b"not a record\n"


def _hold(root: Path, *records: dict[str, object]) -> None:
    """Events held by an earlier pass (or another flusher), now due."""
    reason = "rejected by the sink: occurred_at … is in the future (now …)"
    items = [Rejected(i * 100, orjson.dumps(rec), reason, str(rec["event_id"])) for i, rec in enumerate(records)]
    HeldEvents(root / HELD_NAME).write("writer-0", 0, items)


def test_held_events_are_not_dead_lettered_while_the_sink_refuses_everything(
    tmp_path: Path, session_factory, engine, backend
) -> None:
    """A sink that refuses every batch (a service answering its own 500 to all, a database whose schema the code does
    not match): the slots' batches wait for it, and so must held events that fall due meanwhile. They were
    dead-lettered (three refusals) as soon as the flusher had delivered anything once since it started, a billable
    call out of billing until someone redrove it; they are kept and delivered once the sink takes them again."""
    from sqlalchemy import text

    from tests.integration.test_spool_flusher import _refuse_tenant

    first, due = record(0), record(1)
    with Spool(tmp_path) as spool:
        flusher = Flusher(spool, DatabaseSink(session_factory), interval_s=0.02, max_backoff_s=0.05)
        spool.append(orjson.dumps(first))
        assert flusher.flush(timeout=30)  # the sink took a batch: this flusher has seen it work
        drop = _refuse_tenant(engine, backend, "tenant-1")  # every event refused from now on
        try:
            _hold(tmp_path, due)
            flusher.flush(timeout=2)
            assert DeadLetters(tmp_path / "rejected.jsonl").read() == []
            assert [r["event_id"] for r in HeldEvents(tmp_path / HELD_NAME).read()] == [due["event_id"]]
        finally:
            with engine.begin() as conn:
                for statement in drop:
                    conn.execute(text(statement))
        deadline = time.monotonic() + 30
        while due["event_id"] not in stored_ids(session_factory) and time.monotonic() < deadline:
            flusher.flush(timeout=1)
            time.sleep(0.05)
        flusher.stop()
    assert stored_ids(session_factory) == {first["event_id"], due["event_id"]}
    assert HeldEvents(tmp_path / HELD_NAME).read() == []


def test_a_held_event_the_sink_refuses_alone_waits_for_proof_of_its_own_fault_without_failing_the_flush(
    tmp_path: Path, session_factory, engine, backend
) -> None:
    """A due held event the database refuses, alone (nothing else to tell a broken sink from a bad event): a fresh
    `spool drain` retried it with backoff until its timeout and exited 1, though held events count as delivered for
    now. It stays held, the flush completes; once the sink takes a slot's batch, it is dead-lettered."""
    from sqlalchemy import text

    from tests.integration.test_spool_flusher import _refuse_tenant

    bad, good = record(0, tenant_id="poison"), record(1)
    _hold(tmp_path, bad)
    drop = _refuse_tenant(engine, backend, "poison")
    try:
        drainer = Flusher(tmp_path, DatabaseSink(session_factory), max_backoff_s=0.05)
        assert drainer.flush(timeout=5)
        stats = drainer.stats
        drainer.stop(drain=False)
        assert (stats.delivered, stats.rejected, stats.held) == (0, 0, 1), stats
        assert DeadLetters(tmp_path / "rejected.jsonl").read() == []
        with Spool(tmp_path) as spool:  # a slot's batch taken by the sink: the refusal is the event's own
            flusher = Flusher(spool, DatabaseSink(session_factory), max_backoff_s=0.05)
            spool.append(orjson.dumps(good))
            assert flusher.flush(timeout=30)
            stats = flusher.stats
            flusher.stop()
    finally:
        with engine.begin() as conn:
            for statement in drop:
                conn.execute(text(statement))
    assert (stats.delivered, stats.rejected, stats.held) == (1, 1, 0), stats
    [dead] = DeadLetters(tmp_path / "rejected.jsonl").read()
    assert dead["event_id"] == bad["event_id"] and "the database refuses the batch" in dead["reason"]
    assert stored_ids(session_factory) == {good["event_id"]}
