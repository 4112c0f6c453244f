"""Idempotency keys of invocations (metering.db.invoke_requests) on SQLite and PostgreSQL: claimed once,
completed with their outcome, per tenant, expired after 24 h, never run again when the outcome was not recorded."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from metering.db import invoke_requests as ir
from metering.errors import IdempotencyConflictError, IdempotencyInProgressError, IdempotencyOutcomeUnknownError

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
INVOCATION = uuid.UUID("01a21f4d-6370-7000-8000-000000000001")
SHA = ir.request_sha256("rewrite", "rewrite", "alice", {"text": "hi", "tone": "formal"})


def claim(session_factory, *, key="k1", tenant="acme", sha=SHA, now=T0):
    with session_factory() as session:
        stored = ir.claim(session, tenant_id=tenant, key=key, sha256=sha, invocation_id=INVOCATION, now=now)
        session.commit()
    return stored


def complete(session_factory, *, claimed_at=T0, key="k1", tenant="acme", status=200, body=None):
    with session_factory() as session:
        ir.complete(
            session, tenant_id=tenant, key=key, claimed_at=claimed_at, status=status, body=body or {"ok": 1}, now=T0
        )
        session.commit()


def test_the_fingerprint_is_of_the_request_not_of_key_order() -> None:
    assert ir.request_sha256("rewrite", "rewrite", "alice", {"tone": "formal", "text": "hi"}) == SHA
    assert ir.request_sha256("rewrite", "rewrite", "bob", {"text": "hi", "tone": "formal"}) != SHA
    assert ir.request_sha256("rewrite", "rewrite", "alice", {"text": "hi", "tone": "casual"}) != SHA
    assert ir.request_sha256("rewrite", "rewrite_multiple", "alice", {"text": "hi", "tone": "formal"}) != SHA


def test_first_claim_runs_a_second_waits_then_gets_the_stored_outcome(session_factory) -> None:
    assert claim(session_factory) is None
    with pytest.raises(IdempotencyInProgressError) as caught:
        claim(session_factory, now=T0 + timedelta(minutes=1))
    assert (caught.value.status, caught.value.code) == (409, "idempotency_in_progress")
    complete(session_factory, body={"invocation_id": "x", "result": {"text": "é"}})
    stored = claim(session_factory, now=T0 + timedelta(minutes=2))
    assert stored == ir.StoredResponse(200, {"invocation_id": "x", "result": {"text": "é"}})


def test_another_request_with_the_key_is_a_conflict_and_tenants_do_not_share_keys(session_factory) -> None:
    assert claim(session_factory) is None
    other = ir.request_sha256("rewrite", "rewrite", "alice", {"text": "bye", "tone": "formal"})
    with pytest.raises(IdempotencyConflictError):
        claim(session_factory, sha=other)
    complete(session_factory)
    with pytest.raises(IdempotencyConflictError):
        claim(session_factory, sha=other)
    assert claim(session_factory, tenant="globex", sha=other) is None


def test_a_released_key_is_free_again(session_factory) -> None:
    assert claim(session_factory) is None
    with session_factory() as session:
        ir.release(session, tenant_id="acme", key="k1", claimed_at=T0)
        session.commit()
    other = ir.request_sha256("rewrite", "rewrite", "alice", {"text": "fixed", "tone": "formal"})
    assert claim(session_factory, sha=other, now=T0 + timedelta(seconds=1)) is None


def test_keys_expire_after_24_hours(session_factory) -> None:
    assert claim(session_factory) is None
    complete(session_factory)
    assert claim(session_factory, now=T0 + ir.RETENTION - timedelta(seconds=1)) is not None
    assert claim(session_factory, now=T0 + ir.RETENTION + timedelta(seconds=1)) is None  # purged: runs anew


def test_a_claim_that_never_recorded_its_outcome_is_never_run_again(session_factory) -> None:
    """Its process died, or the database failed as it finished: it may have made billed calls."""
    assert claim(session_factory) is None
    with pytest.raises(IdempotencyInProgressError) as running:
        claim(session_factory, now=T0 + ir.UNKNOWN_AFTER - timedelta(seconds=1))
    assert running.value.members == {"invocation_id": str(INVOCATION)}
    with pytest.raises(IdempotencyOutcomeUnknownError) as unknown:
        claim(session_factory, now=T0 + ir.UNKNOWN_AFTER)
    assert (unknown.value.status, unknown.value.code) == (409, "idempotency_outcome_unknown")
    assert str(INVOCATION) in unknown.value.message and unknown.value.members == {"invocation_id": str(INVOCATION)}
    with pytest.raises(IdempotencyOutcomeUnknownError):
        claim(session_factory, now=T0 + ir.UNKNOWN_AFTER + timedelta(hours=1))
    assert claim(session_factory, now=T0 + ir.RETENTION + timedelta(seconds=1)) is None  # after 24 h: a new key


class _ReleasedUnderUs:
    """A session in which the claim found taken is released (deleted) just before it is read back, as when the
    first request fails before any billed call between our INSERT and our SELECT."""

    def __init__(self, session) -> None:
        self._session, self._released = session, False

    def execute(self, stmt, *args, **kwargs):
        if not self._released and getattr(stmt, "is_select", False):
            from sqlalchemy import delete

            from metering.db.models import InvokeRequestRow

            self._session.execute(delete(InvokeRequestRow))
            self._released = True
        return self._session.execute(stmt, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_a_claim_released_between_insert_and_read_is_claimed_again(session_factory) -> None:
    """Concurrent retries with one key on PostgreSQL got a 500 (NoResultFound) now and then (found by a hunt)."""
    assert claim(session_factory, sha=ir.request_sha256("rewrite", "rewrite", "alice", {"text": "first"})) is None
    with session_factory() as session:
        racing = _ReleasedUnderUs(session)
        mine = uuid.UUID("01a21f4d-6370-7000-8000-000000000002")
        assert ir.claim(racing, tenant_id="acme", key="k1", sha256=SHA, invocation_id=mine, now=T0) is None
        session.commit()
    with pytest.raises(IdempotencyInProgressError) as caught:  # the key is ours now
        claim(session_factory, now=T0 + timedelta(minutes=1))
    assert caught.value.members["invocation_id"] == str(mine)


# Each claim's clean-up deletes every expired key, locking their rows in its plan's order: an index scan on
# claimed_at, or the table's physical order (a sequential or bitmap scan). The planner picks per execution (each
# with its own cutoff, custom plans), so two concurrent claims can lock them in opposite orders.
_PLANS = {
    "index order": "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off",
    "physical order": "SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off",
}


def test_concurrent_claims_deleting_expired_keys_in_opposite_orders_do_not_deadlock(session_factory, backend) -> None:
    """PostgreSQL: a claim locking expired rows in claimed_at order and another in physical order each waited on a
    row the other held (the one in the middle held by a third transaction until both were waiting): one failed with
    `deadlock detected`, a 503 for an invoke that had done nothing wrong. A claim now skips expired rows another
    transaction holds (that one deletes them): no claim waits on another's clean-up."""
    if backend != "postgresql":
        pytest.skip("SQLite writes one transaction at a time")
    import threading

    from sqlalchemy import text

    now = T0 + ir.RETENTION + timedelta(hours=1)
    for i, age in enumerate((1, 2, 3)):  # physical order: newest first; claimed_at order: oldest first
        claim(session_factory, key=f"old-{i}", now=T0 - timedelta(minutes=age))
    errors: list[BaseException] = []

    def claimer(key: str, plan: str) -> None:
        try:
            with session_factory() as session:
                for statement in plan.split(";"):
                    session.execute(text(statement))
                ir.claim(session, tenant_id="acme", key=key, sha256=SHA, invocation_id=INVOCATION, now=now)
                session.commit()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    with session_factory() as holder:  # the middle row, held until both claims are under way
        holder.execute(text("SELECT 1 FROM invoke_requests WHERE idempotency_key = 'old-1' FOR UPDATE"))
        pid = holder.execute(text("SELECT pg_backend_pid()")).scalar_one()
        threads = [threading.Thread(target=claimer, args=(f"new-{name}", plan)) for name, plan in _PLANS.items()]
        for thread in threads:
            thread.start()
        # The test session's own database: only the two claims can wait on a lock in it.
        waiting = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> :pid "
                       "AND wait_event_type = 'Lock'")  # fmt: skip
        with session_factory() as watcher:  # until both wait (on the holder, or on each other), or are done
            while any(t.is_alive() for t in threads) and watcher.execute(waiting, {"pid": pid}).scalar_one() < 2:
                watcher.rollback()
                threading.Event().wait(0.01)
        holder.rollback()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    with session_factory() as session:
        claimed = session.execute(
            text("SELECT idempotency_key FROM invoke_requests WHERE idempotency_key LIKE 'new-%'")
        )
        assert sorted(claimed.scalars()) == sorted(f"new-{name}" for name in _PLANS)


