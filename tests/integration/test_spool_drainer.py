"""A separate drainer process (`metering spool drain --follow`) delivers a live writer's spool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select

from metering.db.models import UsageEventRow
from metering.spool import DatabaseSink, Flusher, Spool
from metering.spool.inspect import slot_states
from tests.fakes.events import record

ROOT = Path(__file__).resolve().parents[2]


def stored_ids(sessions) -> set[str]:
    with sessions() as session:
        return {str(i) for i in session.scalars(select(UsageEventRow.event_id))}


def _append_records(spool: Spool, n: int) -> list[str]:
    """Append records 0..n-1 to ``spool``; their event ids, in order."""
    ids = []
    for i in range(n):
        rec = record(i)
        ids.append(str(rec["event_id"]))
        spool.append(orjson.dumps(rec))
    return ids


def test_a_path_flusher_drains_a_live_writers_slot_and_the_writer_sees_its_cursor(tmp_path: Path, session_factory):
    with Spool(tmp_path) as spool:
        external = Flusher(tmp_path, DatabaseSink(session_factory), interval_s=0.01).start()  # "another process"
        own = Flusher(spool, DatabaseSink(session_factory))  # never started: the external one delivers
        ids = _append_records(spool, 300)
        time.sleep(0.05)
        assert own.flush(timeout=30)  # waits until the slot's cursor passed its appends
        assert own.stats.delivered == 0 and external.stats.delivered == 300
        # The live segment is kept (the writer still appends to it); nothing was dead-lettered.
        assert external.stats.rejected == 0
        [state] = slot_states(tmp_path)
        assert state.writer_alive and state.pending == 0
        external.stop()
    assert stored_ids(session_factory) == set(ids)


@pytest.mark.slow
def test_metering_spool_drain_follow_delivers_while_running_and_on_sigterm(tmp_path: Path, db_url, session_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env.update(METERING_DATA_DIR=str(tmp_path), METERING_DATABASE_URL=db_url, METERING_SPOOL__FLUSH_INTERVAL_S="0.02")
    drainer = subprocess.Popen(
        [sys.executable, "-m", "metering.cli.main", "spool", "drain", "--follow"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with Spool(tmp_path / "spool") as spool:
            ids = _append_records(spool, 500)
            deadline = time.monotonic() + 60
            while stored_ids(session_factory) != set(ids) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stored_ids(session_factory) == set(ids)  # delivered while the writer is still alive
            late = record(999)
            spool.append(orjson.dumps(late))
        drainer.send_signal(signal.SIGTERM)
        out, err = drainer.communicate(timeout=60)
    finally:
        drainer.kill()
    assert drainer.returncode == 0, err
    assert "drained=True" in out
    assert stored_ids(session_factory) == {*ids, str(late["event_id"])}


def test_a_drain_that_cannot_deliver_reports_what_is_still_pending(tmp_path: Path, db_url) -> None:
    """Nobody listens at the HTTP sink's address: the drain fails, and its summary counts the lines left on disk
    (it printed pending=0: the flusher had let go of its slots before they were counted)."""
    with Spool(tmp_path / "spool") as spool:
        for i in range(30):
            spool.append(orjson.dumps(record(i)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env.update(
        METERING_DATA_DIR=str(tmp_path),
        METERING_DATABASE_URL=db_url,
        METERING_SPOOL__SINK="http",
        METERING_SPOOL__HTTP_URL="http://127.0.0.1:9",  # discard port: connection refused
        METERING_SPOOL__HTTP_TOKEN="mtr_unused",
    )
    done = subprocess.run(
        [sys.executable, "-m", "metering.cli.main", "spool", "drain", "--timeout", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "pending=30 drained=False" in done.stdout, done.stdout
    assert sum(state.pending for state in slot_states(tmp_path / "spool")) == 30


def test_dead_lettered_events_are_redriven_once_fixed_and_torn_lines_stay(tmp_path: Path, db_url, session_factory):
    """`metering spool redrive` puts dead-lettered events back into the spool (what refused them is fixed);
    `metering spool drain` then delivers them, and a redrive repeated after a crash only counts duplicates."""
    from metering.spool.decode import DeadLetters, Rejected
    from metering.spool.segments import DEAD_LETTER_NAME

    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env.update(METERING_DATA_DIR=str(tmp_path), METERING_DATABASE_URL=db_url)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    letters = DeadLetters(spool_dir / DEAD_LETTER_NAME)
    records = [record(i) for i in range(3)]
    refused = [Rejected(i, orjson.dumps(r), "rejected by the sink: DataError: value too long", str(r["event_id"]))
               for i, r in enumerate(records)]  # fmt: skip
    invalid = {**records[0], "event_id": str(uuid.uuid4()), "input_tokens": -1}  # refused by validation: stays
    letters.write(
        "writer-0",
        1,
        [
            *refused,
            Rejected(99, b'{"event_id": "x', "torn write: incomplete line"),
            Rejected(100, orjson.dumps(invalid), "input_tokens: negative", invalid["event_id"]),
        ],
    )

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "metering.cli.main", "spool", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "would redrive 1 event(s)" in cli("redrive", "--dry-run", "--event-id", str(records[0]["event_id"]))
    assert len(letters.read()) == 5
    assert "redrove 3 event(s)" in cli("redrive", "--reason", "DataError")
    assert "redrove 0 event(s)" in cli("redrive")  # neither the torn line nor the invalid event would pass now
    assert [r["reason"] for r in letters.read()] == ["torn write: incomplete line", "input_tokens: negative"]
    assert "delivered=3" in cli("drain")
    assert stored_ids(session_factory) == {str(r["event_id"]) for r in records}
    letters.write("writer-0", 1, refused[:1])  # as if a redrive crashed before dropping it
    cli("redrive")
    assert "delivered=0 duplicates=1" in cli("drain")
    assert len(letters.read()) == 2


def test_a_dead_letter_written_during_a_redrive_is_kept(tmp_path: Path) -> None:
    """The redrive rewrites rejected.jsonl; a flusher dead-lettering meanwhile waits for it (a shared flock)
    instead of appending to the file being replaced."""
    import threading

    from metering.spool.decode import DeadLetters, Rejected

    letters = DeadLetters(tmp_path / "rejected.jsonl")
    letters.write("writer-0", 1, [Rejected(0, orjson.dumps(record(0)), "refused", str(record(0)["event_id"]))])
    late = Rejected(1, orjson.dumps(record(1)), "refused later", str(record(1)["event_id"]))
    writer = threading.Thread(target=letters.write, args=("writer-1", 1, [late]))

    def append(line: bytes) -> None:  # while the redrive holds the lock, another writer dead-letters
        writer.start()
        time.sleep(0.2)
        assert writer.is_alive()  # it waits for the lock

    assert len(letters.redrive(lambda r: r["reason"] == "refused", append)) == 1
    writer.join(timeout=5)
    assert [r["reason"] for r in letters.read()] == ["refused later"]


@pytest.mark.parametrize("timeout", ["inf", "1e300", "nan", "-1", "3601"])
def test_spool_drain_refuses_a_timeout_outside_0_to_3600_as_a_usage_error(run, timeout: str) -> None:
    """``--timeout inf`` (or 1e300) was taken: ``--follow`` stopped with a traceback (OverflowError waiting for the
    flusher) instead of delivering what was spooled and printing the result; now click's usage error (exit 2)."""
    result = run("spool", "drain", "--timeout", timeout)  # checked before anything runs (--follow would wait)
    assert result.exit_code == 2, result.output
    assert "0 to 3600" in result.output


