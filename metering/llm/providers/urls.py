"""Whether a ``base_url`` and an api key are ones the SDKs' HTTP client can send (pure; the HTTP modules are imported
on use)."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit


def base_url_problem(base_url: str) -> str | None:
    """Why the SDKs could not use ``base_url`` (``None`` when they can): a port that is not a number or past 65535,
    a host name that is not valid IDNA. The SDK refuses such a URL when its client is made (``InvalidURL``), or, for a
    port out of range, only when it connects, with an error it does not wrap (an ``ExceptionGroup``): the call failed
    with an internal error (a 500 over HTTP), with no event and no failover to the platform LLM."""
    try:
        urlsplit(base_url).port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:  # "Port out of range 0-65535", "Port could not be cast to integer value", bad IPv6
        return f"base_url is not a valid URL ({exc})"
    for name in ("httpx", "httpx2"):  # the SDKs' HTTP client: httpx2 for newer SDK versions, httpx for older ones
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - depends on the installed SDK version
            continue
        try:
            module.URL(base_url)
        except module.InvalidURL as exc:
            return f"base_url is not a valid URL ({exc})"
    return None


API_KEY_PROBLEM = "an api_key is printable ASCII, without spaces or line breaks (as the provider gave it)"


def api_key_problem(api_key: str) -> str | None:
    """Why an api key cannot go in a request's header (``None`` when it can): a character past ASCII (a key copied
    with a typographic ``…``), a space or a line break (one copied with its newline). Keys are printable ASCII. The
    openai SDK raised ``UnicodeEncodeError`` (an internal error, no failover), and a line break failed every call as
    a connection error, each failing over to the platform LLM: billed to the user, who had set their own."""
    if api_key.isascii() and api_key.isprintable() and " " not in api_key:
        return None
    return API_KEY_PROBLEM


def config_problem(base_url: str | None, api_key: str | None) -> str | None:
    """Why no call can be made with this base_url and api key (``None`` when one can): an adapter then makes no SDK
    client, and each call fails as a ProviderError (its event recorded, a BYOLLM call failing over)."""
    problem = base_url_problem(base_url) if base_url else None
    if problem is None and api_key:
        problem = api_key_problem(api_key)  # a stored key no request can carry
    return problem
