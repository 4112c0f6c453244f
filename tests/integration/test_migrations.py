"""Alembic: upgrade head / downgrade base / upgrade again on both backends; models match migrations."""

from __future__ import annotations

import importlib.util
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

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
from tests.fakes.events import record
from tests.integration.migration_steps import assert_refused


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


def test_0010_gives_stored_keys_their_tenant_and_refuses_to_downgrade_over_a_shared_key(fresh_url: str) -> None:
    """A key stored before 0010 (global, ``key:{key}`` id) is found by its tenant afterwards: a retry returns
    the first result; another tenant may then use the same key, and downgrading would break the global index, so
    it is refused and changes nothing."""
    from metering.billing.credits import add_credit
    from metering.billing.ledger import transfer_id
    from metering.errors import IdempotencyConflictError

    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    try:
        factory = make_session_factory(engine)
        with factory() as session:  # creates the wallet and the top-ups account
            add_credit(session, tenant_id="t1", user_id="u1", amount=Decimal(1), idempotency_key="new", now=now)
            session.commit()
        migrate.downgrade(fresh_url, "0009")
        engine.dispose()
        old_id = transfer_id("key:old", "credit")
        with engine.begin() as conn:  # a credit of $2 as the code before 0010 posted it
            uid = old_id.hex if engine.dialect.name == "sqlite" else old_id
            conn.execute(
                text(
                    "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount_nanos, currency, kind,"
                    " idempotency_key, created_at) VALUES (:id, 'platform:topups', 'user:t1:u1', 2000000000, 'USD',"
                    " 'credit', 'old', :at)"
                ),
                {"id": uid, "at": now.replace(tzinfo=None) if engine.dialect.name == "sqlite" else now},
            )
            conn.execute(text("UPDATE accounts SET balance_nanos = balance_nanos + 2000000000 WHERE id = 'user:t1:u1'"))
            conn.execute(
                text("UPDATE accounts SET balance_nanos = balance_nanos - 2000000000 WHERE id = 'platform:topups'")
            )
        migrate.upgrade(fresh_url)
        engine.dispose()
        with engine.connect() as conn:
            keys = dict(conn.execute(text("SELECT idempotency_key, idempotency_tenant_id FROM transfers")).all())
        assert keys == {"new": "t1", "old": "t1"}
        with factory() as session:
            again = add_credit(session, tenant_id="t1", user_id="u1", amount=Decimal(2), idempotency_key="old", now=now)
            assert (again.replayed, again.transfer_id, again.amount_nanos) == (True, old_id, 2_000_000_000)
            with pytest.raises(IdempotencyConflictError, match=r"\(a credit of \$2\.00 for user 'u1'\)"):
                add_credit(session, tenant_id="t1", user_id="u1", amount=Decimal(3), idempotency_key="old", now=now)
            session.rollback()
            other = add_credit(session, tenant_id="t2", user_id="u1", amount=Decimal(3), idempotency_key="old", now=now)
            assert other.replayed is False and other.transfer_id != old_id
            session.commit()
            assert run_checks(session).ok
        assert_refused(fresh_url, "0009", r"more than one tenant .*\['old'\]")  # one transaction: all undone
        engine.dispose()
        with factory() as session:
            assert session.scalar(text("SELECT COUNT(*) FROM transfers")) == 3
    finally:
        engine.dispose()


