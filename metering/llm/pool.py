"""The provider pool: one adapter (one SDK client, i.e. one HTTP connection pool) per provider, endpoint and key,
reused across calls, at most ``max_adapters`` of them.

A long-running service meets many keys (every BYOLLM user's, every key a user replaced): the least recently used
adapter beyond the bound is retired, and so is every adapter of a key that was replaced or deleted (``retire_key``).
A retired adapter is closed as soon as no call uses it: a call in flight on it (a ``complete`` awaiting its answer, a
stream being read) ends normally. Callers count their use: ``entry.in_use += 1`` just before the call, and
``release(entry)`` once it has ended, whatever the outcome (the hot path stays a dict hit and a ``move_to_end``).

Used on one event loop (the service's, or the CLI's ``asyncio.run``); it takes no lock. A process forked from this one
starts with an empty pool (see ``ProviderPool._after_fork_in_child``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable

from metering.llm.providers.base import Provider, ProviderConfig

log = logging.getLogger("metering.llm")

# Each adapter holds an SDK client: its connection pool, its TLS context (a few hundred kB), its key. A service meets
# a handful of platform endpoints and one adapter per active BYOLLM user; beyond this, the least recently used go.
DEFAULT_MAX_ADAPTERS = 64

PoolKey = tuple[str, str | None, str | None, float, int]


class PooledProvider:
    """One adapter of the pool. ``in_use``: calls using it now; ``retired``: out of the pool, closed when unused."""

    __slots__ = ("in_use", "key", "provider", "retired")

    def __init__(self, key: PoolKey, provider: Provider) -> None:
        self.key = key
        self.provider = provider
        self.in_use = 0
        self.retired = False


class ProviderPool:
    """Reuses one adapter (and its HTTP connection pool) per provider, endpoint and key; a bounded LRU."""

    def __init__(
        self, factory: Callable[[ProviderConfig], Provider], *, max_adapters: int = DEFAULT_MAX_ADAPTERS
    ) -> None:
        if max_adapters < 1:
            raise ValueError("max_adapters must be at least 1")
        self._factory = factory
        self._max = max_adapters
        self._cache: OrderedDict[PoolKey, PooledProvider] = OrderedDict()
        self._retired_in_use: set[PooledProvider] = set()  # out of the pool, a call still using them
        self._closing: set[asyncio.Task[None]] = set()  # closes under way (kept referenced until done)
        # The config of the last `get` and its entry, the most recently used: a call with the same config (the same
        # plan's target) gets it without the key and the dict; forgotten whenever an adapter is retired.
        self._last: tuple[ProviderConfig, PooledProvider] | None = None
        _POOLS.add(self)

    def _after_fork_in_child(self) -> None:
        """The adapters are the parent's: their connections (one TLS stream for two processes) and their state bound
        to the parent's event loop (a child's call on one failed: 'bound to a different event loop'). The child makes
        its own; the parent's are kept referenced, never used or closed here."""
        _INHERITED.append((self._cache, self._retired_in_use, self._closing))
        self._last = None
        self._cache = OrderedDict()
        self._retired_in_use = set()
        self._closing = set()

    def get(self, config: ProviderConfig) -> PooledProvider:
        """The adapter for ``config`` (made on first use), now the most recently used."""
        last = self._last
        if last is not None and last[0] is config:  # (no get since: still the most recently used)
            return last[1]
        key = (config.provider, config.base_url, config.api_key, config.timeout_s, config.max_retries)
        entry = self._cache.get(key)
        if entry is None:
            entry = self._add(key, config)
        else:
            self._cache.move_to_end(key)
        self._last = (config, entry)
        return entry

    def release(self, entry: PooledProvider) -> None:
        """A call counted in ``entry.in_use`` has ended: a retired adapter no call uses any more is closed."""
        entry.in_use -= 1
        if entry.retired and entry.in_use == 0 and entry in self._retired_in_use:  # (aclose() closed it already)
            self._retired_in_use.discard(entry)
            self._close_soon(entry)

    def retire_key(self, api_key: str) -> int:
        """Retire every adapter of ``api_key`` (a user's BYOLLM key was replaced or deleted). How many there were."""
        keys = [key for key in self._cache if key[2] == api_key]
        for key in keys:
            self._retire(self._cache.pop(key))
        return len(keys)

    def __len__(self) -> int:
        return len(self._cache)

    def _add(self, key: PoolKey, config: ProviderConfig) -> PooledProvider:
        entry = self._cache[key] = PooledProvider(key, self._factory(config))  # the factory may raise: nothing added
        while len(self._cache) > self._max:
            _, oldest = self._cache.popitem(last=False)
            self._retire(oldest)
        return entry

    def _retire(self, entry: PooledProvider) -> None:
        self._last = None
        entry.retired = True
        if entry.in_use:
            self._retired_in_use.add(entry)  # closed by the release of its last call
        else:
            self._close_soon(entry)

    def _close_soon(self, entry: PooledProvider) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop (no call can be using it): aclose() closes it
            self._retired_in_use.add(entry)
            return
        task = loop.create_task(_close(entry.provider))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close every adapter, those retired included, and wait for closes under way."""
        entries = [*self._cache.values(), *self._retired_in_use]
        self._last = None
        self._cache = OrderedDict()
        self._retired_in_use = set()
        for entry in entries:
            entry.retired = True
            await _close(entry.provider)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait for the closes of retired adapters under way."""
        while self._closing:
            await asyncio.gather(*self._closing)


# Pools, for the child of a fork (a prefork server, a task queue): see ``ProviderPool._after_fork_in_child``.
_POOLS: weakref.WeakSet[ProviderPool] = weakref.WeakSet()
_INHERITED: list[object] = []


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


async def _close(provider: Provider) -> None:
    try:
        await provider.aclose()
    except Exception:  # closing is best effort: an adapter that fails to close must not fail a call or the shutdown
        log.warning("closing a provider adapter failed", exc_info=True)


__all__ = ["DEFAULT_MAX_ADAPTERS", "PooledProvider", "ProviderPool"]
