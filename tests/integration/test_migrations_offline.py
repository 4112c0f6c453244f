"""Offline migrations (``alembic upgrade|downgrade … --sql``): a script for a DBA, rendered without a connection.

PostgreSQL: the upgrade script builds the schema ``upgrade head`` builds, step by step too; the downgrade script
takes an empty database back to base, and a downgrade refusal is a check the script makes when it is run (it
raised a traceback while rendering: no connection to count the rows with). SQLite: a step the script cannot hold
(a table rebuilt in batch mode, a refusal's check) fails rendering with one line naming the revision.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from alembic import command
from metering.db import migrate
from metering.db.engine import make_engine
from metering.db.migration_script import refuse_when_run
from tests.conftest import temporary_pg_database

NO_PG = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # offline: never connected to


def render(url: str, direction: str, revision: str) -> str:
    """The SQL ``alembic <direction> <revision> --sql`` prints for ``url``'s dialect."""
    config = migrate.alembic_config(url)
    config.output_buffer = io.StringIO()
    getattr(command, direction)(config, revision, sql=True)
    script: str = config.output_buffer.getvalue()
    return script


def alembic_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``alembic`` command itself, as a DBA runs it (the URL from ``METERING_DATABASE_URL``)."""
    env = {**os.environ, "METERING_DATABASE_URL": url}
    alembic = Path(sys.executable).parent / "alembic"
    return subprocess.run([alembic, *args], cwd=migrate.PROJECT_ROOT, env=env, capture_output=True, text=True)


def run_pg_script(url: str, script: str) -> None:
    """Run a rendered script as one simple query (as ``psql -f`` would, stopping at the first error)."""
    with psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(False), autocommit=True) as conn:
        conn.execute(script.encode())


def _plain(found: Any) -> str:
    """A reflected index or constraint as text (a ``sqlite_where`` clause by its SQL, not its object)."""
    return json.dumps(found, sort_keys=True, default=str)


def schema(url: str) -> dict[str, Any]:
    """Everything inspection tells of the database: tables, columns, keys, indexes, constraints, revision."""
    engine = make_engine(url)
    try:
        found = inspect(engine)
        tables: dict[str, Any] = {}
        for table in sorted(found.get_table_names()):
            tables[table] = {
                "columns": [(c["name"], str(c["type"]), c["nullable"], c["default"]) for c in found.get_columns(table)],
                "pk": found.get_pk_constraint(table),
                "indexes": sorted(_plain(i) for i in found.get_indexes(table)),
                "uniques": sorted(_plain(u) for u in found.get_unique_constraints(table)),
                "checks": sorted(_plain(c) for c in found.get_check_constraints(table)),
                "foreign_keys": sorted(_plain(f) for f in found.get_foreign_keys(table)),
            }
        tables["(revision)"] = migrate.current_revision(engine)
        return tables
    finally:
        engine.dispose()


def _steps() -> list[tuple[str, str]]:
    """(revision, the one before it or 'base'), from 0001 up to head."""
    scripts = ScriptDirectory.from_config(migrate.alembic_config(NO_PG))
    return [(s.revision, str(s.down_revision or "base")) for s in reversed(list(scripts.walk_revisions()))]


@pytest.fixture
def two_pg_databases() -> Iterator[tuple[str, str]]:
    with temporary_pg_database() as offline, temporary_pg_database() as online:
        yield offline, online


def test_the_upgrade_script_builds_the_schema_the_online_upgrade_builds_step_by_step_on_postgresql(
    two_pg_databases: tuple[str, str],
) -> None:
    """Each step's script (``upgrade a:b --sql``) run on one database, the online upgrade on the other: the same
    schema after every step, and the whole script (``upgrade head --sql``) on an empty database the same again."""
    offline, online = two_pg_databases
    for revision, before in _steps():
        run_pg_script(offline, render(offline, "upgrade", revision if before == "base" else f"{before}:{revision}"))
        migrate.upgrade(online, revision)
        assert schema(offline) == schema(online), revision
    with temporary_pg_database() as whole:
        run_pg_script(whole, render(whole, "upgrade", "head"))
        assert schema(whole) == schema(online)


def test_the_downgrade_script_takes_an_empty_database_down_step_by_step_on_postgresql(
    two_pg_databases: tuple[str, str],
) -> None:
    """Each step's downgrade script (its refusal's check passing: nothing stored) does what the online downgrade
    does; the whole script (``downgrade head:base --sql``) leaves nothing but an empty ``alembic_version``."""
    offline, online = two_pg_databases
    migrate.upgrade(offline)
    migrate.upgrade(online)
    for revision, before in reversed(_steps()):
        run_pg_script(offline, render(offline, "downgrade", f"{revision}:{before}"))
        migrate.downgrade(online, before)
        assert schema(offline) == schema(online), revision
    migrate.upgrade(offline)
    run_pg_script(offline, render(offline, "downgrade", "head:base"))
    assert schema(offline) == {"alembic_version": schema(online)["alembic_version"], "(revision)": None}


# What each refusal keeps (one row of it, at head), and the revision that refuses to drop it.
BLOCKERS = {
    "0011": "INSERT INTO price_overrides (id, provider, model_pattern, effective_from, input_nanos_per_mtok, "
    "output_nanos_per_mtok, created_at, web_search_nanos_per_k) VALUES ('o', 'anthropic', '*', now(), 1, 1, now(), 10)",
    "0010": "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount_nanos, currency, kind, "
    "idempotency_key, idempotency_tenant_id, created_at) VALUES (gen_random_uuid(), 'a', 'b', 1, 'USD', 'credit', "
    "'k', 't1', now()), (gen_random_uuid(), 'a', 'b', 1, 'USD', 'credit', 'k', 't2', now())",
    "0009": "INSERT INTO accounts (id, kind, currency, balance_nanos, created_at) "
    "VALUES (repeat('u', 301), 'user_wallet', 'USD', 0, now())",
    "0008": "INSERT INTO invoke_requests (tenant_id, idempotency_key, request_sha256, invocation_id, state, "
    "claimed_at) VALUES ('t', 'k', 'x', gen_random_uuid(), 'running', now() - interval '23 hours')",
    "0007": "INSERT INTO finalized_periods (period, finalized_at) VALUES ('2026-09', now())",
    "0006": "INSERT INTO invoice_lines (invoice_id, line_no, extension_id, model, is_late, calls, billed_nanos, "
    "correction_of) VALUES (gen_random_uuid(), 1, 'e', 'm', false, 0, 5, '2026-10')",
    "0004": "INSERT INTO audit_log (id, at, actor_name, action, target) "
    "VALUES (gen_random_uuid(), now(), 'ops', 'credit.add', 'user:t:u')",
    "0003": "INSERT INTO api_tokens (id, name, token_hash, prefix, scopes, created_at) "
    "VALUES (gen_random_uuid(), 'bot', 'h', 'p', '[]', now())",
    "0002": "INSERT INTO invoices (id, tenant_id, user_id, period, status, currency, total_nanos, rounded_nanos, "
    "residue_nanos, finalized_at) VALUES (gen_random_uuid(), 't', 'u', '2026-10', 'finalized', 'USD', 0, 0, 0, now())",
    "0001": "INSERT INTO purpose_settings (purpose, provider, model, params, updated_at) "
    "VALUES ('rewrite', 'anthropic', 'm', '{}', now())",
}


@pytest.mark.parametrize("revision", list(BLOCKERS))
def test_the_downgrade_script_refuses_when_it_is_run_over_what_it_would_lose_on_postgresql(revision: str) -> None:
    """Rendering needs no connection; running the script over a row the revision's downgrade refuses to drop
    fails at that revision, with its reason, and (one transaction) changes nothing: still at head, the row kept."""
    script = render(NO_PG, "downgrade", "head:base")
    with temporary_pg_database() as url:
        migrate.upgrade(url)
        run_pg_script(url, BLOCKERS[revision])
        before = schema(url)
        with pytest.raises(psycopg.errors.RaiseException, match=rf"^cannot downgrade below {revision}: .*changed"):
            run_pg_script(url, script)
        assert schema(url) == before
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                table = BLOCKERS[revision].split()[2]
                assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar()
        finally:
            engine.dispose()


def test_an_invoke_key_past_its_24_hours_does_not_block_the_downgrade_script_on_postgresql() -> None:
    """0008 keeps a key 24 h: the script checks the time when it is run, so an older key is dropped as online."""
    with temporary_pg_database() as url:
        migrate.upgrade(url)
        run_pg_script(url, BLOCKERS["0008"].replace("23 hours", "25 hours"))
        run_pg_script(url, render(url, "downgrade", "head:base"))
        assert schema(url)["(revision)"] is None


def test_the_cli_renders_both_scripts_for_postgresql() -> None:
    """``alembic downgrade head:base --sql`` failed with a traceback (``'NoneType' object is not iterable`` in
    0011's refusal): both directions now render, exit 0, print no error."""
    for args in (("upgrade", "head", "--sql"), ("downgrade", "head:base", "--sql")):
        done = alembic_cli(NO_PG, *args)
        assert (done.returncode, done.stderr) == (0, ""), args
        assert "COMMIT;" in done.stdout


def test_sqlite_renders_what_it_can_run_and_names_the_step_it_cannot(tmp_path: Path) -> None:
    """SQLite: 0001's script runs and builds what the online upgrade builds. 0002 rebuilds ``usage_events``
    (batch mode: the table read from the database) and 0003's downgrade counts the tokens first: neither can be
    rendered, and each fails with one line naming the step and what to do, never a traceback."""
    import sqlite3
    from contextlib import closing

    rendered, online = f"sqlite:///{tmp_path / 'offline.db'}", f"sqlite:///{tmp_path / 'online.db'}"
    with closing(sqlite3.connect(tmp_path / "offline.db")) as conn:
        conn.executescript(render(rendered, "upgrade", "0001"))
    migrate.upgrade(online, "0001")
    assert schema(rendered) == schema(online)

    for args, step in (
        (("upgrade", "head", "--sql"), "upgrade 0001 -> 0002"),
        (("downgrade", "0003:0002", "--sql"), "downgrade 0003 -> 0002"),
        (("downgrade", "head:base", "--sql"), "downgrade 0012 -> 0011"),
    ):
        done = alembic_cli(online, *args)
        errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("FAILED")]
        assert done.returncode != 0 and len(errors) == 1 and "Traceback" not in done.stderr, (args, done.stderr)
        assert errors[0].startswith(f"FAILED: cannot render {step} for SQLite offline (--sql): "), errors
        assert "metering migrate" in errors[0] or "without --sql" in errors[0], errors