def test_0002_counts_the_events_already_stored_and_reprice_prices_them(fresh_url: str) -> None:
    """Upgrading a database whose events were stored at 0001 (no billing yet): the upgrade gives them the state
    ingest gives an event without a price (BYOLLM excluded, a failed call without usage not billable, the others
    held) and rollups counting them, so usage and the checks agree with the raw events at once; reprice then
    prices them. Before, every event became 'unpriced' with no rollup at all: the usage API and /metrics missed
    them, `billing check` failed, and reprice made rollup rows of 0 calls and -1 held events."""
    from metering.billing.reprice import reprice_held

    migrate.upgrade(fresh_url, "0001")
    engine = make_engine(fresh_url)
    try:
        factory = make_session_factory(engine)
        now = datetime(2026, 11, 27, 12, tzinfo=UTC)
        records = [
            record(0, occurred_at=now - timedelta(hours=1)),
            record(1, occurred_at=now - timedelta(hours=1), is_byollm=True),
            record(2, occurred_at=now - timedelta(hours=30), model="acme-private-7b"),
            record(3, occurred_at=now, status="error", error_type="X", usage_completeness="missing",
                   input_tokens=0, output_tokens=0, cache_read_tokens=0, stop_reason=None),
        ]  # fmt: skip
        _insert_0001_events(engine, records, now)  # as 0001 stored them: no billing columns, no rollups
        migrate.upgrade(fresh_url)
        engine.dispose()
        with factory() as session:
            states = [tuple(r) for r in session.execute(text("SELECT billing_status FROM usage_events ORDER BY 1"))]
            assert states == [("excluded_byollm",), ("not_billable",), ("unpriced",), ("unpriced",)]
            report = run_checks(session)
            assert report.ok, report.problems
            result = reprice_held(session, markup_pct=Decimal(20), now=now)
            session.commit()
        assert (result.priced, result.still_unpriced, result.shadow_priced) == (1, 1, 1)
        with factory() as session:  # a new event of the same bucket adds to the upgrade's rollup row
            ingest(session, [record(4, occurred_at=now - timedelta(minutes=50))], markup_pct=Decimal(20), now=now)
            session.commit()
            assert session.execute(text("SELECT count(*) FROM usage_rollups")).scalar() == 4
            report = run_checks(session)
        assert report.ok, report.problems
    finally:
        engine.dispose()


@pytest.mark.slow
def test_processes_migrating_at_once_run_one_after_the_other(fresh_url: str) -> None:
    """Replicas starting together, or a command run while `serve` migrates: several processes upgrade one empty
    database at once. Each waits for the one before it and finds the database at head; all succeed (the others
    failed with 'already exists')."""
    import subprocess
    import sys

    code = "import sys; from metering.db import migrate; migrate.upgrade(sys.argv[1])"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, fresh_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    failures = [err.decode()[-500:] for p in processes for _out, err in [p.communicate(timeout=120)] if p.returncode]
    assert failures == []
    engine = make_engine(fresh_url)
    try:
        assert migrate.current_revision(engine) == migrate.head_revision(fresh_url)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_run_waits_for_a_migration_longer_than_the_busy_timeout(fresh_url: str) -> None:
    """Another run holds the migration lock for longer than SQLite's busy_timeout (10 s; upgrading a database of
    1M events from 0001 takes ~20 s): this one waits for it and then finds nothing left to do. On SQLite it gave
    up after 10 s with 'database is locked' (a replica or a command started meanwhile failed)."""
    import subprocess
    import sys

    migrate.upgrade(fresh_url, "0009")
    engine = make_engine(fresh_url)
    code = "import sys; from metering.db import migrate; migrate.upgrade(sys.argv[1])"
    try:
        with engine.connect() as conn:  # the lock env.py takes, held as a long migration holds it
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('metering:migrations'))"))
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            waiting = subprocess.Popen([sys.executable, "-c", code, fresh_url], stderr=subprocess.PIPE)
            time.sleep(11)
            assert waiting.poll() is None, "it must wait for the lock"
            head = migrate.head_revision(fresh_url)
            conn.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{head}'")  # the other run reached head
            conn.commit()
        _out, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, err.decode()[-500:]
        assert migrate.current_revision(engine) == head
    finally:
        engine.dispose()