def test_a_claims_own_expired_key_held_by_another_clean_up_is_waited_for_not_skipped(session_factory, backend) -> None:
    """PostgreSQL: the clean-up skips expired rows another transaction holds, but not the claim's own key: it is free
    after 24 h, so the claim waits for that row (another claim deleting it) instead of finding it still there (a
    conflict with another request, or its 24 h old outcome replayed)."""
    if backend != "postgresql":
        pytest.skip("SQLite writes one transaction at a time")
    import threading

    from sqlalchemy import text

    claim(session_factory, key="k1", now=T0)
    complete(session_factory, key="k1")
    now = T0 + ir.RETENTION + timedelta(minutes=1)
    other = ir.request_sha256("rewrite", "rewrite", "alice", {"text": "another day", "tone": "formal"})
    outcome: list[object] = []

    def claimer() -> None:
        try:
            outcome.append(claim(session_factory, key="k1", sha=other, now=now))
        except Exception as exc:  # reported by the test
            outcome.append(exc)

    with session_factory() as holder:  # another claim's clean-up, deleting it
        holder.execute(text("SELECT 1 FROM invoke_requests WHERE idempotency_key = 'k1' FOR UPDATE"))
        thread = threading.Thread(target=claimer)
        thread.start()
        waiting = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock'")  # fmt: skip
        with session_factory() as watcher:
            while thread.is_alive() and not watcher.execute(waiting).scalar_one():
                watcher.rollback()
                threading.Event().wait(0.01)
        holder.execute(text("DELETE FROM invoke_requests WHERE idempotency_key = 'k1'"))
        holder.commit()
    thread.join(60)
    assert outcome == [None]  # claimed: the key is this request's now


