"""A process forked with a provider pool whose adapters keep connections to the provider open (a prefork server,
a task queue): the child's calls must not go over the parent's connections (one TCP or TLS stream used by two
processes)."""

from __future__ import annotations

import asyncio

from metering.events import uuid7
from metering.llm.client import MeteredLLM
from metering.llm.event_record import CallScope
from metering.llm.pool import ProviderPool
from metering.llm.providers import make_provider
from metering.llm.resolution import PlatformLLM
from metering.llm.settings_source import InMemorySettings
from tests.fakes import FakeOpenAIServer
from tests.integration.test_spool_fork import _in_child
from tests.unit.test_metered_llm import Recorder


def test_a_forked_childs_calls_open_connections_of_their_own(openai_server: FakeOpenAIServer) -> None:
    platform = PlatformLLM(
        provider="openai", model="gpt-4o-mini", base_url=openai_server.base_url, timeout_s=5, max_retries=0,
        api_keys={"openai": "sk-platform-key-123456"},
    )  # fmt: skip
    pool = ProviderPool(make_provider)

    async def call() -> str:
        llm = MeteredLLM(
            scope=CallScope("t1", "u1", "rewrite", "rewrite", uuid7()),
            settings=InMemorySettings(),
            platform=platform,
            providers=pool,
            recorder=Recorder(),
        )
        return (await llm.create_message(messages=[{"role": "user", "content": "Hi"}])).text

    async def twice() -> None:
        await call()
        assert len(pool) == 1
        report = _in_child(lambda: asyncio.run(call()))  # the parent's adapter, its connection open
        assert report.startswith("ok "), report
        await call()
        await pool.aclose()

    asyncio.run(twice())
    parent, child, parent_again = (request.peer for request in openai_server.requests)
    assert parent == parent_again
    assert child != parent
