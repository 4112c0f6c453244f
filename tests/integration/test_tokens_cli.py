"""`metering tokens create / list / revoke` (in-process), on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import uuid

from sqlalchemy import select

from metering.db.models import ApiTokenRow


def test_create_prints_the_secret_once_list_never_shows_it_and_revoke(run, session_factory) -> None:
    created = run("tokens", "create", "--name", "sink eu-1", "--scope", "ingest", "--scope", "read", "-t", "tenant-1")
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    assert secret.startswith("mtr_") and created.stdout.count("mtr_") == 1
    assert "shown only once" in created.stderr and secret not in created.stderr

    with session_factory() as session:
        row = session.scalars(select(ApiTokenRow)).one()
    assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert (row.scopes, row.tenant_id) == (["ingest", "read"], "tenant-1")

    listed = run("tokens", "list")
    assert listed.exit_code == 0, listed.output
    assert secret not in listed.output and secret[8:] not in listed.output
    assert str(row.id) in listed.output and f"{secret[:8]}…" in listed.output
    assert "ingest,read" in listed.output and "tenant-1" in listed.output

    revoked = run("tokens", "revoke", str(row.id))
    assert revoked.exit_code == 0, revoked.output
    assert "revoked token sink eu-1" in revoked.output
    with session_factory() as session:
        assert session.scalars(select(ApiTokenRow.revoked_at)).one() is not None


def test_bad_input_gets_a_clear_error(run) -> None:
    no_scope = run("tokens", "create", "--name", "x")
    assert no_scope.exit_code == 1 and "at least one scope" in no_scope.stderr
    unknown = run("tokens", "create", "--name", "x", "--scope", "superuser")
    assert unknown.exit_code == 2 and "superuser" in unknown.output
    assert run("tokens", "revoke", "not-an-id").exit_code == 2
    missing = run("tokens", "revoke", str(uuid.uuid4()))
    assert missing.exit_code == 1 and "no API token" in missing.stderr


def test_names_and_tenants_that_look_like_markup_are_printed_as_they_are(run) -> None:
    created = run("tokens", "create", "--name", "[/x] ops", "--scope", "read", "-t", "[bold red]t")
    assert created.exit_code == 0, created.output  # "[/x]" crashed the console (MarkupError)
    assert "created token [/x] ops" in created.stderr and "tenant=[bold red]t" in created.stderr
    listed = run("tokens", "list")
    assert listed.exit_code == 0 and "[/x] ops" in listed.output and "[bold red]t" in listed.output


def test_list_in_a_narrow_terminal_wraps_cells_rather_than_cutting_them(run) -> None:
    created = run("tokens", "create", "--name", "sink eu-1", "--scope", "ingest", "--scope", "read", "-t", "tenant-1")
    assert created.exit_code == 0, created.output
    listed = run("tokens", "list", columns=80)
    assert listed.exit_code == 0, listed.output
    assert listed.output.count("…") == 1  # the prefix's own: name, scopes and tenant were cut to "s…", "i…", "t…"
    assert str(created.stdout.strip()[:8]) + "…" in listed.output  # the id and the prefix stay whole, on one line
