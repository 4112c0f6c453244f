"""The resolution cascade (pure): which LLM serves a call, and what to fail over to.

First match wins: the user's BYOLLM settings → the admin's per-purpose settings → the platform default.
A platform provider without a configured platform api key is served by the ``simulated`` provider
(same model name), so the embedded default runs offline; the event then says provider=simulated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from metering.llm.providers.base import ProviderConfig

KEYED_PROVIDERS = frozenset({"anthropic", "openai"})
SIMULATED = "simulated"


class FallbackPolicy(StrEnum):
    PLATFORM = "platform"  # a failed BYOLLM call is retried once on the platform LLM (billable)
    ERROR = "error"  # a failed BYOLLM call raises


class Source(StrEnum):
    BYOLLM = "byollm"
    PURPOSE = "purpose"
    PLATFORM = "platform"


@dataclass(frozen=True, slots=True)
class ByollmSettings:
    user_id: str
    tenant_id: str
    provider: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    fallback_policy: FallbackPolicy = FallbackPolicy.PLATFORM
    # A key is stored but the configured keys cannot decrypt it (the one that encrypted it was removed): each call
    # fails as ``secret_error`` without being made, and never fails over to the platform LLM (see ``resolve``).
    key_unreadable: bool = False


@dataclass(frozen=True, slots=True)
class PurposeSettings:
    purpose: str
    provider: str
    model: str
    base_url: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PlatformLLM:
    """The platform default plus the platform's own provider keys (never a user's)."""

    provider: str
    model: str
    base_url: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 2
    api_keys: Mapping[str, str | None] = field(default_factory=dict, repr=False)
    keyed_base_urls: frozenset[str] = frozenset()  # the operator's endpoints that may receive the platform keys


@dataclass(frozen=True, slots=True)
class Target:
    """One concrete LLM to call and how to account for it."""

    config: ProviderConfig
    is_byollm: bool
    source: Source
    params: Mapping[str, Any] = field(default_factory=dict)
    key_unreadable: bool = False  # never called: fails as ``secret_error`` (see ``ByollmSettings.key_unreadable``)


@dataclass(frozen=True, slots=True)
class Plan:
    primary: Target
    fallback: Target | None = None


def _platform_target(
    provider: str,
    model: str,
    base_url: str | None,
    params: Mapping[str, Any],
    source: Source,
    platform: PlatformLLM,
) -> Target:
    # The platform's key goes only where the operator configured it: its provider's own endpoint, the platform
    # base_url (settings) for the platform provider, or one of the operator's keyed_base_urls (settings). A purpose's
    # base_url is an admin's choice: sent the key, any admin token could have it delivered to a host of its own (a
    # BYOLLM key is never sent to another endpoint either).
    operator_endpoint = (
        base_url is None
        or (provider == platform.provider and base_url == platform.base_url)
        or base_url in platform.keyed_base_urls
    )
    api_key = platform.api_keys.get(provider) if operator_endpoint else None
    if provider in KEYED_PROVIDERS and not api_key and base_url is None:
        provider, api_key = SIMULATED, None
    config = ProviderConfig(
        provider=provider,
        model=model,
        api_key=api_key,
        base_url=base_url,
        timeout_s=platform.timeout_s,
        max_retries=platform.max_retries,
    )
    return Target(config=config, is_byollm=False, source=source, params=params)


def platform_target(purpose: PurposeSettings | None, platform: PlatformLLM) -> Target:
    """The platform LLM for a purpose: admin per-purpose settings, else the platform default."""
    if purpose is not None:
        return _platform_target(
            purpose.provider, purpose.model, purpose.base_url, purpose.params, Source.PURPOSE, platform
        )
    return _platform_target(platform.provider, platform.model, platform.base_url, {}, Source.PLATFORM, platform)


def resolve(byollm: ByollmSettings | None, purpose: PurposeSettings | None, platform: PlatformLLM) -> Plan:
    """Build the plan for one call. Policy A is decided later by the target that actually served it."""
    if byollm is None:
        return Plan(primary=platform_target(purpose, platform))
    primary = Target(
        config=ProviderConfig(
            provider=byollm.provider,
            model=byollm.model,
            api_key=byollm.api_key,
            base_url=byollm.base_url,
            timeout_s=platform.timeout_s,
            max_retries=platform.max_retries,
        ),
        is_byollm=True,
        source=Source.BYOLLM,
        key_unreadable=byollm.key_unreadable,
    )
    # A key the operator can no longer decrypt is not the user's LLM failing: no failover, whatever the policy, so
    # that the operator's loss is never billed to the user on the platform LLM (Policy A bills a failover).
    failover = byollm.fallback_policy is FallbackPolicy.PLATFORM and not byollm.key_unreadable
    fallback = platform_target(purpose, platform) if failover else None
    return Plan(primary=primary, fallback=fallback)


_PLAN_CACHE_MAX = 4096
_plans: dict[tuple[int, int, int], tuple[object, object, object, Plan]] = {}
# The last plan resolved, with its inputs: the one most calls ask for again (no BYOLLM, one purpose's settings) is
# found by identity alone, without the key's three id() calls and the dict (one tuple, read and replaced whole).
_last: tuple[object, object, object, Plan] | None = None


def resolve_cached(byollm: ByollmSettings | None, purpose: PurposeSettings | None, platform: PlatformLLM) -> Plan:
    """``resolve`` memoised on the identity of its (immutable) inputs.

    Settings sources hand out the same objects until they reload them, so the metered hot path builds
    a plan once per settings version instead of once per call. Entries hold their inputs, so an id is
    never reused while its entry lives; the cache is bounded.
    """
    global _last
    hit = _last
    if hit is not None and hit[0] is byollm and hit[1] is purpose and hit[2] is platform:
        return hit[3]
    key = (id(byollm), id(purpose), id(platform))
    hit = _plans.get(key)
    if hit is None or hit[0] is not byollm or hit[1] is not purpose or hit[2] is not platform:
        hit = (byollm, purpose, platform, resolve(byollm, purpose, platform))
        if len(_plans) >= _PLAN_CACHE_MAX:
            _plans.clear()
        _plans[key] = hit
    _last = hit
    return hit[3]