def test_0011_keeps_stored_events_billed_as_they_were_and_refuses_to_drop_searches(fresh_url: str) -> None:
    """Events stored before 0011 get 0 one-hour writes and 0 searches (what they were billed for) and re-rate to
    the same price; once an event uses them, the downgrade is refused and changes nothing."""
    from metering.billing.rerate import plan_rerate

    migrate.upgrade(fresh_url, "0010")
    engine = make_engine(fresh_url)
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    try:
        migrate.upgrade(fresh_url)
        factory = make_session_factory(engine)
        with factory() as session:
            ingest(session, [event_from_record(record(0, occurred_at=now - timedelta(hours=1)))], now=now)
            session.commit()
        migrate.downgrade(fresh_url, "0010")  # nothing uses them yet: allowed
        engine.dispose()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM usage_events")).scalar() == 1
        migrate.upgrade(fresh_url)
        engine.dispose()
        with factory() as session:
            assert plan_rerate(session, start=start, end=end, markup_pct=Decimal(0)).diff.changes == []
            searched = record(1, occurred_at=now - timedelta(hours=1), web_searches=2)
            ingest(session, [event_from_record(searched)], now=now)
            session.commit()
        assert_refused(fresh_url, "0010", r"cannot downgrade below 0011: .*" + searched["event_id"][:8])
        engine.dispose()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT sum(web_searches) FROM usage_events")).scalar() == 2
    finally:
        engine.dispose()


def test_0011_refuses_to_downgrade_over_an_override_with_a_search_or_1_hour_price(fresh_url: str) -> None:
    from metering.billing.overrides import add_override

    engine = make_engine(fresh_url)
    try:
        migrate.upgrade(fresh_url)
        factory = make_session_factory(engine)
        with factory() as session:
            add_override(session, provider="anthropic", model_pattern="claude-*", id="plain",
                         effective_from=datetime(2026, 1, 1, tzinfo=UTC), effective_to=None,
                         input_mtok=Decimal(3), output_mtok=Decimal(15))  # fmt: skip
            add_override(session, provider="anthropic", model_pattern="claude-sonnet-*", id="hour",
                         effective_from=datetime(2026, 1, 1, tzinfo=UTC), effective_to=None,
                         input_mtok=Decimal(3), output_mtok=Decimal(15), cache_write_1h_mtok=Decimal(6))  # fmt: skip
            session.commit()
        assert_refused(fresh_url, "0010", r"cannot downgrade below 0011: .*'hour'")
        engine.dispose()
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, cache_write_1h_nanos_per_mtok FROM price_overrides ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [("hour", 6_000_000_000), ("plain", None)]
    finally:
        engine.dispose()


def test_0012_fills_the_rollups_search_and_1_hour_counts_from_the_events(fresh_url: str) -> None:
    """Rollups written before 0012 had no 1-hour writes or searches: the upgrade sums them from the events into
    every rollup table, each bucket its own (ingested at head, downgraded to 0011, upgraded again)."""
    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    tables = ("usage_rollups", *(r.table for r in COARSE_ROLLUPS))
    try:
        factory = make_session_factory(engine)
        now = datetime(2026, 11, 27, 12, tzinfo=UTC)
        events = [
            event_from_record(
                record(i, occurred_at=now - timedelta(hours=i * 7), tenant_id=f"tenant-{i % 2}",
                       is_byollm=i % 4 == 0, input_tokens=5_000, cache_write_tokens=3_000,
                       cache_write_1h_tokens=(i % 3) * 1_000, web_searches=i % 5)
            )
            for i in range(30)
        ]  # fmt: skip
        with factory() as session:
            assert ingest(session, events, markup_pct=Decimal(20), now=now).inserted == 30
            session.commit()
        columns = "cache_write_1h_tokens, web_searches"
        with engine.connect() as conn:
            before = {t: {tuple(row) for row in conn.execute(text(f"SELECT * FROM {t}"))} for t in tables}
            sums = {t: tuple(conn.execute(text(f"SELECT sum(cache_write_1h_tokens), sum(web_searches) FROM {t}")).one())
                    for t in tables}  # fmt: skip
        expected = (sum(e.cache_write_1h_tokens for e in events), sum(e.web_searches for e in events))
        assert expected == (30_000, 60)
        assert all(s == expected for s in sums.values()), sums
        migrate.downgrade(fresh_url, "0011")
        engine.dispose()
        with engine.connect() as conn:
            for table in tables:
                assert not {"cache_write_1h_tokens", "web_searches"} & {
                    c["name"] for c in inspect(conn).get_columns(table)
                }
        migrate.upgrade(fresh_url)
        engine.dispose()
        with engine.connect() as conn:
            after = {t: {tuple(row) for row in conn.execute(text(f"SELECT * FROM {t}"))} for t in tables}
            assert conn.execute(text(f"SELECT {columns} FROM usage_rollups WHERE web_searches > 0")).all()
        assert after == before
        with factory() as session:
            report = run_checks(session)
        assert report.ok, report.problems
    finally:
        engine.dispose()


