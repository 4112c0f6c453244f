"""Shared fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL comes from ``METERING_TEST_PG_URL`` (default: postgres@127.0.0.1:5432/test). Each test session
creates its own database there, migrates it once with Alembic and drops it at the end. When PostgreSQL
is unreachable the PostgreSQL half is skipped locally, and fails under CI (``CI=true``) or with
``METERING_REQUIRE_PG=1``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory
from metering.db.models import Base

PG_ADMIN_URL = os.environ.get("METERING_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")


def _pg_required() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("METERING_REQUIRE_PG") == "1"


def _pg_conninfo(url: str) -> str:
    parsed = make_url(url)
    return (
        f"host={parsed.host or '127.0.0.1'} port={parsed.port or 5432} "
        f"user={parsed.username or 'postgres'} dbname={parsed.database or 'test'}"
        + (f" password={parsed.password}" if parsed.password else "")
    )


@contextmanager
def temporary_pg_database(options: str = "") -> Iterator[str]:
    """Create an empty PostgreSQL database (``CREATE DATABASE … <options>``), yield its URL, drop it afterwards."""
    try:
        admin = psycopg.connect(_pg_conninfo(PG_ADMIN_URL), autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"
        if _pg_required():
            pytest.fail(message)
        pytest.skip(message)
    name = f"metering_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}" {options}'.rstrip())
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test session (not migrated)."""
    with temporary_pg_database() as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "metering.db"
    return f"sqlite:///{path}"


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_url(request: pytest.FixtureRequest) -> str:
    """A database URL migrated to head, once per backend per session."""
    url: str = request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="session")
def _session_engine(migrated_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_url)
    yield engine
    engine.dispose()


def _clean(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(text(f"DELETE FROM {table.name}"))


@pytest.fixture
def engine(_session_engine: Engine) -> Iterator[Engine]:
    """A migrated engine (SQLite, then PostgreSQL); tables are emptied after each test."""
    yield _session_engine
    _clean(_session_engine)


@pytest.fixture
def db_url(engine: Engine, migrated_url: str) -> str:
    return migrated_url


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def backend(engine: Engine) -> str:
    return engine.dialect.name