def test_redrive_of_an_event_id_no_dead_letter_has_is_an_error_and_the_others_are_redriven(run, tmp_path: Path):
    """``--event-id`` of an event that is not dead-lettered (a typo) printed ``redrove 0 event(s)``, exit 0."""
    from metering.spool.decode import DeadLetters, Rejected
    from metering.spool.segments import DEAD_LETTER_NAME

    (tmp_path / "spool").mkdir()
    letters = DeadLetters(tmp_path / "spool" / DEAD_LETTER_NAME)
    rec = record(0)
    letters.write("writer-0", 1, [Rejected(0, orjson.dumps(rec), "refused", str(rec["event_id"]))])
    unknown = str(uuid.uuid4())

    dry = run("spool", "redrive", "--dry-run", "--event-id", unknown)
    assert dry.exit_code == 1, dry.output
    assert dry.stderr.startswith(f"error: --event-id {unknown}: no dead-lettered event"), dry.stderr
    assert len(letters.read()) == 1

    done = run("spool", "redrive", "--event-id", str(rec["event_id"]).upper(), "--event-id", unknown)
    assert done.exit_code == 1, done.output
    assert "redrove 1 event(s)" in done.stdout  # the one that is there is redriven all the same
    assert done.stderr.startswith(f"error: --event-id {unknown}: no dead-lettered event"), done.stderr
    assert letters.read() == []


