"""SDK exceptions → ``ProviderError`` (shared by the anthropic and openai adapters).

Both official SDKs are generated from the same template, so their exception classes share names and
attributes (``status_code``, ``body``). The mapped error never chains the SDK exception (it holds the
request, headers included) and its message never contains the api key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any, TypeVar

import httpx

from metering.errors import ProviderError
from metering.llm.providers.base import ErrorType
from metering.llm.providers.output_limit import stated_output_limit

C = TypeVar("C")  # an SDK client

httpx2: Any
try:  # the SDKs' own HTTP client (newer SDK versions); plain httpx for older ones
    import httpx2
except ImportError:  # pragma: no cover - depends on the installed SDK version
    httpx2 = None

_HTTP_MODULES: tuple[Any, ...] = (httpx,) if httpx2 is None else (httpx, httpx2)
# Raised by the HTTP client while a streamed body is read (the SDKs do not always wrap them).
STREAM_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls for module in _HTTP_MODULES for cls in (module.TransportError, module.StreamError)
)
# Raised by the SDKs as they are (not wrapped) when a success body, or a streamed event, is not JSON: an empty or cut
# body sent as `application/json`, a proxy's broken event stream.
BODY_DECODE_ERRORS: tuple[type[BaseException], ...] = (json.JSONDecodeError, UnicodeDecodeError)
MAX_MESSAGE_CHARS = 300
MAX_LIMIT_MESSAGE_CHARS = 2000  # of an error's message read for an output limit (the wordings state it early)
# Defence in depth: anything shaped like a provider key is masked too, even if it is not *our* key.
_KEY_SHAPED = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+\S+)")


def scrub(text: str, secret: str | None) -> str:
    """``text`` without the secret (and without anything shaped like a key), bounded in length."""
    if secret:
        text = text.replace(secret, "***")
    text = _KEY_SHAPED.sub("***", text)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def _error(message: str, error_type: ErrorType, provider: str, *, retryable: bool) -> ProviderError:
    return ProviderError(message, error_type=error_type.value, provider=provider, retryable=retryable)


def status_error_type(status: int) -> tuple[ErrorType, bool]:
    """(error_type, retryable) for an HTTP error status."""
    if status == 429:
        return ErrorType.RATE_LIMITED, True
    if status in (401, 402, 403):
        return ErrorType.AUTH, False
    if status == 408:
        return ErrorType.TIMEOUT, True
    if status == 409 or status >= 500:
        return ErrorType.SERVER_ERROR, True
    if 400 <= status < 500:
        return ErrorType.BAD_REQUEST, False
    return ErrorType.UNKNOWN, False


def api_message(body: Any) -> str | None:
    """``error.message`` of a provider error body (both APIs nest it the same way)."""
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return None


def from_sdk_error(exc: BaseException, sdk: ModuleType, *, provider: str, api_key: str | None) -> ProviderError:
    """Map an exception raised while *starting* a call (before any output) to a ``ProviderError``."""
    if isinstance(exc, sdk.APITimeoutError):
        return _error(f"{provider}: request timed out", ErrorType.TIMEOUT, provider, retryable=True)
    if isinstance(exc, sdk.APIConnectionError):
        return _error(f"{provider}: could not connect", ErrorType.CONNECTION, provider, retryable=True)
    if isinstance(exc, sdk.APIStatusError):
        status = int(exc.status_code)
        error_type, retryable = status_error_type(status)
        detail = api_message(exc.body)
        message = f"{provider}: HTTP {status} ({error_type.value})" + (f": {detail}" if detail else "")
        error = _error(scrub(message, api_key), error_type, provider, retryable=retryable)
        if error_type is ErrorType.BAD_REQUEST and detail:
            error.output_limit = stated_output_limit(detail[:MAX_LIMIT_MESSAGE_CHARS])
        return error
    if isinstance(exc, sdk.APIResponseValidationError):
        message = f"{provider}: the response did not match the provider's schema"
        return _error(message, ErrorType.INVALID_RESPONSE, provider, retryable=False)
    if isinstance(exc, BODY_DECODE_ERRORS):
        message = f"{provider}: the response body is not valid JSON"
        return _error(message, ErrorType.INVALID_RESPONSE, provider, retryable=False)
    if isinstance(exc, STREAM_TRANSPORT_ERRORS):
        message = f"{provider}: transport error ({type(exc).__name__})"
        return _error(message, ErrorType.CONNECTION, provider, retryable=True)
    return _error(f"{provider}: call failed ({type(exc).__name__})", ErrorType.UNKNOWN, provider, retryable=False)


def stream_broken(exc: BaseException, *, provider: str, api_key: str | None) -> ProviderError:
    """A stream that failed after it started: whatever the cause, the output is incomplete."""
    kind = "timed out" if "Timeout" in type(exc).__name__ else f"broke ({type(exc).__name__})"
    detail = api_message(getattr(exc, "body", None))
    message = f"{provider}: the response stream {kind}" + (f": {detail}" if detail else "")
    return _error(scrub(message, api_key), ErrorType.STREAM_BROKEN, provider, retryable=True)


def incomplete_stream(provider: str) -> ProviderError:
    message = f"{provider}: the response stream ended before the provider said it was finished"
    return _error(message, ErrorType.STREAM_BROKEN, provider, retryable=True)


def invalid_response(provider: str, what: str) -> ProviderError:
    """A success status whose body is not the API's answer (a proxy's HTML page, some other JSON)."""
    return _error(f"{provider}: {what}", ErrorType.INVALID_RESPONSE, provider, retryable=False)


def missing_key(provider: str) -> ProviderError:
    return _error(f"{provider}: no api key configured", ErrorType.AUTH, provider, retryable=False)


def bad_config(provider: str, message: str) -> ProviderError:
    return _error(f"{provider}: {message}", ErrorType.BAD_REQUEST, provider, retryable=False)


def usable_client(provider: str, client: C | None, problem: str | None, api_key: str | None, keyless: bool) -> C:
    """An adapter's SDK client, or the ProviderError of a configuration no call can be made with: ``problem`` (no
    client was made for it; the key scrubbed from it), or no api key for a keyed provider's own endpoint."""
    if client is None:
        raise bad_config(provider, scrub(str(problem), api_key))
    if keyless:
        raise missing_key(provider)
    return client