# A tenant's hour rows that no event with searches falls in (other users): the bulk of a real database's rollups.
_FILLERS = {
    "sqlite": "strftime('%Y-%m-%d %H:00:00.000000', '2026-01-01', '+' || (i % 2000) || ' hours')",
    "postgresql": "timestamptz '2026-01-01 00:00:00+00' + (i % 2000) * interval '1 hour'",
}


def _migration(revision: str) -> Any:
    """A migration module of alembic/versions, loaded as a file (the directory is not a package)."""
    [path] = (Path(__file__).parents[2] / "alembic" / "versions").glob(f"{revision}_*.py")
    spec = importlib.util.spec_from_file_location(f"migration_{revision}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_0012_fills_a_tenant_with_many_rollup_rows_in_one_pass(fresh_url: str) -> None:
    """The backfill joins each rollup table once with the events' sums: on SQLite it searched, for every group of
    events with searches, all the rollup rows of its tenant (the hour compared through substr, so only the tenant
    index applied): 44,000 rows and 4,000 groups took ~15 s, a year of one tenant hours, under the write lock. Its
    query plans now read each rollup table once."""
    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        start = datetime(2026, 1, 1, tzinfo=UTC)
        events = [
            event_from_record(record(0, occurred_at=start + timedelta(hours=i, minutes=7), web_searches=1 + i % 3))
            for i in range(4_000)
        ]
        with make_session_factory(engine)() as session:
            assert ingest(session, events, now=start + timedelta(days=200)).inserted == 4_000
            session.commit()
        dialect = "postgresql" if fresh_url.startswith("postgresql") else "sqlite"
        counters = "calls, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, "
        counters += "billed_nanos, shadow_nanos, cost_nanos, latency_us_sum, error_count, unpriced_count"
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO usage_rollups (hour, tenant_id, user_id, extension_id, function, purpose, provider, "
                    f"model, is_byollm, status, {counters}) WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 "
                    f"FROM n WHERE i < 39999) SELECT {_FILLERS[dialect]}, 'tenant-1', 'filler-' || (i / 2000), "
                    "'rewrite', 'rewrite', 'content_rewrite', 'anthropic', 'claude-sonnet-4-6', false, 'ok', "
                    "1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0 FROM n"
                )
            )
        if dialect == "sqlite":  # each rollup table read once, each of its rows finding its sums in an index of them
            with engine.connect() as conn:
                for statement in _migration("0012").backfill_statements(postgresql=False):
                    plan = [row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}")]
                    table = statement.split()[1]
                    assert any(step.startswith(f"SCAN {table}") for step in plan), plan
                    assert any(step.startswith("SEARCH s USING AUTOMATIC") for step in plan), plan
                    assert not any(step.startswith(f"SEARCH {table}") for step in plan), plan
        migrate.downgrade(fresh_url, "0011")
        engine.dispose()
        migrate.upgrade(fresh_url)
        engine.dispose()
        with engine.connect() as conn:
            sums = conn.execute(text("SELECT count(*), sum(web_searches) FROM usage_rollups")).one()
        assert tuple(sums) == (44_000, sum(e.web_searches for e in events))
    finally:
        engine.dispose()


