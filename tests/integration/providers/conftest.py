"""Fixtures for the provider adapter tests: fake Anthropic and OpenAI servers on 127.0.0.1."""

from tests.fakes.fixtures import anthropic_server, openai_server, refused_url

__all__ = ["anthropic_server", "openai_server", "refused_url"]