def test_concurrent_claims_of_each_others_expired_keys_do_not_deadlock(session_factory, backend) -> None:
    """PostgreSQL: a claim's clean-up locked every expired row it could (skipping held ones), then waited on its own
    key: a claim whose clean-up locked another claim's key first (its plan's order) while that claim's clean-up had
    locked its key waited on each other (`deadlock detected`, a 503). A claim now takes its own key before the
    clean-up: it waits holding nothing, so no cycle. Claims in opposite orders, each of the key the other locks
    first, started together, many times (without the fix most rounds deadlock; with it none can)."""
    if backend != "postgresql":
        pytest.skip("SQLite writes one transaction at a time")
    import threading

    from sqlalchemy import text

    now = T0 + ir.RETENTION + timedelta(days=1)
    seed = text(
        "INSERT INTO invoke_requests (tenant_id, idempotency_key, request_sha256, invocation_id, state, claimed_at) "
        "SELECT 'acme', 'old-' || i, :sha, :invocation, 'done', :t0 - i * interval '1 second' "
        "FROM generate_series(0, 1999) AS i"
    )
    errors: list[BaseException] = []

    def claimer(key: str, plan: str, start: threading.Barrier) -> None:
        try:
            with session_factory() as session:
                for statement in plan.split(";"):
                    session.execute(text(statement))
                start.wait(30)
                ir.claim(session, tenant_id="acme", key=key, sha256=SHA, invocation_id=INVOCATION, now=now)
                session.commit()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    for _ in range(10):
        with session_factory() as session:
            session.execute(text("DELETE FROM invoke_requests"))
            session.execute(seed, {"sha": SHA, "invocation": INVOCATION, "t0": T0})
            session.commit()
            # each claims the key the other's clean-up locks first
            first_physical = session.execute(
                text("SELECT idempotency_key FROM invoke_requests ORDER BY ctid LIMIT 1")
            ).scalar_one()
        oldest = "old-1999"
        start = threading.Barrier(2)
        threads = [
            threading.Thread(target=claimer, args=(oldest, _PLANS["physical order"], start)),
            threading.Thread(target=claimer, args=(first_physical, _PLANS["index order"], start)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        with session_factory() as session:
            left = session.execute(text("SELECT idempotency_key FROM invoke_requests ORDER BY 1")).scalars().all()
        assert left == sorted([oldest, first_physical])  # both claimed, every expired key deleted