def test_0007_refuses_to_downgrade_over_a_period_no_finalized_invoice_restores(fresh_url: str) -> None:
    """A month finalized without billing anyone (no invoice) is closed only by its ``finalized_periods`` row: the
    0007 upgrade refills the table from finalized invoices alone, so dropping that row would reopen the month for
    good (a late event billed into it). The downgrade is refused, names the month, and changes nothing."""
    from metering.billing.invoice_store import finalize_period

    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        factory = make_session_factory(engine)
        with factory() as session:
            assert finalize_period(session, "2026-09", datetime(2026, 11, 27, tzinfo=UTC), timedelta(0)) == []
            session.commit()
        assert_refused(fresh_url, "0006", r"cannot downgrade below 0007: .*2026-09")
        engine.dispose()
        with engine.connect() as conn:
            assert [tuple(r) for r in conn.execute(text("SELECT period FROM finalized_periods"))] == [("2026-09",)]
    finally:
        engine.dispose()


def test_0006_refuses_to_downgrade_over_a_correction_line(fresh_url: str) -> None:
    """``invoice_lines.correction_of`` is the only record that a line corrects a re-rated month: dropping it would
    turn the line into a usage line of the invoice's own month, which no upgrade can undo. Refused, nothing changed."""
    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        invoice = "0f0f0f0f-0000-4000-8000-000000000001"
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO invoices (id, tenant_id, user_id, period, status, currency, total_nanos, "
                    "rounded_nanos, residue_nanos, finalized_at) VALUES (:id, 't', 'u', '2026-11', 'finalized', "
                    "'USD', 5, 0, 5, :at)"
                ),
                {"id": invoice if engine.dialect.name == "postgresql" else invoice.replace("-", ""),
                 "at": datetime(2026, 12, 2, tzinfo=UTC)},
            )  # fmt: skip
            conn.execute(
                text(
                    "INSERT INTO invoice_lines (invoice_id, line_no, extension_id, model, is_late, calls, "
                    "billed_nanos, correction_of) VALUES (:id, 1, 'ext', 'm', :f, 0, 5, '2026-10')"
                ),
                {"id": invoice if engine.dialect.name == "postgresql" else invoice.replace("-", ""), "f": False},
            )
        assert_refused(fresh_url, "0005", r"cannot downgrade below 0006: .*2026-10")
        engine.dispose()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT correction_of FROM invoice_lines")).scalar() == "2026-10"
    finally:
        engine.dispose()


def _insert_0001_events(engine: Engine, records: list[dict[str, Any]], now: datetime) -> None:
    """Events as revision 0001 stored them: plain rows of its ``usage_events`` table (reflected, not today's model)."""
    from sqlalchemy import MetaData, Table

    sqlite = engine.dialect.name == "sqlite"
    table = Table("usage_events", MetaData(), autoload_with=engine)
    rows = []
    for r in records:
        e = event_from_record(r)
        row = {c.name: getattr(e, c.name) for c in table.columns if hasattr(e, c.name)}
        row |= {"usage_completeness": e.usage_completeness.value, "status": e.status.value, "ingested_at": now,
                "budget_exceeded": list(e.budget_exceeded)}  # fmt: skip
        if sqlite:
            row |= {"event_id": e.event_id.hex, "invocation_id": e.invocation_id.hex,
                    "occurred_at": e.occurred_at.replace(tzinfo=None),
                    "ingested_at": now.replace(tzinfo=None)}  # fmt: skip
        rows.append(row)
    assert set(rows[0]) == {c.name for c in table.columns}
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)


def test_0002_refuses_to_downgrade_over_the_ledger(fresh_url: str) -> None:
    """Below 0002 there is no ledger: dropping it loses every credit, charge, balance and invoice, which the 0002
    upgrade cannot restore (it only holds the events as unpriced). Refused, named, nothing changed."""
    from metering.billing.credits import add_credit

    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    try:
        factory = make_session_factory(engine)
        with factory() as session:
            add_credit(session, tenant_id="t", user_id="u", amount=Decimal(5), idempotency_key="k", now=now)
            session.commit()
        assert_refused(fresh_url, "0001", r"cannot downgrade below 0002: .*1 transfers")
        engine.dispose()
        with engine.connect() as conn:
            wallets = text("SELECT sum(balance_nanos) FROM accounts WHERE kind = 'user_wallet'")
            assert conn.execute(wallets).scalar() == 5_000_000_000
    finally:
        engine.dispose()


