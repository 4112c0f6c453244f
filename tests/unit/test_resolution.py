"""The resolution cascade: BYOLLM → per-purpose → platform default; failover target; no-key simulation."""

from __future__ import annotations

from metering.llm.resolution import (
    ByollmSettings,
    FallbackPolicy,
    PlatformLLM,
    PurposeSettings,
    Source,
    resolve,
)

KEYED = PlatformLLM(provider="anthropic", model="claude-sonnet-4-6", api_keys={"anthropic": "sk-platform"})
NO_KEYS = PlatformLLM(provider="anthropic", model="claude-sonnet-4-6")
BYO = ByollmSettings(user_id="u1", tenant_id="t1", provider="openai", model="gpt-4o-mini", api_key="sk-user")
PURPOSE = PurposeSettings(
    purpose="content_rewrite", provider="anthropic", model="claude-haiku-4-5", params={"top_p": 0.9}
)


def test_platform_default_when_nothing_configured() -> None:
    plan = resolve(None, None, KEYED)
    assert plan.primary.source is Source.PLATFORM
    assert (plan.primary.config.provider, plan.primary.config.model) == ("anthropic", "claude-sonnet-4-6")
    assert plan.primary.config.api_key == "sk-platform"
    assert plan.primary.is_byollm is False
    assert plan.fallback is None


def test_purpose_settings_override_the_default() -> None:
    plan = resolve(None, PURPOSE, KEYED)
    assert plan.primary.source is Source.PURPOSE
    assert plan.primary.config.model == "claude-haiku-4-5"
    assert plan.primary.params == {"top_p": 0.9}


def test_byollm_wins_and_fails_over_to_the_platform_llm_for_the_purpose() -> None:
    plan = resolve(BYO, PURPOSE, KEYED)
    assert plan.primary.is_byollm is True
    assert plan.primary.source is Source.BYOLLM
    assert plan.primary.config.api_key == "sk-user"
    assert plan.fallback is not None
    assert plan.fallback.is_byollm is False
    assert plan.fallback.config.model == "claude-haiku-4-5"
    assert plan.fallback.config.api_key == "sk-platform"
    # the purpose's params are the platform LLM's (docs/ctx-llm.md): never sent with the user's own call
    assert plan.primary.params == {} and plan.fallback.params == {"top_p": 0.9}


def test_byollm_with_error_policy_has_no_fallback() -> None:
    byo = ByollmSettings(
        user_id="u1",
        tenant_id="t1",
        provider="openai",
        model="m",
        api_key="k",
        fallback_policy=FallbackPolicy.ERROR,
    )
    assert resolve(byo, PURPOSE, KEYED).fallback is None


def test_platform_without_key_is_served_by_the_simulated_provider() -> None:
    plan = resolve(None, None, NO_KEYS)
    assert plan.primary.config.provider == "simulated"
    assert plan.primary.config.model == "claude-sonnet-4-6"
    assert plan.primary.is_byollm is False


def test_user_key_never_shows_in_reprs() -> None:
    plan = resolve(BYO, None, KEYED)
    assert "sk-user" not in repr(plan)
    assert "sk-user" not in repr(BYO)
    assert "sk-platform" not in repr(KEYED)


def test_the_platform_key_goes_only_to_the_endpoint_the_operator_configured() -> None:
    """A purpose's base_url is an admin's choice: the platform key is not sent there (any admin token could have had
    it delivered to its own host). The provider's own endpoint and the platform base_url from settings keep it."""
    elsewhere = PurposeSettings(
        purpose="content_rewrite", provider="anthropic", model="claude-haiku-4-5", base_url="https://elsewhere/v1"
    )
    plan = resolve(None, elsewhere, KEYED)
    assert plan.primary.config.base_url == "https://elsewhere/v1" and plan.primary.config.api_key is None
    assert resolve(None, PURPOSE, KEYED).primary.config.api_key == "sk-platform"  # the provider's own endpoint
    proxied = PlatformLLM(
        provider="anthropic", model="m", base_url="https://gateway/v1", api_keys={"anthropic": "sk-platform"}
    )
    assert resolve(None, None, proxied).primary.config.api_key == "sk-platform"  # the operator's own base_url
    same = PurposeSettings(purpose="p", provider="anthropic", model="m", base_url="https://gateway/v1")
    assert resolve(None, same, proxied).primary.config.api_key == "sk-platform"
    failover = resolve(BYO, elsewhere, KEYED).fallback
    assert failover is not None and failover.config.api_key is None
    trusted = PlatformLLM(provider="openai", model="m", api_keys={"anthropic": "sk-platform"},
                          keyed_base_urls=frozenset({"https://elsewhere/v1"}))  # fmt: skip
    assert resolve(None, elsewhere, trusted).primary.config.api_key == "sk-platform"  # the operator's gateway
    not_listed = PurposeSettings(purpose="p", provider="anthropic", model="m", base_url="https://elsewhere/v1/")
    assert resolve(None, not_listed, trusted).primary.config.api_key is None  # exactly as listed
