"""Alembic: upgrade head / downgrade base / upgrade again on both backends; models match migrations."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from metering.billing.checks import run_checks
from metering.billing.ingest import ingest
from metering.billing.rollup import COARSE_ROLLUPS
from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory
from metering.db.models import Base
from metering.events import event_from_record
from tests.conftest import temporary_pg_database
from tests.fakes.events import record


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with temporary_pg_database() as url:
        yield url


def test_upgrade_downgrade_upgrade(fresh_url: str) -> None:
    engine = make_engine(fresh_url)
    try:
        migrate.upgrade(fresh_url)
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        assert migrate.current_revision(engine) == migrate.head_revision(fresh_url)

        migrate.downgrade(fresh_url, "base")
        engine.dispose()
        remaining = set(inspect(engine).get_table_names()) - {"alembic_version"}
        assert remaining == set()
        assert migrate.current_revision(engine) is None

        migrate.upgrade(fresh_url)
        engine.dispose()
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_models_match_migrations(migrated_url: str) -> None:
    """Autogenerate against the migrated database finds nothing: models and migrations do not drift."""
    engine = make_engine(migrated_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"


def test_0005_fills_the_coarse_rollups_from_existing_rollups(fresh_url: str) -> None:
    """Upgrading a database that already has usage: the coarse rollups are filled from ``usage_rollups``
    and agree with the raw events at once (ingested at head, downgraded to 0004, upgraded again)."""
    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        factory = make_session_factory(engine)
        now = datetime(2026, 11, 27, 12, tzinfo=UTC)
        events = [event_from_record(record(i, occurred_at=now - timedelta(hours=i * 5), is_byollm=i % 3 == 0))
                  for i in range(24)]  # fmt: skip
        with factory() as session:
            assert ingest(session, events, markup_pct=Decimal(20), now=now).inserted == 24
            session.commit()
        before = _coarse_rows(engine)
        assert all(len(rows) > 1 for rows in before.values())
        migrate.downgrade(fresh_url, "0004")
        engine.dispose()
        assert "platform_usage_daily" not in inspect(engine).get_table_names()
        migrate.upgrade(fresh_url)
        engine.dispose()
        assert _coarse_rows(engine) == before
        with factory() as session:
            report = run_checks(session)
        assert report.ok, report.problems
    finally:
        engine.dispose()


def _coarse_rows(engine: Engine) -> dict[str, set[tuple[object, ...]]]:
    with engine.connect() as conn:
        return {r.table: {tuple(row) for row in conn.execute(text(f"SELECT * FROM {r.table}"))} for r in COARSE_ROLLUPS}


def test_0007_records_the_periods_already_finalized(fresh_url: str) -> None:
    """Upgrading a database with finalized invoices: their months become finalized periods (for every user)."""
    from metering.billing.invoice_store import finalize_period

    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        factory = make_session_factory(engine)
        october = datetime(2026, 10, 10, tzinfo=UTC)
        with factory() as session:
            ingest(session, [event_from_record(record(0, occurred_at=october))], now=october)
            assert len(finalize_period(session, "2026-10", datetime(2026, 11, 27, tzinfo=UTC), timedelta(0))) == 1
            session.commit()
        migrate.downgrade(fresh_url, "0006")
        engine.dispose()
        assert "finalized_periods" not in inspect(engine).get_table_names()
        migrate.upgrade(fresh_url)
        engine.dispose()
        with engine.connect() as conn:
            assert [tuple(r) for r in conn.execute(text("SELECT period FROM finalized_periods"))] == [("2026-10",)]
    finally:
        engine.dispose()
