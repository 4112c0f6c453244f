"""Every CLI command that changes admin or billing state writes one audit entry (in-process, both databases).

Who: ``cli:<os user>@<host>``, no token id, no request id. What: the API's action, target and snapshots for the
same change. A failed command, a dry run, a replay and a command that changed nothing write none.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import select
from typer.testing import CliRunner

from metering.billing.ingest import ingest
from metering.cli import app
from metering.crypto import generate_key
from metering.db.models import ApiTokenRow, AuditLogRow, ByollmSettingsRow
from metering.events import event_from_record
from tests.fakes.events import record
from tests.integration.api.admin_helpers import audit_rows, table_dump

SECRET = "sk-ant-api03-CLI-SECRET-0123456789"


@pytest.fixture
def run(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    for name in ("METERING_ENV", "METERING_SECRET_KEYS", "METERING_BILLING__MARKUP_PCT"):
        monkeypatch.delenv(name, raising=False)
    env = {"METERING_DATA_DIR": str(tmp_path), "METERING_DATABASE_URL": db_url, "COLUMNS": "200"}
    runner = CliRunner()

    def invoke(*args: str, code: int = 0, **extra_env: str) -> Result:
        result = runner.invoke(app, list(args), env=env | extra_env)
        assert result.exit_code == code, (result.output, result.exception)
        return result

    return invoke


def only(session_factory: Any, action: str) -> AuditLogRow:
    rows = audit_rows(session_factory, action)
    assert len(rows) == 1, [(r.action, r.target) for r in rows]
    entry = rows[0]
    assert entry.actor_name.startswith("cli:") and "@" in entry.actor_name
    assert entry.actor_token_id is None and entry.request_id is None
    return entry


def count(session_factory: Any) -> int:
    return len(audit_rows(session_factory))


def test_settings_commands_write_one_entry_each_and_never_the_key(run, session_factory) -> None:
    run("byollm", "set", "-u", "alice", "-t", "acme", "--provider", "anthropic", "--model", "claude-haiku-4-5",
        "--api-key", SECRET)  # fmt: skip
    entry = only(session_factory, "byollm.set")
    assert (entry.target, entry.tenant_id, entry.before) == ("user:acme/alice", "acme", None)
    assert entry.after == {"user_id": "alice", "tenant_id": "acme", "provider": "anthropic",
                           "model": "claude-haiku-4-5", "base_url": None, "fallback_policy": "platform",
                           "api_key": "***"}  # fmt: skip

    run("purpose", "set", "content_rewrite", "--provider", "openai", "--model", "gpt-4o-mini",
        "--params", '{"top_p": 0.9}')  # fmt: skip
    entry = only(session_factory, "purpose.set")
    assert (entry.target, entry.tenant_id, entry.before) == ("purpose:content_rewrite", None, None)
    assert entry.after == {"provider": "openai", "model": "gpt-4o-mini", "base_url": None, "params": {"top_p": 0.9}}
    run("purpose", "delete", "content_rewrite")
    entry = only(session_factory, "purpose.delete")
    assert (entry.target, entry.after) == ("purpose:content_rewrite", None)
    assert entry.before == {"provider": "openai", "model": "gpt-4o-mini", "base_url": None, "params": {"top_p": 0.9}}

    run("budget", "set", "chatty", "--max-calls", "3")
    run("budget", "set", "chatty", "--max-calls", "5", "--mode", "enforce")
    entries = audit_rows(session_factory, "budget.set")
    assert [e.target for e in entries] == ["budget:chatty", "budget:chatty"]
    assert entries[1].before == {"max_calls": 3, "max_tokens": None, "mode": "report"}
    assert entries[1].after == {"max_calls": 5, "max_tokens": None, "mode": "enforce"}

    run("byollm", "delete", "-u", "alice")  # the CLI names no tenant: the entry has the user's
    entry = only(session_factory, "byollm.delete")
    assert (entry.target, entry.tenant_id, entry.after) == ("user:acme/alice", "acme", None)
    assert entry.before is not None and entry.before["api_key"] == "***"
    assert count(session_factory) == 6
    assert SECRET not in table_dump(session_factory, "audit_log") and SECRET[-8:] not in table_dump(
        session_factory, "audit_log"
    )


def test_a_set_that_changes_nothing_writes_no_entry_but_a_new_key_does(run, session_factory) -> None:
    """Re-running a set with the stored settings wrote an entry whose before equalled its after (ending an override or
    revoking a token twice wrote none). A new BYOLLM key with all else equal, *** before and after, is still one."""
    byollm = ("byollm", "set", "-u", "alice", "-t", "acme", "--provider", "anthropic", "--model", "claude-haiku-4-5")
    commands = [
        (*byollm, "--api-key", SECRET),
        ("purpose", "set", "content_rewrite", "--provider", "openai", "--model", "gpt-4o", "--params", '{"seed": 1}'),
        ("budget", "set", "chatty", "--max-calls", "3"),
    ]
    for command in commands:
        first, again = run(*command), run(*command)
        assert again.stdout == first.stdout  # the same settings, the same updated_at
    assert count(session_factory) == 3

    run(*byollm, "--api-key", SECRET + "-2")
    replaced = audit_rows(session_factory, "byollm.set")[-1]
    assert replaced.before == replaced.after and replaced.after["api_key"] == "***"
    assert count(session_factory) == 4 and SECRET not in table_dump(session_factory, "audit_log")


def test_a_failed_command_writes_no_entry(run, session_factory) -> None:
    run("byollm", "set", "-u", "carol", "-t", "acme", "--provider", "simulated", "--model", "m1")
    before = count(session_factory)
    run("byollm", "set", "-u", "carol", "-t", "globex", "--provider", "simulated", "--model", "m2", code=1)
    run("byollm", "delete", "-u", "nobody", code=2)
    run("purpose", "delete", "nothing", code=2)
    run("purpose", "set", "p", "--provider", "openai", "--model", "m", "--params", '{"api_key": "x"}', code=1)
    run("budget", "set", "chatty", "--max-calls", str(2**63), code=1)
    run("billing", "overrides", "end", "missing", code=1)
    run("billing", "overrides", "add", "--provider", "ollama", "--model", "m", "--input", "0.0000000001",
        "--output", "0", code=1)  # fmt: skip
    run("billing", "credit", "add", "-t", "acme", "-u", "carol", "--amount", "-5", "--key", "k", code=1)
    run("billing", "invoices", "finalize", datetime.now(UTC).strftime("%Y-%m"), code=1)  # still open
    run("billing", "rerate", "--from", "2026-02-01", "--to", "2026-01-01", "--apply", "--run-id", "r", code=1)
    run("tokens", "create", "--name", "x", code=1)  # no scope
    run("tokens", "revoke", "00000000-0000-0000-0000-000000000000", code=1)
    assert count(session_factory) == before == 1


def test_tokens_create_and_revoke_are_audited_without_the_secret(run, session_factory) -> None:
    created = run("tokens", "create", "--name", "sink eu-1", "--scope", "ingest", "--scope", "admin", "-t", "acme")
    secret = created.stdout.strip()
    with session_factory() as session:
        row = session.scalars(select(ApiTokenRow)).one()
    entry = only(session_factory, "token.create")
    assert (entry.target, entry.tenant_id, entry.before) == (f"token:{row.id}", "acme", None)
    assert entry.after["id"] == str(row.id) and entry.after["name"] == "sink eu-1"
    assert entry.after["scopes"] == ["admin", "ingest"] and entry.after["tenant_id"] == "acme"
    assert entry.after["prefix"] == secret[:8] and entry.after["revoked_at"] is None

    run("tokens", "revoke", str(row.id))
    entry = only(session_factory, "token.revoke")
    assert (entry.target, entry.tenant_id) == (f"token:{row.id}", "acme")
    assert entry.before["revoked_at"] is None and entry.after["revoked_at"] is not None
    run("tokens", "revoke", str(row.id))  # already revoked: nothing changed, no second entry
    assert len(audit_rows(session_factory, "token.revoke")) == 1

    dump = table_dump(session_factory, "audit_log")
    assert secret not in dump and secret[8:] not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() not in dump


def test_billing_commands_are_audited_once_and_replays_dry_runs_and_no_ops_not(run, session_factory) -> None:
    now = datetime.now(UTC)
    last_month = (now.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    event = event_from_record(
        record(0, provider="ollama", model="llama3.1", input_tokens=1_000_000, output_tokens=500_000,
               cache_read_tokens=0, occurred_at=now - timedelta(hours=1))
    )  # fmt: skip
    with session_factory() as session:
        ingest(session, [event], markup_pct=Decimal(20), now=now)
        session.commit()
    since = (now - timedelta(days=1)).date().isoformat()
    run("billing", "overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "0.10",
        "--output", "0.40", "--from", since, "--id", "llama-old")  # fmt: skip
    entry = only(session_factory, "price_override.add")
    assert (entry.target, entry.before, entry.tenant_id) == ("price_override:llama-old", None, None)
    assert entry.after["input_mtok"] == "0.100000000" and entry.after["effective_to"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT00:00:00Z", entry.after["effective_from"])

    run("billing", "reprice")
    entry = only(session_factory, "billing.reprice")
    assert entry.after["priced"] == 1 and entry.after["still_unpriced"] == 0
    run("billing", "reprice")  # nothing held any more: no entry
    assert len(audit_rows(session_factory, "billing.reprice")) == 1

    end = (now - timedelta(hours=2)).isoformat()
    run("billing", "overrides", "end", "llama-old", "--at", end, code=1)  # it priced the event: refused, no entry
    assert audit_rows(session_factory, "price_override.end") == []
    run("billing", "overrides", "end", "llama-old", "--at", end, "--keep-priced-events")  # re-rated below
    entry = only(session_factory, "price_override.end")
    assert entry.before["effective_to"] is None and entry.after["effective_to"] is not None
    run("billing", "overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "0.20",
        "--output", "0.80", "--from", since, "--id", "llama-new")  # fmt: skip

    window = ("--from", since, "--to", (now + timedelta(days=1)).isoformat())
    run("billing", "rerate", *window)  # a dry run
    assert audit_rows(session_factory, "billing.rerate") == []
    run("billing", "rerate", *window, "--apply", "--run-id", "fix-1")
    entry = only(session_factory, "billing.rerate")
    assert entry.target == "rerate:fix-1" and entry.after["run_id"] == "fix-1"
    assert (entry.after["changed"], entry.after["transfers"], entry.after["provider"]) == (1, 4, None)
    run("billing", "rerate", *window, "--apply", "--run-id", "fix-1")  # re-applied: posts nothing
    assert len(audit_rows(session_factory, "billing.rerate")) == 1

    run("billing", "credit", "add", "-t", "tenant-1", "-u", "user-1", "--amount", "5", "--key", "k1")
    run("billing", "credit", "add", "-t", "tenant-1", "-u", "user-1", "--amount", "5", "--key", "k1")  # a replay
    entry = only(session_factory, "credit.add")
    assert (entry.target, entry.tenant_id, entry.before) == ("user:tenant-1/user-1", "tenant-1", None)
    assert entry.after["amount"] == "5.000000000" and entry.after["idempotency_key"] == "k1"
    run("billing", "credit", "add", "-t", "tenant-1", "-u", "user-1", "--amount", "-1.5", "--key", "k2",
        "--adjustment")  # fmt: skip
    assert only(session_factory, "adjustment.add").after["amount_nanos"] == -1_500_000_000

    period = now.strftime("%Y-%m")
    run("billing", "invoices", "finalize", period, "--force")
    entry = only(session_factory, "invoices.finalize")
    assert (entry.target, entry.tenant_id) == (f"period:{period}", None)
    assert entry.before == {"period": period, "closed": False}
    assert entry.after["invoices_issued"] == 1 and entry.after["forced"] is True
    run("billing", "invoices", "finalize", period, "--force")  # again: changes nothing
    run("billing", "invoices", "finalize", last_month)  # an empty period is closed: that is a change
    assert [e.target for e in audit_rows(session_factory, "invoices.finalize")] == [
        f"period:{period}",
        f"period:{last_month}",
    ]


def test_keys_rotate_is_audited_with_a_count_and_no_key_material(run, session_factory) -> None:
    old, new = generate_key(), generate_key()
    run("byollm", "set", "-u", "dave", "-t", "acme", "--provider", "openai", "--model", "gpt-4o-mini",
        "--api-key", SECRET, METERING_SECRET_KEYS=old)  # fmt: skip
    run("keys", "rotate", METERING_SECRET_KEYS=f"{new},{old}")
    entry = only(session_factory, "keys.rotate")
    assert (entry.target, entry.before, entry.after, entry.tenant_id) == (
        "byollm_api_keys",
        None,
        {"reencrypted": 1},
        None,
    )
    dump = table_dump(session_factory, "audit_log")
    with session_factory() as session:
        ciphertext = session.get(ByollmSettingsRow, "dave").api_key_ciphertext  # type: ignore[union-attr]
    assert ciphertext is not None
    for material in (SECRET, old, new, bytes(ciphertext).decode("latin-1")):
        assert material not in dump
    run("byollm", "delete", "-u", "dave")
    run("keys", "rotate", METERING_SECRET_KEYS=new)  # no stored key: nothing re-encrypted, no entry
    assert len(audit_rows(session_factory, "keys.rotate")) == 1


def test_the_demo_s_seeded_settings_and_admin_token_are_audited(session_factory) -> None:
    from types import SimpleNamespace

    from metering.cli import demo_data
    from metering.crypto import SecretBox

    svc: Any = SimpleNamespace(
        sessions=session_factory, box=SecretBox([generate_key()]), llm_settings=SimpleNamespace(invalidate=lambda: None)
    )
    demo_data.seed_settings(svc)
    secret = demo_data.create_admin_token(svc)
    byollm = audit_rows(session_factory, "byollm.set")
    assert sorted(e.target for e in byollm) == ["user:acme/bob", "user:globex/carol", "user:globex/erin"]
    assert all(e.tenant_id == e.target.split(":")[1].split("/")[0] for e in byollm)
    assert sorted(e.target for e in audit_rows(session_factory, "purpose.set")) == [
        "purpose:action_items",
        "purpose:thread_summary",
    ]
    token = only(session_factory, "token.create")
    assert token.after["scopes"] == ["admin", "ingest", "read"] and token.after["prefix"] == secret[:8]
    assert secret not in table_dump(session_factory, "audit_log")
    demo_data.seed_settings(svc)  # again: upserts, each audited with its before
    assert all(e.before is not None for e in audit_rows(session_factory, "byollm.set")[3:])


def test_the_entry_and_the_change_commit_together(run, session_factory, monkeypatch) -> None:
    """An entry that cannot be written takes its change with it: one transaction, both or neither."""
    from metering import audit
    from metering.db.models import PurposeSettingsRow
    from metering.errors import InvalidInputError

    def broken(*args: Any, **kwargs: Any) -> None:
        raise InvalidInputError("the audit log refused the entry")

    monkeypatch.setattr(audit, "record", broken)
    failed = run("purpose", "set", "p", "--provider", "openai", "--model", "m", code=1)
    assert "the audit log refused the entry" in failed.stderr
    with session_factory() as session:
        assert session.scalars(select(PurposeSettingsRow)).all() == []
    assert count(session_factory) == 0


def test_two_finalizations_of_one_period_at_once_write_one_entry(run, session_factory) -> None:
    """A second `invoices finalize` that waited for the first (its lock) changed nothing: no entry. It read whether
    the period was closed before taking the lock, so it recorded the period as closed by itself (a second entry,
    `closed: false`, 0 invoices)."""
    import threading
    import time

    from metering.billing.invoice_store import finalize_period
    from metering.cli import audit_trail

    period = (datetime.now(UTC).replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    second: list[Result] = []
    with session_factory() as first:
        finalize_period(first, period, datetime.now(UTC), timedelta(0), force=True)  # holds the period's lock
        audit_trail.record(first, "invoices.finalize", f"period:{period}", before=None, after={"closed": True})
        waiter = threading.Thread(target=lambda: second.append(run("billing", "invoices", "finalize", period)))
        waiter.start()
        time.sleep(1.5)  # the second command reads the period, then waits for the lock
        first.commit()
    waiter.join(timeout=60)
    assert second and "finalized 0 invoice(s)" in second[0].stdout
    assert len(audit_rows(session_factory, "invoices.finalize")) == 1


def test_two_revocations_of_one_token_at_once_write_one_entry_and_keep_the_first_time(run, session_factory) -> None:
    """A `tokens revoke` that waited for a concurrent revocation (the row's lock) read the token before: it took the
    revocation for its own (a second entry) and overwrote the first revocation time with its own."""
    import threading
    import time

    from metering.auth import create_token, revoke_token

    with session_factory() as session:
        row, _secret = create_token(session, "sink", ["ingest"])
        session.commit()
    first_at = datetime(2026, 1, 2, tzinfo=UTC)
    second: list[Result] = []
    with session_factory() as first:
        revoke_token(first, row.id, now=first_at)  # holds the row (PostgreSQL) or the write lock (SQLite)
        waiter = threading.Thread(target=lambda: second.append(run("tokens", "revoke", str(row.id))))
        waiter.start()
        time.sleep(1.5)  # the second command reads the token, then waits for the lock
        first.commit()
    waiter.join(timeout=60)
    assert second
    assert audit_rows(session_factory, "token.revoke") == []  # the first revocation was not made by the CLI
    with session_factory() as session:
        assert session.get(ApiTokenRow, row.id).revoked_at == first_at  # type: ignore[union-attr]


def test_an_override_end_that_waited_for_another_never_lengthens_its_window(run, session_factory) -> None:
    """An override can only be shortened. Checked on the row read before waiting for a concurrent end's lock, a later
    end lengthened the window the first had just closed (and wrote an entry of it)."""
    import threading
    import time

    from metering.billing.overrides import add_override, end_override

    start = datetime(2026, 1, 1, tzinfo=UTC)
    with session_factory() as session:
        add_override(session, provider="ollama", model_pattern="m", effective_from=start, effective_to=None,
                     input_mtok=Decimal(1), output_mtok=Decimal(1), id="o1")  # fmt: skip
        session.commit()
    first_end, later_end = start + timedelta(days=10), start + timedelta(days=20)
    second: list[Result] = []
    with session_factory() as first:
        end_override(first, "o1", first_end)  # holds the row (PostgreSQL) or the write lock (SQLite)
        waiter = threading.Thread(
            target=lambda: second.append(
                run("billing", "overrides", "end", "o1", "--at", later_end.isoformat(), code=1)
            )
        )
        waiter.start()
        time.sleep(1.5)  # the second command reads the override, then waits for the lock
        first.commit()
    waiter.join(timeout=60)
    assert second and "already ends at" in second[0].stderr
    assert audit_rows(session_factory, "price_override.end") == []
    with session_factory() as session:
        assert get_effective_to(session, "o1") == first_end


def test_an_override_end_at_the_moment_it_already_ends_writes_no_second_entry(run, session_factory) -> None:
    """The same end twice (a retry, or two at once: the second waited for the first's lock) changed nothing the second
    time but wrote a second `price_override.end` entry, its before equal to its after."""
    from metering.billing.overrides import add_override

    start = datetime(2026, 1, 1, tzinfo=UTC)
    with session_factory() as session:
        add_override(session, provider="ollama", model_pattern="m", effective_from=start, effective_to=None,
                     input_mtok=Decimal(1), output_mtok=Decimal(1), id="o1")  # fmt: skip
        session.commit()
    end = (start + timedelta(days=10)).isoformat()
    run("billing", "overrides", "end", "o1", "--at", end)
    run("billing", "overrides", "end", "o1", "--at", end)
    (entry,) = audit_rows(session_factory, "price_override.end")
    assert entry.before["effective_to"] is None


def get_effective_to(session: Any, override_id: str) -> datetime | None:
    from metering.db.models import PriceOverrideRow

    return session.get(PriceOverrideRow, override_id).effective_to


def test_a_byollm_delete_that_found_nothing_left_to_delete_writes_no_entry(run, session_factory) -> None:
    """Settings deleted by a concurrent command while this one waited: nothing deleted here (exit 2, no entry). The
    delete's result was ignored: 'deleted' and a second byollm.delete entry."""
    import threading
    import time

    from metering.llm import settings_store as store

    run("byollm", "set", "-u", "erin", "-t", "globex", "--provider", "simulated", "--model", "m")
    second: list[Result] = []
    with session_factory() as first:
        store.delete_byollm(first, "erin")  # holds the row (PostgreSQL) or the write lock (SQLite)
        waiter = threading.Thread(target=lambda: second.append(run("byollm", "delete", "-u", "erin", code=2)))
        waiter.start()
        time.sleep(1.5)  # the second command reads the settings, then waits for the lock
        first.commit()
    waiter.join(timeout=60)
    assert second and "has no BYOLLM settings" in second[0].stderr
    assert audit_rows(session_factory, "byollm.delete") == []


def test_a_set_that_waited_for_a_concurrent_change_records_that_change_as_its_before(run, session_factory) -> None:
    """Two admins set one purpose at once (API and CLI): the second entry's `before` is what the first one set, so the
    entries chain. Read before waiting for the first one's lock, it was the value the first one replaced."""
    import threading
    import time

    from metering.llm import settings_store as store

    run("purpose", "set", "p", "--provider", "openai", "--model", "m1")
    second: list[Result] = []
    with session_factory() as first:
        store.put_purpose(first, purpose="p", provider="openai", model="m2")  # holds the row / the write lock
        waiter = threading.Thread(
            target=lambda: second.append(run("purpose", "set", "p", "--provider", "openai", "--model", "m3"))
        )
        waiter.start()
        time.sleep(1.5)  # the second command reads the purpose, then waits for the lock
        first.commit()
    waiter.join(timeout=60)
    assert second
    last = audit_rows(session_factory, "purpose.set")[-1]
    assert (last.before["model"], last.after["model"]) == ("m2", "m3")


def test_a_rerate_that_moves_only_byollm_shadow_costs_writes_its_entry(run, session_factory) -> None:
    """A re-rate whose window holds only BYOLLM calls changes their shadow costs (events, rollups) and posts no
    transfer: it is a change, audited as any other (it wrote none: only charged events and transfers counted)."""
    now = datetime.now(UTC)
    since = (now - timedelta(days=1)).date().isoformat()
    run("billing", "overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "0.10",
        "--output", "0.40", "--from", since, "--id", "llama-old")  # fmt: skip
    event = event_from_record(
        record(0, provider="ollama", model="llama3.1", is_byollm=True, input_tokens=1_000_000, output_tokens=500_000,
               cache_read_tokens=0, occurred_at=now - timedelta(hours=1))
    )  # fmt: skip
    with session_factory() as session:
        ingest(session, [event], markup_pct=Decimal(0), now=now)
        session.commit()
    run("billing", "overrides", "end", "llama-old", "--at", (now - timedelta(hours=2)).isoformat())
    run("billing", "overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "0.20",
        "--output", "0.80", "--from", since, "--id", "llama-new")  # fmt: skip

    window = ("--from", since, "--to", (now + timedelta(days=1)).isoformat())
    out = run("billing", "rerate", *window, "--apply", "--run-id", "shadow-1").output
    assert "1 changed ($0.30 -> $0.60)" in out
    entry = only(session_factory, "billing.rerate")
    assert (entry.target, entry.after["shadow_changed"], entry.after["transfers"]) == ("rerate:shadow-1", 1, 0)
    assert (entry.after["old_shadow"], entry.after["new_shadow"]) == ("0.300000000", "0.600000000")
    run("billing", "rerate", *window, "--apply", "--run-id", "shadow-1")  # nothing left to change: no entry
    assert len(audit_rows(session_factory, "billing.rerate")) == 1


def test_budget_list_and_delete_as_the_api_does(run, session_factory) -> None:
    """`metering budget` had only `set`: a budget set to `enforce` could be loosened from the CLI but never removed
    (the API has GET and DELETE /v1/admin/budgets/{ext}). `list` shows them; `delete` removes one, audited
    `budget.delete` with the API's target and snapshot; deleting one that does not exist exits 2, like
    `purpose delete`, and writes no entry."""
    run("budget", "set", "chatty", "--max-calls", "5", "--mode", "enforce")
    listed = run("budget", "list")
    assert '"extension_id": "chatty"' in listed.stdout and '"mode": "enforce"' in listed.stdout
    deleted = run("budget", "delete", "chatty")
    assert "deleted the call budget of extension chatty" in deleted.stdout
    entry = only(session_factory, "budget.delete")
    assert (entry.target, entry.tenant_id, entry.after) == ("budget:chatty", None, None)
    assert entry.before == {"max_calls": 5, "max_tokens": None, "mode": "enforce"}
    assert run("budget", "list").stdout.strip() == "[]"
    missing = run("budget", "delete", "chatty", code=2)
    assert "has no call budget" in missing.output
    assert len(audit_rows(session_factory, "budget.delete")) == 1


def test_a_rerate_that_only_relabels_events_writes_its_entry(run, session_factory) -> None:
    """A re-rate at the same charges from another price (an override ended and a successor at its price) posts no
    transfer but names the new price on each event (its price source and version): a change of stored billing
    data, audited with how many events it re-labelled (it wrote none: only changed charges and shadow costs
    counted). Re-applied, it changes nothing and writes none."""
    now = datetime.now(UTC)
    since = (now - timedelta(days=1)).date().isoformat()
    run("billing", "overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "0.10",
        "--output", "0.40", "--from", since, "--id", "llama-old")  # fmt: skip
    billed, byollm = (
        event_from_record(
            record(i, provider="ollama", model="llama3.1", is_byollm=i == 1, input_tokens=1_000_000,
                   output_tokens=500_000, cache_read_tokens=0, occurred_at=now - timedelta(hours=1))
        )
        for i in (0, 1)
    )  # fmt: skip
    with session_factory() as session:
        ingest(session, [billed, byollm], markup_pct=Decimal(0), now=now)
        session.commit()
    run("billing", "overrides", "end", "llama-old", "--at", (now - timedelta(hours=2)).isoformat(),
        "--keep-priced-events")  # fmt: skip
    run("billing", "overrides", "add", "--provider", "ollama", "--model", "llama3*", "--input", "0.10",
        "--output", "0.40", "--from", since, "--id", "llama-same")  # fmt: skip
    before = table_dump(session_factory, "usage_events")

    window = ("--from", since, "--to", (now + timedelta(days=1)).isoformat())
    out = run("billing", "rerate", *window, "--apply", "--run-id", "relabel-1").output
    assert table_dump(session_factory, "usage_events") != before  # the events name llama-same now
    assert "2 event(s) re-labelled" in out.replace("\n", " ")
    entry = only(session_factory, "billing.rerate")
    assert entry.target == "rerate:relabel-1"
    assert (entry.after["changed"], entry.after["shadow_changed"], entry.after["transfers"]) == (0, 0, 0)
    assert entry.after["relabelled"] == 2
    run("billing", "rerate", *window, "--apply", "--run-id", "relabel-2")  # nothing left to re-label: no entry
    assert len(audit_rows(session_factory, "billing.rerate")) == 1
