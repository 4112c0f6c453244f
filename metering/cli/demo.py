"""``metering demo``: run the bundled rewrite extension for a few users and show what was metered."""

from __future__ import annotations

from typing import Any

from rich.progress import Progress

from metering.cli.common import console, run_async, services, usage_table
from metering.db.event_store import events_for_invocations
from metering.extensions.rewrite import chat as rewrite_extension
from metering.llm import settings_store as store
from metering.runtime import User
from metering.wiring import Services

TEXT = "Per our previous conversation, attached please find the document for your perusal."
MEETING = (
    "Alice will send the Q3 budget to finance by Friday. Bob needs to book the venue before March 3. "
    "Someone should update the onboarding guide."
)

# (user, function, params): alice uses the platform LLM, bob his own, carol's own LLM is down (failover).
SCRIPT: list[tuple[User, str, dict[str, Any]]] = [
    (User("alice", "acme"), "rewrite", {"text": TEXT, "tone": "casual"}),
    (User("alice", "acme"), "rewrite", {"text": TEXT, "tone": "formal", "keep_meaning": False}),
    (User("alice", "acme"), "rewrite_multiple", {"text": TEXT, "tone": "casual", "n_variations": 3}),
    (User("alice", "acme"), "extract_action_items", {"text": MEETING}),
    (User("bob", "acme"), "rewrite", {"text": TEXT, "tone": "friendly"}),
    (User("carol", "globex"), "rewrite", {"text": TEXT, "tone": "apologetic"}),
]


def _seed_settings(svc: Services) -> None:
    with svc.sessions() as session:
        store.put_byollm(
            session,
            svc.box,
            user_id="bob",
            tenant_id="acme",
            provider="simulated",
            model="llama3.1-8b",
            api_key=None,
        )
        store.put_byollm(
            session,
            svc.box,
            user_id="carol",
            tenant_id="globex",
            provider="simulated",
            model="gpt-4o-unavailable",
            api_key=None,
            fallback_policy="platform",
        )
        store.put_purpose(session, purpose="action_items", provider="anthropic", model="claude-haiku-4-5")
        session.commit()
    svc.llm_settings.invalidate()


def demo() -> None:
    """Seed BYOLLM and per-purpose settings, run the rewrite extension, print the metered usage."""
    with services() as svc:
        _seed_settings(svc)
        invocation_ids = []
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("running the rewrite extension", total=len(SCRIPT))
            for user, function, params in SCRIPT:
                result = run_async(lambda u=user, f=function, p=params: svc.runtime.invoke(rewrite_extension, f, p, u))
                invocation_ids.append(result.invocation_id)
                console.print(f"[bold]{user.id}[/] {function}: {result.result}")
                progress.advance(task)
        svc.flusher.flush(timeout=30.0)
        with svc.sessions() as session:
            rows = events_for_invocations(session, invocation_ids)
        console.print(usage_table(rows, title=f"Metered usage ({len(rows)} provider calls)"))
        console.print(
            f"Database: {svc.settings.resolved_database_url}\n"
            "Provider 'simulated' means no platform API key is set (ANTHROPIC_API_KEY); "
            "calls with byollm=yes are not billed to the user (Policy A)."
        )