def test_each_sqlite_step_renders_a_script_doing_what_the_online_step_does_or_names_itself(tmp_path: Path) -> None:
    """Every step up from base to head and back down, on SQLite: its script, run, leaves the schema the online step
    leaves, or rendering it fails with the one ``cannot render <step> for SQLite offline`` error (the database then
    taken through that step online, as the error says): the steps that rebuild a table (batch mode) and the
    downgrades whose refusal looks for rows first."""
    import sqlite3
    from contextlib import closing

    from alembic.util import CommandError

    offline, online = tmp_path / "offline.db", tmp_path / "online.db"
    url = f"sqlite:///{online}"
    up = [("upgrade", before, revision) for revision, before in _steps()]
    refused = []
    for direction, start, end in (*up, *(("downgrade", end, start) for _, start, end in reversed(up))):
        getattr(migrate, direction)(url, end)
        try:
            script = render(url, direction, end if start == "base" else f"{start}:{end}")
        except CommandError as exc:
            assert str(exc).startswith(f"cannot render {direction} {start} -> {end} for SQLite offline (--sql): ")
            refused.append(f"{direction} {start} -> {end}")
            with closing(sqlite3.connect(online)) as source, closing(sqlite3.connect(offline)) as copy:
                source.backup(copy)  # WAL mode: the file alone may not hold every page yet
            continue
        with closing(sqlite3.connect(offline)) as conn:
            conn.executescript(script)
        assert schema(f"sqlite:///{offline}") == schema(url), (direction, start, end)
    assert refused == [
        "upgrade 0001 -> 0002",  # usage_events rebuilt (a column with a server default SQLite cannot add)
        "upgrade 0008 -> 0009",  # accounts and transfers rebuilt (a column's type changed)
        # every downgrade but 0005's and 0013's (they drop tables, nothing to look for first)
        *(
            f"downgrade {revision} -> {before}"
            for revision, before in reversed(_steps())
            if revision not in ("0005", "0013")
        ),
    ]


