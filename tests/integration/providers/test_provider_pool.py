"""The provider pool over the real adapters and SDKs, against the fake OpenAI server: it holds at most
``max_adapters`` adapters (one per provider, endpoint and key), closes the ones it drops, and never closes one a call
(answered or streamed) is still using."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from metering.events import Status, UsageEvent, uuid7
from metering.llm.client import MeteredLLM
from metering.llm.event_record import CallScope
from metering.llm.pool import ProviderPool
from metering.llm.providers import make_provider
from metering.llm.providers.base import Provider, ProviderConfig
from metering.llm.resolution import ByollmSettings, FallbackPolicy, PlatformLLM
from metering.llm.settings_source import CachedSettings, InMemorySettings
from tests.fakes import FakeOpenAIServer, Reply
from tests.integration.test_spool_fork import _in_child
from tests.unit.test_metered_llm import MESSAGES, Recorder

MakeLLM = Callable[[str], MeteredLLM]


@pytest.fixture
async def pool() -> AsyncIterator[ProviderPool]:
    pool = ProviderPool(make_provider, max_adapters=2)
    yield pool
    await pool.aclose()


@pytest.fixture
def llm_for(pool: ProviderPool, openai_server: FakeOpenAIServer) -> MakeLLM:
    """A user's ctx.llm whose own LLM is the fake server, with the key ``sk-<user>-…`` (one adapter per user)."""

    def make(user: str) -> MeteredLLM:
        own = ByollmSettings(
            user_id=user,
            tenant_id="t1",
            provider="openai_compatible",
            model="llama3",
            api_key=key_of(user),
            base_url=openai_server.base_url,
            fallback_policy=FallbackPolicy.ERROR,
        )
        platform = PlatformLLM(provider="simulated", model="m", timeout_s=5, max_retries=0)
        return MeteredLLM(
            scope=CallScope("t1", user, "rewrite", "rewrite", uuid7()),
            settings=InMemorySettings(byollm_by_user={user: own}),
            platform=platform,
            providers=pool,
            recorder=Recorder(),
        )

    return make


def key_of(user: str) -> str:
    return f"sk-{user}-0123456789abcdef"


def adapter_of(pool: ProviderPool, user: str, server: FakeOpenAIServer) -> Provider:
    """The adapter the pool holds for ``user``'s key (made now if it holds none)."""
    config = ProviderConfig("openai_compatible", "llama3", key_of(user), server.base_url, 5.0, 0)
    return pool.get(config).provider


def is_closed(provider: Provider) -> bool:
    client = provider._client  # type: ignore[attr-defined]  # the adapter's AsyncOpenAI
    return bool(client.is_closed())


async def test_the_pool_keeps_at_most_max_adapters_and_closes_the_least_recently_used(
    pool: ProviderPool, llm_for: MakeLLM, openai_server: FakeOpenAIServer
) -> None:
    """It kept one adapter (one SDK client, its connection pool and its key) per key forever: a service meeting many
    BYOLLM users, or users rotating keys, held every one of them."""
    adapters: dict[str, Provider] = {}
    for user in ("u1", "u2", "u1", "u3"):  # u1 used again: u2 is the least recently used when u3 comes
        await llm_for(user).create_message(messages=MESSAGES)
        adapters.setdefault(user, adapter_of(pool, user, openai_server))
    await pool.wait_closed()
    assert len(pool) == 2
    assert [is_closed(adapters[user]) for user in ("u1", "u2", "u3")] == [False, True, False]
    assert [request.headers["authorization"] for request in openai_server.requests] == [
        f"Bearer {key_of(user)}" for user in ("u1", "u2", "u1", "u3")
    ]


