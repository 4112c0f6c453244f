"""Provider adapters and their registry.

An adapter is bound to an endpoint and a key (it owns one SDK client, i.e. one connection pool), never
to a model: the model comes with each ``ProviderRequest``. SDKs are imported only when an adapter of
theirs is made, so importing this package (e.g. for ``KNOWN_PROVIDERS``) stays cheap.
"""

from __future__ import annotations

from metering.config import KNOWN_PROVIDERS, SimulatedSettings
from metering.errors import ConfigError
from metering.llm.providers.base import Provider, ProviderConfig


def make_provider(config: ProviderConfig, simulated: SimulatedSettings | None = None) -> Provider:
    """A new adapter for ``config.provider`` (``simulated`` uses the ``simulated`` latency settings)."""
    name = config.provider
    if name == "simulated":
        from metering.llm.providers.simulated import SimulatedProvider

        return SimulatedProvider(simulated)
    if name == "anthropic":
        from metering.llm.providers.anthropic import AnthropicProvider

        return AnthropicProvider(config)
    if name in ("openai", "openai_compatible"):
        from metering.llm.providers.openai import OpenAIProvider

        return OpenAIProvider(config)
    raise ConfigError(f"unknown provider {name!r}; known providers: {', '.join(KNOWN_PROVIDERS)}")


__all__ = ["KNOWN_PROVIDERS", "Provider", "ProviderConfig", "make_provider"]
