"""The platform LLM's provider is checked with the settings, not at its first call."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from metering.config import KNOWN_PROVIDERS, PlatformLLMSettings


def test_an_unknown_platform_provider_is_refused_with_the_settings() -> None:
    """Accepted, every call to the platform LLM failed with `config_error` (an HTTP invoke answered 500)."""
    with pytest.raises(ValidationError, match="must be one of anthropic, openai, openai_compatible, simulated"):
        PlatformLLMSettings(provider="antropic")


@pytest.mark.parametrize("name", ["OpenAI", "Anthropic", "SIMULATED"])
def test_a_platform_provider_is_case_insensitive(name: str) -> None:
    provider = PlatformLLMSettings(provider=name).provider
    assert provider == name.lower() and provider in KNOWN_PROVIDERS
