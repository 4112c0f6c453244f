"""Demo traffic, shared by ``metering demo`` and ``metering serve --demo``.

Realistic usage made the real way: the bundled extensions run through the metered ``ctx.llm`` (the simulated
provider unless a platform key is set), every call is spooled and then ingested (priced, billed, rolled up).
Three tenants and seven users: some on the platform LLM, some with their own LLM (BYOLLM: ``bob`` on a model
without a known price, ``erin`` on one with a price, so a shadow cost; ``carol``'s own model is down and her
calls fail over to the platform LLM, which makes them billable), per-purpose settings, and the ``chatty``
extension calling the LLM in a loop. Running it again adds more traffic; settings are upserts. The settings it
seeds and the admin token of ``serve --demo`` are audited like the same changes made by hand (``byollm.set``,
``purpose.set``, ``token.create``), in the transaction that makes them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from metering import audit_snapshots as snap
from metering.auth import Scope, create_token
from metering.cli import audit_trail
from metering.db.event_store import count_events
from metering.errors import MeteringError
from metering.extensions.chatty import chat as chatty_extension
from metering.extensions.rewrite import chat as rewrite_extension
from metering.llm import settings_admin
from metering.llm import settings_store as store
from metering.runtime import ChatExtension, User
from metering.runtime.invoke import invocation_calls
from metering.wiring import Services

TEXT = "Per our previous conversation, attached please find the document for your perusal."
MEETING = (
    "Alice will send the Q3 budget to finance by Friday. Bob needs to book the venue before March 3. "
    "Someone should update the onboarding guide."
)
STANDUP = "Dave will fix the login bug by Tuesday. Frank needs to review the pricing page. We should rotate the keys."
THREAD = [
    "Can we move the launch to Thursday?",
    "Thursday works for design, but QA needs the build by Tuesday.",
    "I can cut the release branch on Monday night.",
    "Marketing needs the final copy by Wednesday noon.",
    "OK: launch Thursday, branch Monday, copy Wednesday.",
    "Great, I'll update the calendar invite.",
]

ALICE, BOB, DAVE = User("alice", "acme"), User("bob", "acme"), User("dave", "acme")
CAROL, ERIN = User("carol", "globex"), User("erin", "globex")
FRANK, GRACE = User("frank", "initech"), User("grace", "initech")
USERS = (ALICE, BOB, DAVE, CAROL, ERIN, FRANK, GRACE)


@dataclass(frozen=True, slots=True)
class Step:
    user: User
    extension: ChatExtension
    function: str
    params: dict[str, Any]
    showcase: bool = False  # shown in full by `metering demo`

    @property
    def label(self) -> str:
        return f"{self.user.tenant_id}/{self.user.id} {self.extension.id}.{self.function}"


@dataclass(frozen=True, slots=True)
class Outcome:
    step: Step
    invocation_id: Any | None  # None when the invocation failed before any metered call
    result: Any
    calls: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DemoReport:
    outcomes: list[Outcome]
    delivered: bool  # every spooled event reached the database
    events_before: int = 0  # usage events the database held before this run (an earlier run's traffic)

    @property
    def calls(self) -> int:
        return sum(o.calls for o in self.outcomes)

    @property
    def failures(self) -> int:
        return sum(1 for o in self.outcomes if o.error is not None)

    def by_extension(self) -> dict[str, tuple[int, int]]:
        """extension id -> (invocations, LLM calls)."""
        invocations: Counter[str] = Counter()
        calls: Counter[str] = Counter()
        for o in self.outcomes:
            invocations[o.step.extension.id] += 1
            calls[o.step.extension.id] += o.calls
        return {ext: (invocations[ext], calls[ext]) for ext in sorted(invocations)}

    def summary(self) -> str:
        users = {(o.step.user.tenant_id, o.step.user.id) for o in self.outcomes}
        tenants = {tenant for tenant, _user in users}
        per_ext = ", ".join(f"{ext}: {n} invocations, {c} calls" for ext, (n, c) in self.by_extension().items())
        failed = f", {self.failures} failed" if self.failures else ""
        return (
            f"{len(self.outcomes)} invocations{failed}, {self.calls} metered LLM calls for {len(users)} users "
            f"in {len(tenants)} tenants ({per_ext})"
        )

    def rerun_note(self) -> str:
        """Empty on a fresh database; else that this run added to what was there (the demo is not idempotent)."""
        if not self.events_before:
            return ""
        return (
            f"This run added to the {self.events_before} usage events this database already held: every run "
            "adds more traffic (billed again to the demo users); earlier demo admin tokens stay valid "
            "(`metering tokens list` / `revoke`). `metering serve` alone serves what is there."
        )


def steps() -> list[Step]:
    """One round of demo traffic, in order (the showcase steps are ``metering demo``'s original script)."""
    rw, ch = rewrite_extension, chatty_extension
    thread = {"messages": THREAD}
    return [
        Step(ALICE, rw, "rewrite", {"text": TEXT, "tone": "casual"}, showcase=True),
        Step(ALICE, rw, "rewrite", {"text": TEXT, "tone": "formal", "keep_meaning": False}, showcase=True),
        Step(ALICE, rw, "rewrite_multiple", {"text": TEXT, "tone": "casual", "n_variations": 3}, showcase=True),
        Step(ALICE, rw, "extract_action_items", {"text": MEETING}, showcase=True),
        Step(BOB, rw, "rewrite", {"text": TEXT, "tone": "friendly"}, showcase=True),
        Step(CAROL, rw, "rewrite", {"text": TEXT, "tone": "apologetic"}, showcase=True),
        Step(DAVE, rw, "rewrite", {"text": TEXT, "tone": "concise"}),
        Step(DAVE, ch, "summarize_thread", {**thread, "polish_rounds": 8}),
        Step(ERIN, rw, "rewrite", {"text": TEXT, "tone": "formal"}),
        Step(ERIN, rw, "rewrite_multiple", {"text": TEXT, "tone": "casual", "n_variations": 2}),
        Step(ERIN, ch, "summarize_thread", {**thread, "polish_rounds": 6}),
        Step(CAROL, rw, "extract_action_items", {"text": STANDUP}),
        Step(FRANK, rw, "rewrite_multiple", {"text": TEXT, "tone": "formal", "n_variations": 5}),
        Step(FRANK, rw, "extract_action_items", {"text": STANDUP}),
        Step(FRANK, ch, "summarize_thread", {**thread, "polish_rounds": 10}),
        Step(GRACE, rw, "rewrite", {"text": TEXT, "tone": "casual"}),
        Step(GRACE, rw, "rewrite", {"text": TEXT, "tone": "formal", "keep_meaning": False}),
        Step(BOB, rw, "extract_action_items", {"text": MEETING}),
    ]


def seed_settings(svc: Services) -> None:
    """BYOLLM for bob, carol (down: fails over to the platform) and erin; per-purpose settings. Upserts."""
    with svc.sessions() as session:
        byollm = (
            (BOB, "llama3.1-8b", "platform"),  # no known price: not billed (Policy A), no shadow cost either
            (CAROL, "gpt-4o-unavailable", "platform"),  # a simulated outage: failover to the platform LLM
            (ERIN, "gpt-4o-mini", "platform"),  # priced: not billed (Policy A), its shadow cost is kept
        )
        for user, model, fallback in byollm:
            before = snap.byollm_snapshot(store.byollm_row_to_replace(session, user.id, user.tenant_id))
            row = store.put_byollm(
                session,
                svc.box,
                user_id=user.id,
                tenant_id=user.tenant_id,
                provider="simulated",
                model=model,
                api_key=None,
                fallback_policy=fallback,
            )
            target, after = snap.user_target(user.tenant_id, user.id), snap.byollm_snapshot(row)
            audit_trail.record(session, "byollm.set", target, before=before, after=after, tenant_id=user.tenant_id)
        for purpose, provider, model in (
            ("action_items", "anthropic", "claude-haiku-4-5"),
            ("thread_summary", "openai", "gpt-4o-mini"),
        ):
            before = snap.purpose_snapshot(settings_admin.get_purpose_row(session, purpose, for_update=True))
            purpose_row = store.put_purpose(session, purpose=purpose, provider=provider, model=model)
            after = snap.purpose_snapshot(purpose_row)
            audit_trail.record(session, "purpose.set", snap.purpose_target(purpose), before=before, after=after)
        session.commit()
    svc.llm_settings.invalidate()


async def _run(svc: Services, plan: Sequence[Step], on_step: Callable[[Outcome], None] | None) -> list[Outcome]:
    outcomes = []
    try:
        for step in plan:
            try:
                result = await svc.runtime.invoke(step.extension, step.function, step.params, step.user)
            except MeteringError as exc:  # e.g. a budget set to `enforce` on chatty: the demo goes on
                calls = invocation_calls(exc)  # the metered calls it made before failing count (and may be billed)
                invocation_id, n_calls = (calls.invocation_id, len(calls.event_ids)) if calls else (None, 0)
                outcome = Outcome(step, invocation_id, None, n_calls, error=f"{exc.code}: {exc.message}")
            else:
                outcome = Outcome(step, result.invocation_id, result.result, len(result.event_ids))
            outcomes.append(outcome)
            if on_step is not None:
                on_step(outcome)
    finally:
        await svc.providers.aclose()  # their HTTP clients belong to this event loop
    return outcomes


def generate(
    svc: Services,
    plan: Sequence[Step] | None = None,
    *,
    on_step: Callable[[Outcome], None] | None = None,
    flush_timeout_s: float = 60.0,
) -> DemoReport:
    """Seed the settings, run ``plan`` (default: ``steps()``) and deliver the spool into the database."""
    with svc.sessions() as session:
        events_before = count_events(session)
    seed_settings(svc)
    outcomes = asyncio.run(_run(svc, steps() if plan is None else plan, on_step))
    delivered = svc.flusher.flush(timeout=flush_timeout_s)
    return DemoReport(outcomes, delivered, events_before)


def create_admin_token(svc: Services, name: str = "demo admin (metering serve --demo)") -> str:
    """A new token with every scope; returns its secret (stored only hashed)."""
    with svc.sessions() as session:
        row, secret = create_token(session, name, list(Scope))
        audit_trail.record(
            session, "token.create", snap.token_target(row.id), before=None, after=snap.token_snapshot(row)
        )
        session.commit()
    return secret


def usage_query(now: datetime | None = None) -> str:
    """The query string of a ``GET /v1/usage`` over today and tomorrow (UTC), by extension."""
    today = (now or datetime.now(UTC)).astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    end = today + timedelta(days=2)
    return f"from={today:%Y-%m-%dT%H:%M:%SZ}&to={end:%Y-%m-%dT%H:%M:%SZ}&group_by=extension"