def test_0009_refuses_to_downgrade_over_a_long_account_id_and_names_it(fresh_url: str) -> None:
    """A wallet id longer than 300 characters (a tenant and user of 200 each) does not fit the columns below 0009:
    on PostgreSQL the downgrade is refused naming the account (was the database's bare 'value too long'), and
    changes nothing; SQLite does not enforce the length, so nothing is lost there and it is allowed."""
    from metering.billing.credits import add_credit

    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    try:
        factory = make_session_factory(engine)
        with factory() as session:
            add_credit(session, tenant_id="t" * 200, user_id="u" * 200, amount=Decimal(5), idempotency_key="k", now=now)
            session.commit()
        if engine.dialect.name == "sqlite":
            migrate.downgrade(fresh_url, "0008")
            engine.dispose()
            migrate.upgrade(fresh_url)
        else:
            assert_refused(fresh_url, "0008", r"cannot downgrade below 0009: .*user:tttt")
            engine.dispose()
        with factory() as session:
            report = run_checks(session)
            assert report.ok, report.problems
            wallets = text("SELECT length(id), balance_nanos FROM accounts WHERE kind = 'user_wallet'")
            assert [tuple(r) for r in session.execute(wallets)] == [(406, 5_000_000_000)]
    finally:
        engine.dispose()


def test_0012_holds_the_rollup_tables_locked_until_the_whole_run_commits_on_postgresql(
    fresh_url: str,
) -> None:
    """The whole run is one transaction, and adding a column takes PostgreSQL's ACCESS EXCLUSIVE lock, held to the
    commit: while 0012 runs (here held up by a reader of ``user_usage_daily``, its last table; in production by
    its backfill over every event with searches), a replica serving the old code cannot even read
    ``usage_rollups``, let alone roll up an ingest. Documented (docs/api.md); proved here with a lock_timeout."""
    import threading

    from sqlalchemy.exc import OperationalError

    if not fresh_url.startswith("postgresql"):
        pytest.skip("SQLite: a migration holds the database write lock, documented already")
    migrate.upgrade(fresh_url, "0011")
    engine = make_engine(fresh_url)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            migrate.upgrade(fresh_url, lock_timeout_s=0)  # waits for the reader as long as it takes
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    try:
        with engine.connect() as reader, engine.connect() as server:
            reader.execute(text("SELECT count(*) FROM user_usage_daily"))  # its lock held until the commit
            migration = threading.Thread(target=run)
            migration.start()
            waiting = text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'ALTER TABLE%'"
            )
            while not server.execute(waiting).scalar():  # a new snapshot of pg_stat_activity each transaction
                server.commit()
                assert migration.is_alive(), errors
                time.sleep(0.05)
            server.commit()
            server.execute(text("SET lock_timeout = '100ms'"))
            with pytest.raises(OperationalError, match="lock timeout"):
                server.execute(text("SELECT count(*) FROM usage_rollups"))
            server.rollback()
            reader.commit()
            migration.join(timeout=120)
        assert errors == []
        assert migrate.current_revision(engine) == migrate.head_revision(fresh_url)
    finally:
        engine.dispose()


def test_offline_sql_renders_every_revision_for_postgresql(capsys: pytest.CaptureFixture[str]) -> None:
    """``alembic upgrade head --sql`` (a script for a DBA, no connection) renders every revision for PostgreSQL,
    0002's rollup backfill included (its savepoint, which reports names too wide for the rollup key, needs a live
    connection and is skipped: it failed with 'MockConnection' object has no attribute 'begin_nested')."""
    from alembic import command

    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # never connected to
    command.upgrade(migrate.alembic_config(url), "head", sql=True)
    script = capsys.readouterr().out
    assert "INSERT INTO usage_rollups" in script
    assert f"UPDATE alembic_version SET version_num='{migrate.head_revision(url)}'" in script