@pytest.mark.parametrize(
    ("reason", "query"),
    [
        ("the tenant 'a:b' holds rows::text", "SELECT 'x:y'::text WHERE 'it''s' <> ''"),
        # '%' went through text() too and came out doubled: length('%%') is 2, so this check never fired
        ("ids with 100% of", "SELECT 1 WHERE length('%') = 1 AND 'a_b' LIKE 'a%'"),
    ],
)
def test_a_refusal_s_message_and_query_come_out_as_written_in_the_script_on_postgresql(reason: str, query: str) -> None:
    """``refuse_when_run`` writes its message into a string literal of a ``DO`` block and its queries as they are:
    quotes, colons (a bind parameter to ``text()``) and percent signs (doubled by ``text()`` for psycopg) come out as
    written, and the check fires when the script is run."""
    out = io.StringIO()
    context = MigrationContext.configure(url=NO_PG, opts={"as_sql": True, "literal_binds": True, "output_buffer": out})
    with Operations.context(context):
        refuse_when_run("0099", reason, query)
    with temporary_pg_database() as url:
        message = rf"^cannot downgrade below 0099: {re.escape(reason)}; nothing was changed\n"
        with pytest.raises(psycopg.errors.RaiseException, match=message):
            run_pg_script(url, out.getvalue())
