"""The rewrite extension through the whole write path: runtime → MeteredLLM → simulated provider →
spool → flusher → database, on SQLite and PostgreSQL, with settings stored in the database."""

from __future__ import annotations

from pathlib import Path

import pytest

from metering.config import Settings
from metering.db.event_store import events_for_invocations
from metering.errors import BudgetExceededError, InvalidInputError
from metering.extensions.rewrite import chat as rewrite
from metering.extensions.rewrite.handlers import KEEP_MEANING, TONE_PROMPTS
from metering.llm import settings_store as store
from metering.runtime import User
from metering.wiring import Services, open_services


@pytest.fixture
def services(db_url: str, tmp_path: Path):
    settings = Settings(
        data_dir=tmp_path, database_url=db_url, secret_keys=None, anthropic_api_key=None, openai_api_key=None
    )
    svc = open_services(settings, run_migrations=False)
    yield svc
    svc.close()


def _rows(svc: Services, *invocation_ids):
    assert svc.flusher.flush(timeout=30.0)
    with svc.sessions() as session:
        return events_for_invocations(session, list(invocation_ids))


async def test_rewrite_on_the_platform_default(services: Services) -> None:
    result = await services.runtime.invoke(
        rewrite, "rewrite", {"text": "Send me the doc.", "tone": "casual"}, User("alice", "acme")
    )
    assert result.result["provider"] == "simulated" and result.result["model"] == "claude-sonnet-4-6"
    assert result.result["is_byollm"] is False and result.result["text"].startswith("[simulated]")
    [row] = _rows(services, result.invocation_id)
    assert (row.tenant_id, row.user_id, row.extension_id, row.function) == ("acme", "alice", "rewrite", "rewrite")
    assert (row.purpose, row.max_tokens, row.status, row.is_byollm) == ("content_rewrite", 1500, "ok", False)
    assert row.input_tokens > 0 and row.output_tokens > 0 and row.usage_completeness == "reported"


async def test_keep_meaning_adds_the_preservation_sentence(services: Services) -> None:
    ctx = services.runtime.context(rewrite, "rewrite", User("alice", "acme"))
    seen: list[str] = []
    provider_get = services.providers.get

    wrapped: set[int] = set()

    def spy(config):
        pooled = provider_get(config)  # the pool reuses one adapter: wrap it once
        provider = pooled.provider
        if id(provider) not in wrapped:
            wrapped.add(id(provider))
            original = provider.complete

            async def complete(request):
                seen.append(request.system)
                return await original(request)

            provider.complete = complete
        return pooled

    services.providers.get = spy  # type: ignore[method-assign]
    from metering.extensions.rewrite.handlers import rewrite as handler
    from metering.extensions.rewrite.schemas import RewriteParams

    await handler(ctx, RewriteParams(text="x", tone="formal"))
    await handler(ctx, RewriteParams(text="x", tone="formal", keep_meaning=False))
    assert seen == [TONE_PROMPTS["formal"] + KEEP_MEANING, TONE_PROMPTS["formal"]]


async def test_byollm_user_is_metered_as_byollm_and_failover_as_platform(services: Services) -> None:
    with services.sessions() as session:
        store.put_byollm(
            session,
            services.box,
            user_id="bob",
            tenant_id="acme",
            provider="simulated",
            model="llama3.1-8b",
            api_key=None,
        )
        store.put_byollm(
            session,
            services.box,
            user_id="carol",
            tenant_id="acme",
            provider="simulated",
            model="own-model-unavailable",
            api_key=None,
        )
        session.commit()
    services.llm_settings.invalidate()
    bob = await services.runtime.invoke(rewrite, "rewrite", {"text": "hi", "tone": "formal"}, User("bob", "acme"))
    carol = await services.runtime.invoke(rewrite, "rewrite", {"text": "hi", "tone": "formal"}, User("carol", "acme"))
    assert bob.result["is_byollm"] is True and bob.result["model"] == "llama3.1-8b"
    assert carol.result["is_byollm"] is False
    [bob_row] = _rows(services, bob.invocation_id)
    assert bob_row.is_byollm
    failed, served = _rows(services, carol.invocation_id)
    assert (failed.is_byollm, failed.status, failed.error_type) == (True, "error", "server_error")
    assert (served.is_byollm, served.is_failover, served.status, served.call_index) == (False, True, "ok", 1)


async def test_rewrite_multiple_makes_one_event_per_variation(services: Services) -> None:
    result = await services.runtime.invoke(
        rewrite, "rewrite_multiple", {"text": "hello", "tone": "casual", "n_variations": 4}, User("alice", "acme")
    )
    assert len(result.result["variations"]) == 4
    rows = _rows(services, result.invocation_id)
    assert [r.call_index for r in rows] == [0, 1, 2, 3]


@pytest.mark.parametrize("n", [0, 6])
async def test_rewrite_multiple_is_bounded_by_its_schema(services: Services, n: int) -> None:
    with pytest.raises(InvalidInputError, match="n_variations"):
        await services.runtime.invoke(
            rewrite, "rewrite_multiple", {"text": "x", "tone": "casual", "n_variations": n}, User("alice", "acme")
        )


async def test_extract_action_items_returns_parsed_json(services: Services) -> None:
    text = "Alice will send the budget by Friday. Bob needs to book the venue."
    result = await services.runtime.invoke(rewrite, "extract_action_items", {"text": text}, User("alice", "acme"))
    items = result.result["action_items"]
    assert items and all(set(item) == {"owner", "deadline", "task"} for item in items)
    [row] = _rows(services, result.invocation_id)
    assert row.purpose == "action_items"


async def test_enforced_budget_stops_a_loop_before_the_call(services: Services) -> None:
    with services.sessions() as session:
        store.put_budget(session, extension_id="rewrite", max_calls=2, max_tokens=None, mode="enforce")
        session.commit()
    services.llm_settings.invalidate()
    with pytest.raises(BudgetExceededError, match="calls budget"):
        await services.runtime.invoke(
            rewrite, "rewrite_multiple", {"text": "hello", "tone": "casual", "n_variations": 3}, User("alice", "acme")
        )
    assert services.flusher.flush(timeout=30.0)
    from metering.db.event_store import count_events

    with services.sessions() as session:
        assert count_events(session) == 2


async def test_bad_params_and_unknown_function_are_clear_errors(services: Services) -> None:
    with pytest.raises(InvalidInputError, match="tone"):
        await services.runtime.invoke(rewrite, "rewrite", {"text": "x", "tone": "sarcastic"}, User("a", "t"))
    from metering.errors import NotFoundError

    with pytest.raises(NotFoundError, match="has no function 'translate'"):
        await services.runtime.invoke(rewrite, "translate", {}, User("a", "t"))