class _Down:
    """A sink that is down: a flusher holding a slot with it delivers nothing."""

    def deliver(self, events):
        raise ConnectionError("the database is down")


def _holding(flusher: Flusher) -> Flusher:
    deadline = time.monotonic() + 10
    while flusher.stats.slots == 0:
        assert time.monotonic() < deadline, "the flusher never took the slot"
        time.sleep(0.01)
    return flusher


def test_a_drain_of_a_slot_another_flusher_holds_waits_for_it_and_is_not_drained_while_it_delivers_nothing(
    run, tmp_path: Path, session_factory
) -> None:
    """`metering spool drain` said drained=True, exit 0, with every event still pending in a slot another flusher
    held (a service's flusher thread holds its own slot for good; another drain), whatever that flusher did: this
    one could not take the slot, so it had nothing to wait for. It now waits, up to --timeout, for the slot's cursor
    to pass what was spooled when it began (delivering the slot itself if the other lets it go), and otherwise says
    drained=False, exit 1, naming the slot."""
    with Spool(tmp_path / "spool") as spool:
        ids = _append_records(spool, 30)
    stuck = _holding(Flusher(tmp_path / "spool", _Down(), interval_s=0.05).start())
    try:
        result = run("spool", "drain", "--timeout", "1")
    finally:
        stuck.stop(drain=False)
    assert result.exit_code == 1, result.output
    assert "pending=30 drained=False" in result.stdout, result.stdout
    assert "writer-0: 30 event(s)" in result.output, result.output
    assert "see its log" in result.output and "flush interval" not in result.output, result.output  # 0.5 s < 1 s
    assert stored_ids(session_factory) == set()

    # The holder lets the slot go meanwhile: the drain delivers it itself.
    stuck = _holding(Flusher(tmp_path / "spool", _Down(), interval_s=0.05).start())
    threading.Timer(0.5, stuck.stop, kwargs={"drain": False}).start()
    result = run("spool", "drain", "--timeout", "30")
    assert result.exit_code == 0, result.output
    assert "delivered=30 duplicates=0 rejected=0 failures=0 pending=0 drained=True" in result.stdout, result.stdout
    assert stored_ids(session_factory) == set(ids)


def test_a_drain_shorter_than_the_flush_interval_names_it_as_the_likely_cause(
    run, tmp_path: Path, session_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Next to a live service whose flusher holds the slot and flushes every METERING_SPOOL__FLUSH_INTERVAL_S (20 s),
    `metering spool drain --timeout 5` waited 5 s for it and said only "has not delivered them yet; see its log",
    exit 1, though nothing was wrong: the holder had not reached its next flush. The line now names the interval and
    the timeout, and what to do."""
    with Spool(tmp_path / "spool") as spool:
        for i in range(3):
            spool.append(orjson.dumps(record(i)))
    monkeypatch.setenv("METERING_SPOOL__FLUSH_INTERVAL_S", "20")
    holder = _holding(Flusher(tmp_path / "spool", _Down(), interval_s=0.05).start())
    try:
        result = run("spool", "drain", "--timeout", "1", columns=400)
    finally:
        holder.stop(drain=False)
    assert result.exit_code == 1, result.output
    assert "writer-0: 3 event(s) not delivered: another flusher holds the slot" in result.stdout, result.stdout
    assert (
        "its flush interval (20 s, METERING_SPOOL__FLUSH_INTERVAL_S) is not shorter than --timeout 1: it may not have "
        "flushed yet; wait longer, or run with a --timeout longer than the interval" in result.stdout
    ), result.stdout
    assert stored_ids(session_factory) == set()


def test_a_drain_waits_for_the_flusher_that_holds_a_slot_to_deliver_it(run, tmp_path: Path, session_factory) -> None:
    with Spool(tmp_path / "spool") as spool:
        ids = _append_records(spool, 30)
    sink = DatabaseSink(session_factory)
    gate = threading.Event()

    class Gated:
        def deliver(self, events):
            if not gate.wait(0.01):
                raise ConnectionError("not yet")
            return sink.deliver(events)

    holder = _holding(Flusher(tmp_path / "spool", Gated(), interval_s=0.02, max_backoff_s=0.05).start())
    threading.Timer(0.5, gate.set).start()
    try:
        result = run("spool", "drain", "--timeout", "30")
    finally:
        holder.stop(drain=False)
    assert result.exit_code == 0, result.output
    assert "delivered=0 duplicates=0 rejected=0 failures=0 pending=0 drained=True" in result.stdout, result.stdout
    assert holder.stats.delivered == 30
    assert stored_ids(session_factory) == set(ids)
