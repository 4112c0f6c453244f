"""A service or a spool whose database is behind the code (deployed before `metering migrate` ran: a rolling upgrade, or
`serve --no-migrate`) waits for the migration: nothing is refused as if the events were at fault.

PostgreSQL reports a missing column or table as a ProgrammingError, the class of a value the database refuses: the
spool's database sink isolated each event of the batch and dead-lettered them all, and the API answered 500, which
the HTTP sink takes for a batch at fault and dead-letters too. SQLite's OperationalError was retried, but the API
told operators to "retry later", which never helps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import sqlalchemy
import sqlalchemy.exc
from fastapi import FastAPI
from fastapi.testclient import TestClient

from metering.api import problems
from metering.api.app import create_app
from metering.auth import Scope, create_token
from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory
from metering.db.event_store import count_events
from metering.spool import DatabaseSink, Flusher, Spool
from tests.conftest import temporary_pg_database
from tests.fakes.events import record
from tests.integration.api.conftest import app_settings, assert_problem, post_events

BEHIND = "0011"  # the rollups have no web_searches column yet


def _fresh(backend: str, tmp_path: Path, revision: str) -> Iterator[str]:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
        migrate.upgrade(url, revision)
        yield url
        return
    with temporary_pg_database() as url:
        migrate.upgrade(url, revision)
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def behind_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from _fresh(request.param, tmp_path, BEHIND)


@pytest.fixture(params=["sqlite", "postgresql"])
def drifted_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """At head, as its alembic_version says (its own database: a column is dropped from it)."""
    yield from _fresh(request.param, tmp_path, "head")


def test_a_spool_waits_for_the_migration_and_dead_letters_nothing(behind_url: str, tmp_path: Path) -> None:
    engine = make_engine(behind_url)
    try:
        with Spool(tmp_path / "spool") as spool:
            for i in range(5):
                spool.append(orjson.dumps(record(i)))
            flusher = Flusher(spool, DatabaseSink(make_session_factory(engine)), interval_s=0.01, max_backoff_s=0.05)
            flusher.start()
            assert flusher.flush(timeout=1) is False
            assert (flusher.stats.rejected, flusher.stats.pending) == (0, 5), flusher.stats
            migrate.upgrade(behind_url)
            engine.dispose()
            assert flusher.flush(timeout=30)
            assert (flusher.stats.delivered, flusher.stats.rejected) == (5, 0)
            flusher.stop()
        assert (
            not (tmp_path / "spool" / "rejected.jsonl").exists()
            or not (tmp_path / "spool" / "rejected.jsonl").read_text()
        )
        with make_session_factory(engine)() as session:
            assert count_events(session) == 5
    finally:
        engine.dispose()


def test_the_api_answers_503_not_ready_naming_the_migration(behind_url: str, tmp_path: Path) -> None:
    engine = make_engine(behind_url)
    try:
        with make_session_factory(engine)() as session:
            _row, secret = create_token(session, "behind", (Scope.INGEST,))
            session.commit()
        with TestClient(create_app(app_settings(behind_url, tmp_path)), raise_server_exceptions=False) as client:
            body = assert_problem(post_events(client, [record(0), record(1)], secret), 503, "not_ready")
        assert "metering migrate" in body["detail"]
    finally:
        engine.dispose()


def _outage_carrying(db_url: str, text_sent: str) -> Exception:
    """A real outage of the database (SQLite: written read-only; PostgreSQL: a statement timeout) on a statement
    whose parameters carry ``text_sent`` (a client's value, as an event's extension)."""
    if db_url.startswith("sqlite"):
        url = f"sqlite:///file:{db_url.removeprefix('sqlite:///')}?mode=ro&uri=true"
        statement = sqlalchemy.text("INSERT INTO alembic_version (version_num) VALUES (:value)")
    else:
        url = db_url
        statement = sqlalchemy.text("SELECT pg_sleep(1), CAST(:value AS text)")
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as connection:
            if not db_url.startswith("sqlite"):
                connection.execute(sqlalchemy.text("SET LOCAL statement_timeout = '1ms'"))
            connection.execute(statement, {"value": text_sent})
    except sqlalchemy.exc.OperationalError as error:
        return error
    finally:
        engine.dispose()
    raise AssertionError("no outage")


@pytest.mark.parametrize("text_sent", ["no such table", "has no column named x", "no such column"])
def test_an_outage_on_a_clients_text_naming_a_missing_table_stays_database_unavailable(db_url: str, text_sent: str):
    """The schema check read SQLite's wording in the whole error, whose text has the statement's parameters: a
    client's value saying 'no such table' in a statement the database failed (locked, full, read-only, a timeout),
    on either database, turned the outage into 'not_ready: run metering migrate', a false page to operators."""
    error = _outage_carrying(db_url, text_sent)
    assert text_sent in str(error)
    app = FastAPI()
    problems.install(app)

    @app.get("/x")
    def fail() -> None:
        raise error

    response = TestClient(app, raise_server_exceptions=False).get("/x")
    assert response.status_code == 503 and response.json()["code"] == "database_unavailable", response.text


def test_a_missing_column_at_head_is_a_500_not_a_migration_to_run(drifted_url: str, tmp_path: Path) -> None:
    """At head, `metering migrate` changes nothing: a table or column missing there is a bug or a drifted schema, and
    "run metering migrate" would send the operator the wrong way."""
    engine = make_engine(drifted_url)
    try:
        with make_session_factory(engine)() as session:
            _row, secret = create_token(session, "drifted", (Scope.INGEST,))
            session.commit()
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE usage_rollups DROP COLUMN web_searches")
        with TestClient(create_app(app_settings(drifted_url, tmp_path)), raise_server_exceptions=False) as client:
            assert client.get("/readyz").status_code == 200  # at head, as alembic_version says
            assert_problem(post_events(client, [record(0)], secret), 500, "internal_error")
    finally:
        engine.dispose()
