"""The adapter of a BYOLLM target whose stored api key cannot be decrypted: every call fails before it is made.

The operator removed the Fernet key that encrypted the user's key from ``METERING_SECRET_KEYS`` (too early in a
rotation). The call fails as a ``ProviderError`` of type ``secret_error``: its event is recorded (nothing used, not
billed), a warning is logged, and the call raises: it never fails over to the platform LLM, whatever the user's
fallback policy (the operator lost the key, not the user's LLM: a failover would bill the user for it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from metering.errors import ProviderError
from metering.llm.pool import PooledProvider
from metering.llm.providers.base import ErrorType
from metering.llm.resolution import Target
from metering.llm.types import ProviderRequest, ProviderResult, StreamItem

log = logging.getLogger("metering.llm")

MESSAGE = (
    "the user's BYOLLM api key cannot be decrypted with the configured METERING_SECRET_KEYS (the key that encrypted "
    "it was removed): add that key back, or set the user's api key again"
)


class UnreadableKeyProvider:
    """Fails every call with ``secret_error``; holds no client and no key."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _error(self) -> ProviderError:
        log.warning("BYOLLM call of provider %s not made: %s", self.name, MESSAGE)
        return ProviderError(MESSAGE, error_type=ErrorType.SECRET_ERROR.value, provider=self.name)

    async def complete(self, request: ProviderRequest) -> ProviderResult:
        raise self._error()

    async def stream(self, request: ProviderRequest) -> AsyncIterator[StreamItem]:
        raise self._error()
        yield  # pragma: no cover  # an async generator, as the Provider protocol's stream

    async def aclose(self) -> None:
        return None


def unreadable_key_adapter(target: Target) -> PooledProvider:
    """An adapter outside the pool (never cached, never closed: it holds nothing), one per call."""
    config = target.config
    key = (config.provider, config.base_url, None, config.timeout_s, config.max_retries)
    return PooledProvider(key, UnreadableKeyProvider(config.provider))
