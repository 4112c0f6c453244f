"""A process forked with an engine whose pool holds connections (a prefork server, a task queue, multiprocessing's
fork): the child's in-process DatabaseSink must not use the parent's connections (one socket, one SQLite handle,
used by two processes: their messages interleave)."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import event, text

from metering.db.engine import make_engine, make_session_factory
from metering.events import UsageEvent
from metering.spool import DatabaseSink
from tests.fakes.events import record
from tests.integration.test_spool_fork import _in_child


def test_a_forked_childs_database_sink_opens_connections_of_its_own(db_url: str) -> None:
    engine = make_engine(db_url)
    try:

        def opened(_dbapi: Any, connection_record: Any) -> None:
            connection_record.info["pid"] = os.getpid()

        event.listen(engine, "connect", opened)
        sessions = make_session_factory(engine)
        with sessions() as session:  # the parent's connection, back in the pool afterwards
            session.execute(text("SELECT 1"))
        assert engine.pool.checkedin() == 1

        def deliver_in_child() -> str:
            used: list[int] = []

            def checked_out(_dbapi: Any, connection_record: Any, _proxy: Any) -> None:
                used.append(connection_record.info["pid"])

            event.listen(engine, "checkout", checked_out)
            result = DatabaseSink(sessions).deliver([UsageEvent.model_validate(record(0))])
            shared = [pid for pid in used if pid != os.getpid()]
            return f"inserted={result.inserted} parent's connections used={len(shared)}"

        assert _in_child(deliver_in_child) == "ok inserted=1 parent's connections used=0"
        with sessions() as session:  # the parent's own connection still works
            assert session.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
