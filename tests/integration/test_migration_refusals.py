"""Downgrades that would drop a table the upgrade cannot refill: below 0001 (usage events and settings), 0003
(api tokens), 0004 (audit log) and 0008 (invoke requests). Each refuses while the table holds what the service
keeps, names the counts, and changes nothing (the whole run is one transaction); with nothing to lose it drops the
table as before."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from metering.auth.store import create_token, revoke_token
from metering.db import invoke_requests, migrate
from metering.db.engine import make_engine, make_session_factory
from metering.db.models import InvokeRequestRow
from tests.integration.migration_steps import assert_refused, count, delete_then_downgrade


def test_0003_refuses_to_drop_the_api_tokens(fresh_url: str) -> None:
    """Dropping ``api_tokens`` locks out every client holding one (the secrets are not stored: upgrading again
    cannot bring a token back, each must be issued and handed out anew). Refused while any token is stored, active
    or revoked (the record of who had access), named by count; nothing changed. Without tokens: dropped."""
    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        with make_session_factory(engine)() as session:
            create_token(session, "ingest-bot", ["ingest"], tenant_id="acme")
            create_token(session, "admin", ["admin"])
            old, _secret = create_token(session, "old", ["read"])
            revoke_token(session, old.id)
            session.commit()
    finally:
        engine.dispose()
    assert_refused(fresh_url, "0002", r"cannot downgrade below 0003: 3 api tokens \(2 active, 1 revoked\)")
    assert count(fresh_url, "api_tokens") == 3

    delete_then_downgrade(fresh_url, "0002", "DELETE FROM api_tokens")


def test_0004_refuses_to_drop_the_audit_log(fresh_url: str) -> None:
    """The audit log is the record of every admin change (who changed a price, a credit, a token): it cannot be
    rebuilt, so dropping it is refused while it holds an entry, named by count; nothing changed."""
    from metering.audit import record

    class Operator:
        token_id: uuid.UUID | None = None
        name = "ops@example.com"

    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    try:
        with make_session_factory(engine)() as session:
            for i in range(2):
                record(session, actor=Operator(), action="credit.add", target=f"user:acme:u{i}", before=None,
                       after={"amount": "5.00"}, tenant_id="acme")  # fmt: skip
            session.commit()
    finally:
        engine.dispose()
    assert_refused(fresh_url, "0003", r"cannot downgrade below 0004: the audit log holds 2 entries")
    assert count(fresh_url, "audit_log") == 2


def test_0008_refuses_to_drop_idempotency_keys_still_kept(fresh_url: str) -> None:
    """A key claimed in the last 24 h answers a retry with its stored outcome (or, still running, refuses to run it
    again): dropping it would let the retry run, and pay for, the invocation a second time. Refused while any is
    kept, named by count; nothing changed. Keys past the 24 h (the next claim deletes them anyway) do not block."""
    sha = invoke_requests.request_sha256("rewrite", "rewrite", "alice", {"text": "hi"})
    now = datetime.now(UTC)
    migrate.upgrade(fresh_url)
    engine = make_engine(fresh_url)
    factory = make_session_factory(engine)
    try:
        with factory() as session:  # expired: claimed 3 days ago, never completed
            invoke_requests.claim(session, tenant_id="acme", key="old", sha256=sha, invocation_id=uuid.uuid4(),
                                  now=now - timedelta(days=3))  # fmt: skip
            session.commit()
        with factory() as session:  # kept: one done, one still running
            for key in ("done", "running"):
                invoke_requests.claim(session, tenant_id="acme", key=key, sha256=sha, invocation_id=uuid.uuid4(),
                                      now=now)  # fmt: skip
            invoke_requests.complete(session, tenant_id="acme", key="done", claimed_at=now, status=200,
                                     body={"ok": 1}, now=now)  # fmt: skip
            session.commit()
        assert count(fresh_url, "invoke_requests") == 2  # the second claim deleted the expired one
        with factory() as session:  # an expired key the service has not deleted yet (no claim since)
            session.execute(
                update(InvokeRequestRow)
                .where(InvokeRequestRow.idempotency_key == "done")
                .values(idempotency_key="stale", claimed_at=now - timedelta(days=2))
            )
            session.commit()
    finally:
        engine.dispose()
    assert_refused(
        fresh_url, "0007", r"cannot downgrade below 0008: 1 invoke idempotency keys claimed in the last 24 h"
    )
    assert count(fresh_url, "invoke_requests") == 2

    # only the expired key is left: nothing a retry would need
    delete_then_downgrade(fresh_url, "0007", "DELETE FROM invoke_requests WHERE idempotency_key = 'running'")


def test_0001_refuses_to_drop_usage_events_and_settings(fresh_url: str) -> None:
    """Downgrading to base drops the usage events (the record of what was used) and every setting (users' own LLMs
    with their encrypted keys, per-purpose settings, budgets). Refused while any is stored, named by count;
    nothing changed. Emptied first: dropped."""
    from tests.integration.old_schema import at_revision, insert
    from tests.integration.test_migration_backfills import ADDED_0002, ADDED_0011, _event

    noon = datetime(2026, 11, 26, 12, tzinfo=UTC)
    dropped = (*ADDED_0002, *ADDED_0011)
    with at_revision(fresh_url, "0001") as engine:
        insert(engine, "usage_events", [{k: v for k, v in _event(i, noon).items() if k not in dropped} for i in (1, 2)])
        insert(engine, "purpose_settings", [{"purpose": "rewrite", "provider": "anthropic", "model": "claude-haiku-4-5",
                                             "base_url": None, "params": {}, "updated_at": noon}])  # fmt: skip
    assert_refused(
        fresh_url,
        "base",
        r"below 0001: the database holds 2 usage_events, 1 purpose_settings, .*nothing was changed",
        at="0001",
    )
    assert (count(fresh_url, "usage_events"), count(fresh_url, "purpose_settings")) == (2, 1)

    delete_then_downgrade(fresh_url, "base", "DELETE FROM usage_events", "DELETE FROM purpose_settings")
