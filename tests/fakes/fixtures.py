"""Pytest fixtures for the fake provider servers (exposed by tests/integration/providers/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.anthropic_server import FakeAnthropicServer
from tests.fakes.openai_server import FakeOpenAIServer
from tests.fakes.server import unused_port


@pytest.fixture
def anthropic_server() -> Iterator[FakeAnthropicServer]:
    server = FakeAnthropicServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def refused_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{unused_port()}"