async def test_an_adapter_dropped_during_a_call_is_closed_only_once_the_call_has_ended(
    pool: ProviderPool, llm_for: MakeLLM, openai_server: FakeOpenAIServer
) -> None:
    arrived, proceed = threading.Event(), threading.Event()
    openai_server.script(Reply(text="late answer", arrived=arrived, proceed=proceed))
    slow = asyncio.create_task(llm_for("u1").create_message(messages=MESSAGES))
    await asyncio.to_thread(arrived.wait, 10.0)  # u1's call is in flight on its adapter
    first = adapter_of(pool, "u1", openai_server)
    for user in ("u2", "u3"):  # two other keys: u1's adapter leaves the pool while its call waits for the answer
        await llm_for(user).create_message(messages=MESSAGES)
    assert len(pool) == 2 and adapter_of(pool, "u2", openai_server) is not first
    await pool.wait_closed()
    assert not is_closed(first)
    proceed.set()
    response = await slow
    assert response.text == "late answer" and response.is_byollm
    await pool.wait_closed()
    assert is_closed(first)


async def test_a_stream_on_a_dropped_adapter_is_read_to_its_end(
    pool: ProviderPool, llm_for: MakeLLM, openai_server: FakeOpenAIServer
) -> None:
    openai_server.script(Reply(text="one two three four"))
    llm = llm_for("u1")
    chunks_of = aiter(llm.stream_message(messages=MESSAGES))
    chunks = [await anext(chunks_of)]  # the body is being read on u1's adapter
    first = adapter_of(pool, "u1", openai_server)
    for user in ("u2", "u3"):
        await llm_for(user).create_message(messages=MESSAGES)
    await pool.wait_closed()
    assert not is_closed(first)
    chunks += [chunk async for chunk in chunks_of]
    assert "".join(chunks) == "one two three four"
    [event] = llm_for_events(llm)
    assert event.status is Status.OK and event.is_stream
    await pool.wait_closed()
    assert is_closed(first)


async def test_the_same_config_again_gets_its_adapter_and_a_retired_one_is_never_handed_out_again() -> None:
    """``get`` hands the adapter of the config it was last given straight back (the metered hot path): that adapter
    stays the most recently used, and once retired (evicted, or its key replaced) the same config gets a new one."""
    pool = ProviderPool(make_provider, max_adapters=2)
    a, b, c = (ProviderConfig("simulated", "m", api_key=f"sk-{name}") for name in "abc")
    first = pool.get(a)
    assert pool.get(a) is first and pool.get(a) is first
    second = pool.get(b)
    assert pool.get(a) is first and pool.get(a) is first  # a used again: b is the least recently used
    pool.get(c)
    assert (second.retired, first.retired, len(pool)) == (True, False, 2)
    assert pool.get(a) is first
    assert pool.retire_key("sk-a") == 1 and first.retired
    again = pool.get(a)
    assert again is not first and not again.retired and pool.get(a) is again
    await pool.aclose()
    assert again.retired and pool.get(a) is not again


async def test_a_forked_child_never_gets_the_parents_last_adapter() -> None:
    """The pool hands the adapter of the config it was last given straight back; a child forked from the process (a
    prefork server, a task queue) must make its own (the parent's connections and event loop are not its own), the
    same config object included."""
    pool = ProviderPool(make_provider)
    config = ProviderConfig("simulated", "m", api_key="sk-a")
    first = pool.get(config)
    assert pool.get(config) is first
    report = _in_child(lambda: (pool.get(config) is first, len(pool), pool.get(config) is pool.get(config)))
    assert report == "ok (False, 1, True)"
    assert pool.get(config) is first
    await pool.aclose()


async def test_retiring_a_key_closes_its_idle_adapters_and_spares_the_others(
    pool: ProviderPool, llm_for: MakeLLM, openai_server: FakeOpenAIServer
) -> None:
    for user in ("u1", "u2"):
        await llm_for(user).create_message(messages=MESSAGES)
    old, other = adapter_of(pool, "u1", openai_server), adapter_of(pool, "u2", openai_server)
    assert pool.retire_key(key_of("u1")) == 1
    await pool.wait_closed()
    assert (is_closed(old), is_closed(other), len(pool)) == (True, False, 1)
    assert pool.retire_key(key_of("u1")) == 0


