"""Spool → flusher → database on SQLite and PostgreSQL: nothing lost, nothing doubled, bad lines rejected."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from metering.db.event_store import count_events
from metering.db.models import UsageEventRow
from metering.events import UsageEvent, utcnow
from metering.spool import DatabaseSink, DeliveryResult, Flusher, Spool
from metering.spool.decode import DeadLetters
from metering.spool.segments import read_cursor, write_cursor
from tests.fakes.events import line, record


def stored_ids(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        return [str(i) for i in session.scalars(select(UsageEventRow.event_id))]


def test_every_appended_event_reaches_the_database_once(tmp_path: Path, session_factory) -> None:
    records = [record(i) for i in range(1_234)]
    with Spool(tmp_path, segment_bytes=64 * 1024) as spool:
        flusher = Flusher(spool, DatabaseSink(session_factory), batch_size=200, interval_s=0.05).start()
        for rec in records:
            spool.append(orjson.dumps(rec))
        assert flusher.flush(timeout=60)
        stats = flusher.stats
        flusher.stop()
    assert sorted(stored_ids(session_factory)) == sorted(str(r["event_id"]) for r in records)
    assert (stats.delivered, stats.duplicates, stats.rejected, stats.pending) == (1_234, 0, 0, 0)
    assert spool.slot_dir is not None and len(list(spool.slot_dir.glob("*.jsonl"))) == 1  # consumed ones deleted


def test_one_malformed_event_in_500_is_rejected_with_a_reason_and_499_are_ingested(
    tmp_path: Path, session_factory
) -> None:
    lines = [line(i) for i in range(500)]
    bad = record(250, input_tokens=-5)
    lines[250] = orjson.dumps(bad)
    with Spool(tmp_path) as spool:
        flusher = Flusher(spool, DatabaseSink(session_factory), batch_size=500)
        for item in lines:
            spool.append(item)
        assert flusher.flush(timeout=60)  # not started: flushes inline
        stats = flusher.stats
    with session_factory() as session:
        assert count_events(session) == 499
    assert str(bad["event_id"]) not in stored_ids(session_factory)
    [dead] = DeadLetters(tmp_path / "rejected.jsonl").read()
    assert dead["event_id"] == str(bad["event_id"]) and "input_tokens" in dead["reason"]
    assert (stats.delivered, stats.rejected) == (499, 1)


def test_garbage_lines_are_dead_lettered_not_retried_forever(tmp_path: Path, session_factory) -> None:
    with Spool(tmp_path) as spool:
        flusher = Flusher(spool, DatabaseSink(session_factory))
        spool.append(b"not json at all")
        spool.append(b"[1, 2, 3]")
        spool.append(line(0))
        assert flusher.flush(timeout=30)
    reasons = [d["reason"] for d in DeadLetters(tmp_path / "rejected.jsonl").read()]
    assert reasons[0].startswith("not JSON") and reasons[1] == "not a JSON object: list"
    assert len(stored_ids(session_factory)) == 1


def test_a_replayed_line_is_counted_as_a_duplicate(tmp_path: Path, session_factory) -> None:
    item = line(0)
    with Spool(tmp_path) as spool:
        flusher = Flusher(spool, DatabaseSink(session_factory))
        spool.append(item)
        assert flusher.flush(timeout=30)
        spool.append(item)
        assert flusher.flush(timeout=30)
        stats = flusher.stats
    assert (stats.delivered, stats.duplicates) == (1, 1)
    assert len(stored_ids(session_factory)) == 1


class FlakySink:
    """Fails the first ``failures`` deliveries (a database that is down), then delegates."""

    def __init__(self, inner: DatabaseSink, failures: int) -> None:
        self.inner, self.failures, self.calls = inner, failures, 0

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("database is down")
        return self.inner.deliver(events)


def test_a_down_sink_loses_nothing_and_recovers(tmp_path: Path, session_factory) -> None:
    sink = FlakySink(DatabaseSink(session_factory), failures=3)
    records = [record(i) for i in range(300)]
    with Spool(tmp_path) as spool:
        flusher = Flusher(spool, sink, batch_size=100, interval_s=0.01, max_backoff_s=0.05).start()
        for rec in records:
            spool.append(orjson.dumps(rec))
        assert flusher.flush(timeout=30)
        stats = flusher.stats
        flusher.stop()
    assert stats.failures == 3 and stats.last_error == "ConnectionError: database is down"
    assert sorted(stored_ids(session_factory)) == sorted(str(r["event_id"]) for r in records)
    assert stats.pending == 0


def test_flush_times_out_while_the_sink_is_down_and_keeps_every_event(tmp_path: Path, session_factory) -> None:
    sink = FlakySink(DatabaseSink(session_factory), failures=10**9)
    with Spool(tmp_path) as spool:
        flusher = Flusher(spool, sink, interval_s=0.01, max_backoff_s=0.02).start()
        for i in range(50):
            spool.append(line(i))
        assert flusher.flush(timeout=0.3) is False
        assert flusher.stats.pending == 50
        sink.failures = 0  # the database is back
        assert flusher.flush(timeout=30)
        flusher.stop()
    assert len(stored_ids(session_factory)) == 50


def test_a_slot_left_by_a_dead_writer_is_drained_by_another_process_flusher(tmp_path: Path, session_factory) -> None:
    live = Spool(tmp_path).open()  # this process: writer-0
    dead = Spool(tmp_path).open()  # another process, about to die: writer-1
    orphan_ids = []
    for i in range(40):
        rec = record(i)
        orphan_ids.append(str(rec["event_id"]))
        dead.append(orjson.dumps(rec))
    assert dead.slot_dir is not None
    with open(dead.slot_dir / f"{dead.current_segment:012d}.jsonl", "ab") as handle:
        handle.write(b'{"event_id": "torn')  # the write a SIGKILL interrupted
    dead.close()  # the kernel releases a dead process's flock the same way
    with live:
        assert live.slot_dir != dead.slot_dir
        flusher = Flusher(live, DatabaseSink(session_factory))
        assert flusher.flush(timeout=30)
        flusher.stop()
    assert sorted(stored_ids(session_factory)) == sorted(orphan_ids)
    [torn] = DeadLetters(tmp_path / "rejected.jsonl").read()
    assert torn["reason"].startswith("torn write") and torn["slot"] == "writer-1"
    assert list(dead.slot_dir.glob("*.jsonl")) == []


def test_concurrent_appenders_from_many_threads_lose_nothing(tmp_path: Path, session_factory) -> None:
    with Spool(tmp_path, segment_bytes=32 * 1024) as spool:
        flusher = Flusher(spool, DatabaseSink(session_factory), batch_size=250, interval_s=0.01).start()
        ids: list[str] = []
        lock = threading.Lock()

        def worker() -> None:
            for i in range(250):
                rec = record(i)
                spool.append(orjson.dumps(rec))
                with lock:
                    ids.append(str(rec["event_id"]))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert flusher.flush(timeout=60)
        flusher.stop()
    assert sorted(stored_ids(session_factory)) == sorted(ids)


@pytest.mark.parametrize("drain", [True, False])
def test_stop_without_drain_keeps_events_for_the_next_run(tmp_path: Path, session_factory, drain: bool) -> None:
    sink = FlakySink(DatabaseSink(session_factory), failures=10**9 if not drain else 0)
    with Spool(tmp_path) as spool:
        flusher = Flusher(spool, sink, interval_s=0.01, max_backoff_s=0.02).start()
        for i in range(20):
            spool.append(line(i))
        flusher.stop(drain=drain, timeout=5)
    with Spool(tmp_path) as again:  # the next run reclaims the same slot and delivers what is left
        rest = Flusher(again, DatabaseSink(session_factory))
        assert rest.flush(timeout=30)
    assert len(stored_ids(session_factory)) == 20


def _refuse_tenant(engine, backend: str, tenant: str, errcode: str = "22001") -> list[str]:
    """A real refusal by the database (as of a value too long for its column, or the SQLSTATE ``errcode`` on
    PostgreSQL): a trigger on usage_events."""
    from sqlalchemy import text

    if backend == "postgresql":
        ddl = [
            "CREATE FUNCTION refuse_tenant() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.tenant_id = '{tenant}' THEN RAISE EXCEPTION 'refused' USING ERRCODE = '{errcode}'; END IF; "
            "RETURN NEW; END $$",
            "CREATE TRIGGER refuse_tenant BEFORE INSERT ON usage_events FOR EACH ROW EXECUTE FUNCTION refuse_tenant()",
        ]
        drop = ["DROP TRIGGER refuse_tenant ON usage_events", "DROP FUNCTION refuse_tenant()"]
    else:
        ddl = [f"CREATE TRIGGER refuse_tenant BEFORE INSERT ON usage_events WHEN NEW.tenant_id = '{tenant}' "
               "BEGIN SELECT RAISE(ABORT, 'refused'); END"]  # fmt: skip
        drop = ["DROP TRIGGER refuse_tenant"]
    with engine.begin() as conn:
        for statement in ddl:
            conn.execute(text(statement))
    return drop


def test_an_event_the_database_refuses_is_dead_lettered_the_rest_delivered_and_redriven_once_fixed(
    tmp_path: Path, session_factory, engine, backend
) -> None:
    """Ingest writes through the raw driver: its refusals are psycopg's / sqlite3's own errors. They used to pass
    as outages, so the batch was retried forever and every event behind the bad one waited."""
    from sqlalchemy import text

    drop = _refuse_tenant(engine, backend, "poison")
    records = [record(i, tenant_id="poison" if i == 20 else "tenant-1") for i in range(50)]
    try:
        with Spool(tmp_path) as spool:
            for rec in records:
                spool.append(orjson.dumps(rec))
            flusher = Flusher(spool, DatabaseSink(session_factory), batch_size=500)
            assert flusher.stop(drain=True, timeout=30)
            assert (flusher.stats.delivered, flusher.stats.rejected) == (49, 1)
        (dead,) = DeadLetters(tmp_path / "rejected.jsonl").read()
        assert dead["event_id"] == str(records[20]["event_id"])
        assert "the database refuses the batch" in dead["reason"]
        assert ("StringDataRightTruncation" if backend == "postgresql" else "IntegrityError") in dead["reason"]
    finally:
        with engine.begin() as conn:
            for statement in drop:
                conn.execute(text(statement))
    with Spool(tmp_path) as spool:  # fixed: redrive it
        assert len(DeadLetters(tmp_path / "rejected.jsonl").redrive(lambda r: True, spool.append)) == 1
        flusher = Flusher(spool, DatabaseSink(session_factory))
        assert flusher.stop(drain=True, timeout=30) and flusher.stats.delivered == 1
    assert sorted(stored_ids(session_factory)) == sorted(str(r["event_id"]) for r in records)


def test_a_database_outage_is_not_a_refusal(tmp_path: Path) -> None:
    """An unreachable database keeps the batch (retried later); nothing is dead-lettered."""
    from metering.db.engine import make_engine, make_session_factory

    dead_engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    with Spool(tmp_path) as spool:
        for i in range(5):
            spool.append(orjson.dumps(record(i)))
        flusher = Flusher(spool, DatabaseSink(make_session_factory(dead_engine)), max_backoff_s=0.05)
        assert not flusher.flush(timeout=1.0)
        assert flusher.stats.rejected == 0 and flusher.stats.failures >= 1
        flusher.stop(drain=False)
    dead_engine.dispose()
    assert DeadLetters(tmp_path / "rejected.jsonl").read() == []


def test_a_bad_event_alone_in_its_batch_is_told_apart_by_the_events_behind_it(
    tmp_path: Path, session_factory, engine, backend
) -> None:
    """Batches of one (or a bad event last in its segment): no other part of the batch can pass, so the flusher
    tries the events that follow. Nothing follows yet: it waits (it holds nothing up), and dead-letters nothing."""
    from sqlalchemy import text

    drop = _refuse_tenant(engine, backend, "poison")
    records = [record(i, tenant_id="poison" if i in (3, 9) else "tenant-1") for i in range(10)]
    try:
        with Spool(tmp_path) as spool:
            for rec in records:
                spool.append(orjson.dumps(rec))
            flusher = Flusher(spool, DatabaseSink(session_factory), batch_size=1, max_backoff_s=0.05)
            assert not flusher.flush(timeout=3)  # the last event is bad and alone: kept, not dead-lettered
            # The event after a bad one goes in first, as the probe: delivered then (each good event counts once as
            # delivered), a duplicate when its own batch goes.
            assert (flusher.stats.delivered, flusher.stats.duplicates, flusher.stats.rejected) == (8, 1, 1)
            later = record(10)
            spool.append(orjson.dumps(later))  # an event behind it: now it can be told apart
            assert flusher.stop(drain=True, timeout=30)
            assert (flusher.stats.delivered, flusher.stats.duplicates, flusher.stats.rejected) == (9, 2, 2)
    finally:
        with engine.begin() as conn:
            for statement in drop:
                conn.execute(text(statement))
    dead = {r["event_id"] for r in DeadLetters(tmp_path / "rejected.jsonl").read()}
    assert dead == {str(records[3]["event_id"]), str(records[9]["event_id"])}
    expected = {str(r["event_id"]) for r in [*records, later]} - dead
    assert set(stored_ids(session_factory)) == expected


class PoisonSink:
    """Refuses every batch holding a poisoned event (a service answering 500 to them); delivers the others."""

    def __init__(self, inner: DatabaseSink, poison: set[str]) -> None:
        self.inner, self.poison = inner, poison

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        from metering.spool.sink import RefusedBatchError

        if any(str(e.event_id) in self.poison for e in events):
            raise RefusedBatchError("the service refuses (500): internal_error")
        return self.inner.deliver(events)


def test_reading_past_a_refused_batch_never_deletes_its_segment(tmp_path: Path, session_factory) -> None:
    """A bad event last in its segment, and the event after it (first of the next segment) bad too: the flusher
    reads past the refused batch to try what follows. That read must not delete the refused batch's segment as
    acknowledged (read_batch deletes the segments below the cursor it is given): its event was lost."""
    from metering.spool.inspect import slot_states

    records = [record(i) for i in range(12)]
    with Spool(tmp_path, segment_bytes=4096) as spool:
        for rec in records:
            spool.append(orjson.dumps(rec))
        slot = spool.slot_dir
    first = sorted(slot.glob("*.jsonl"))[0].read_bytes().count(b"\n")  # events in the first segment
    assert 1 < first < len(records)
    poison = {str(records[first - 1]["event_id"]), str(records[first]["event_id"])}  # the segment's end, the next
    stuck = Flusher(tmp_path, PoisonSink(DatabaseSink(session_factory), poison), batch_size=1, max_backoff_s=0.02)
    assert not stuck.flush(timeout=1.0)
    stuck.stop(drain=False)
    assert stuck.stats.rejected == 0 and stuck.stats.delivered == first - 1
    assert sum(state.pending for state in slot_states(tmp_path)) == len(records) - (first - 1)
    good = Flusher(tmp_path, DatabaseSink(session_factory))  # the cause fixed: everything goes in
    assert good.stop(drain=True, timeout=30)
    assert sorted(stored_ids(session_factory)) == sorted(str(r["event_id"]) for r in records)


def test_an_event_whose_names_are_too_wide_together_is_dead_lettered_not_retried_forever(
    tmp_path: Path, session_factory
) -> None:
    """Seven names of 150 CJK characters each are valid one by one, but their rollup key is wider than PostgreSQL
    indexes (2,704 bytes). PostgreSQL's refusal (`ProgramLimitExceeded`) passed as an outage: the batch was retried
    forever and nothing behind it was delivered; SQLite stored the event. Now ingest rejects it on both."""
    from tests.fakes.wide_names import wide_names

    records = [record(i) for i in range(30)]
    records[12] = record(12, **wide_names(3150))
    with Spool(tmp_path) as spool:
        for rec in records:
            spool.append(orjson.dumps(rec))
        flusher = Flusher(spool, DatabaseSink(session_factory), max_backoff_s=0.05)
        assert flusher.flush(timeout=10)
        assert (flusher.stats.delivered, flusher.stats.rejected, flusher.stats.pending) == (29, 1, 0)
    [dead] = DeadLetters(tmp_path / "rejected.jsonl").read()
    assert dead["event_id"] == str(records[12]["event_id"]) and "3150 bytes" in dead["reason"]
    assert str(records[12]["event_id"]) not in stored_ids(session_factory)


def test_a_program_limit_of_the_database_is_a_refusal_not_an_outage(
    tmp_path: Path, session_factory, engine, backend
) -> None:
    """PostgreSQL's program limits (SQLSTATE class 54, e.g. an index entry above 2,704 bytes) are OperationalErrors
    to psycopg, the class of outages: the batch was retried forever and nothing behind it was delivered. The same
    batch exceeds the limit every time: the event at fault is dead-lettered, the rest delivered."""
    from sqlalchemy import text

    drop = _refuse_tenant(engine, backend, "limit", errcode="54000")
    records = [record(i, tenant_id="limit" if i == 7 else "tenant-1") for i in range(30)]
    try:
        with Spool(tmp_path) as spool:
            for rec in records:
                spool.append(orjson.dumps(rec))
            flusher = Flusher(spool, DatabaseSink(session_factory), max_backoff_s=0.05)
            assert flusher.flush(timeout=10)
            assert (flusher.stats.delivered, flusher.stats.rejected, flusher.stats.pending) == (29, 1, 0)
    finally:
        with engine.begin() as conn:
            for statement in drop:
                conn.execute(text(statement))
    [dead] = DeadLetters(tmp_path / "rejected.jsonl").read()
    assert dead["event_id"] == str(records[7]["event_id"])
    assert ("ProgramLimitExceeded" if backend == "postgresql" else "IntegrityError") in dead["reason"]


def test_dead_letters_of_a_batch_replayed_after_a_crash_are_kept_once(tmp_path: Path, session_factory) -> None:
    """A flusher killed after it dead-lettered a batch's bad lines, before it wrote the cursor (the state rolled back
    here), dead-lettered them again on the replay: `spool status` counted each twice, `redrive --dry-run` listed the
    event twice and a redrive spooled it twice. A record that repeats one of the same line at the same place in the
    same segment is the same dead letter: read once, redriven once, and dropped with it."""
    future = record(1, occurred_at=(utcnow() + timedelta(days=2)).isoformat())
    with Spool(tmp_path) as spool:
        flusher = Flusher(spool, DatabaseSink(session_factory))
        assert spool.slot_dir is not None
        spool.append(line(0))
        before = read_cursor(spool.slot_dir)
        spool.append(b"not json at all")
        spool.append(orjson.dumps(future))
        assert flusher.flush(timeout=30)
        write_cursor(spool.slot_dir, before)  # what a kill between the dead letters and the cursor leaves
        assert flusher.flush(timeout=30)
        letters = DeadLetters(tmp_path / "rejected.jsonl")
        assert len(letters.read()) == 2
        redriven: list[bytes] = []
        taken = letters.redrive(lambda r: r["event_id"] == str(future["event_id"]), redriven.append)
    assert [r["event_id"] for r in taken] == [str(future["event_id"])]
    assert redriven == [orjson.dumps(future)]
    assert [r["reason"][:8] for r in letters.read()] == ["not JSON"]
