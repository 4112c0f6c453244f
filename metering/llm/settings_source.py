"""Where the cascade's inputs come from: a protocol, an in-memory source, and a TTL cache over any source."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from metering.llm.budgets import CallBudget
from metering.llm.resolution import ByollmSettings, PurposeSettings

log = logging.getLogger("metering.llm")

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class SettingsSource(Protocol):
    def byollm(self, user_id: str, tenant_id: str) -> ByollmSettings | None:
        """The user's own LLM, if configured under this tenant (user ids are global: another tenant's settings, and
        their key, are never loaded for this one's calls)."""
        ...

    def purpose(self, purpose: str) -> PurposeSettings | None: ...

    def budget(self, extension_id: str) -> CallBudget | None: ...


@dataclass
class InMemorySettings:
    """A settings source held in dicts (tests, benchmarks, embedding without a database)."""

    byollm_by_user: dict[str, ByollmSettings] = field(default_factory=dict)
    purpose_by_name: dict[str, PurposeSettings] = field(default_factory=dict)
    budget_by_extension: dict[str, CallBudget] = field(default_factory=dict)

    def byollm(self, user_id: str, tenant_id: str) -> ByollmSettings | None:
        settings = self.byollm_by_user.get(user_id)
        return settings if settings is not None and settings.tenant_id == tenant_id else None

    def purpose(self, purpose: str) -> PurposeSettings | None:
        return self.purpose_by_name.get(purpose)

    def budget(self, extension_id: str) -> CallBudget | None:
        return self.budget_by_extension.get(extension_id)


class CachedSettings:
    """A TTL cache in front of a slower source (the database). ``invalidate()`` after local writes.

    Settings changed by another process are seen within ``ttl_s`` seconds. ``on_key_replaced`` (the provider pool's
    ``retire_key``) is told a user's BYOLLM api key that a reload found replaced or deleted, whichever process changed
    it (the CLI, another worker or replica): the adapters holding it leave the pool then, not only once they are the
    least recently used. It is called where ``byollm`` is, on the event loop that makes the calls.
    """

    def __init__(
        self,
        source: SettingsSource,
        ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_key_replaced: Callable[[str], object] | None = None,
    ) -> None:
        self._source = source
        self._ttl = ttl_s
        self._clock = clock
        self.on_key_replaced = on_key_replaced
        self._entries: dict[tuple[str, Hashable], tuple[float, object]] = {}
        self._generation = 0  # bumped by invalidate(): a value loaded before it is not kept

    def _get(self, kind: str, key: K, load: Callable[[K], T], reloaded: Callable[[object, T], None] | None = None) -> T:
        now = self._clock()
        hit = self._entries.get((kind, key))
        if hit is not None and hit[0] > now:
            return hit[1]  # type: ignore[return-value]
        generation = self._generation
        value = load(key)
        # A load that an invalidate() overtook may have read the row before the change committed: answered, not kept
        # (kept, it served the deleted settings, e.g. a user's removed BYOLLM key, for another TTL).
        if generation == self._generation:
            self._entries[(kind, key)] = (now + self._ttl, value)
        if hit is not None and reloaded is not None:
            reloaded(hit[1], value)
        return value

    def byollm(self, user_id: str, tenant_id: str) -> ByollmSettings | None:
        return self._get("byollm", (user_id, tenant_id), self._load_byollm, self._byollm_reloaded)

    def _load_byollm(self, key: tuple[str, str]) -> ByollmSettings | None:
        return self._source.byollm(*key)

    def _byollm_reloaded(self, before: object, after: ByollmSettings | None) -> None:
        """A user's settings loaded again (their cache entry expired): a key they no longer have is retired."""
        old_key = _key_of(before)
        if old_key is None or (after is not None and after.api_key == old_key) or self.on_key_replaced is None:
            return
        try:
            self.on_key_replaced(old_key)
        except Exception:  # tidying up must never fail the call being resolved
            log.warning("retiring the adapters of a replaced BYOLLM key failed", exc_info=True)

    def purpose(self, purpose: str) -> PurposeSettings | None:
        return self._get("purpose", purpose, self._source.purpose)

    def budget(self, extension_id: str) -> CallBudget | None:
        return self._get("budget", extension_id, self._source.budget)

    def __len__(self) -> int:
        """How many entries are held (expired ones included)."""
        return len(self._entries)

    def invalidate(self) -> None:
        self._generation += 1
        # A user's BYOLLM settings are expired rather than dropped: a reload still sees the key it replaces (see
        # ``on_key_replaced``). Nothing else is compared: dropped, as every entry was before (kept, every user, purpose
        # and extension ever resolved stayed for the life of the process).
        entries = list(self._entries.items())
        self._entries = {key: (-math.inf, value) for key, (_, value) in entries if isinstance(value, ByollmSettings)}

    def forget_key(self, api_key: str) -> None:
        """Drop the entries holding ``api_key``, which this process replaced or deleted and retires itself (an admin
        write): a deleted user's key is not held until they call again, which they may never do."""
        held = [key for key, (_, value) in list(self._entries.items()) if _key_of(value) == api_key]
        for key in held:
            self._entries.pop(key, None)


def _key_of(value: object) -> str | None:
    """The BYOLLM api key a cache entry holds, if any."""
    return value.api_key if isinstance(value, ByollmSettings) else None
