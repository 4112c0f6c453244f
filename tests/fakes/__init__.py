"""Wire-level fakes of the provider APIs, for end-to-end tests of the adapters with the official SDKs."""

from tests.fakes.anthropic_server import ANTHROPIC_DEFAULT_USAGE, FakeAnthropicServer
from tests.fakes.openai_server import OPENAI_DEFAULT_USAGE, FakeOpenAIServer
from tests.fakes.server import (
    Fail,
    FakeProviderServer,
    Raw,
    RecordedRequest,
    Reply,
    hang,
    rate_limited,
    server_error,
    unauthorized,
    unused_port,
)

__all__ = [
    "ANTHROPIC_DEFAULT_USAGE",
    "OPENAI_DEFAULT_USAGE",
    "Fail",
    "FakeAnthropicServer",
    "FakeOpenAIServer",
    "FakeProviderServer",
    "Raw",
    "RecordedRequest",
    "Reply",
    "hang",
    "rate_limited",
    "server_error",
    "unauthorized",
    "unused_port",
]