def llm_for_events(llm: MeteredLLM) -> list[UsageEvent]:
    recorder = llm._recorder
    assert isinstance(recorder, Recorder)
    return recorder.events


async def test_a_stream_ended_by_an_error_thrown_in_closes_its_upstream(
    pool: ProviderPool, llm_for: MakeLLM, openai_server: FakeOpenAIServer
) -> None:
    """An exception thrown into the stream at a chunk (the consumer's ``athrow``) was recorded, but the upstream
    response was left open, its connection held until the generator was collected; and the adapter, once released,
    could be closed under it."""
    openai_server.script(Reply(text="one two three four five six seven"))
    llm = llm_for("u1")
    chunks_of = aiter(llm.stream_message(messages=MESSAGES))
    await anext(chunks_of)
    connections = adapter_of(pool, "u1", openai_server)._client._client._transport._pool.connections  # type: ignore[attr-defined]  # httpx's pool
    assert [c.is_closed() for c in connections] == [False]
    with pytest.raises(RuntimeError, match="consumer bug"):
        await chunks_of.athrow(RuntimeError("consumer bug"))
    assert all(c.is_closed() for c in connections)  # the unfinished response was closed, its connection with it
    [event] = llm_for_events(llm)
    assert (event.status, event.error_type) == (Status.ERROR, "internal:RuntimeError")


@pytest.mark.parametrize("change", ["replaced", "deleted", "replaced, then a local write"])
async def test_a_key_changed_by_another_process_is_retired_once_the_settings_reload(
    pool: ProviderPool, openai_server: FakeOpenAIServer, change: str
) -> None:
    """A BYOLLM key replaced or deleted from another process (the CLI, another worker) was never retired here: its
    adapter, and the key, stayed in the pool until it was the least recently used beyond the bound. The settings
    cache's reload retires it; the old key is used only until then (the cache's TTL), and never after. A local write
    of other settings meanwhile (``invalidate``) does not hide the change from the reload."""
    own = ByollmSettings("u1", "t1", "openai_compatible", "llama3", key_of("u1"), openai_server.base_url)
    source = InMemorySettings(byollm_by_user={"u1": own})
    now = [0.0]
    settings = CachedSettings(source, ttl_s=5.0, clock=lambda: now[0], on_key_replaced=pool.retire_key)
    platform = PlatformLLM(provider="simulated", model="m", timeout_s=5, max_retries=0)

    def llm() -> MeteredLLM:
        scope = CallScope("t1", "u1", "rewrite", "rewrite", uuid7())
        return MeteredLLM(scope=scope, settings=settings, platform=platform, providers=pool, recorder=Recorder())

    await llm().create_message(messages=MESSAGES)
    old = adapter_of(pool, "u1", openai_server)
    # another process commits the change
    new_key = "sk-u1-new-0123456789abcdef"
    if change == "deleted":
        del source.byollm_by_user["u1"]
    else:
        source.byollm_by_user["u1"] = dataclasses.replace(own, api_key=new_key)
    await llm().create_message(messages=MESSAGES)  # within the TTL: the cached settings, the old key
    assert openai_server.last.headers["authorization"] == f"Bearer {key_of('u1')}"
    if change == "replaced, then a local write":
        settings.invalidate()  # e.g. an admin changed a purpose through this process
    else:
        now[0] = 5.0  # the cache entry expired
    response = await llm().create_message(messages=MESSAGES)
    await pool.wait_closed()
    assert is_closed(old) and len(pool) == 1  # the new key's adapter, or the platform's
    if change == "deleted":
        assert not response.is_byollm and response.provider == "simulated" and len(openai_server.requests) == 2
    else:
        assert response.is_byollm and openai_server.last.headers["authorization"] == f"Bearer {new_key}"
        assert len(openai_server.requests) == 3
