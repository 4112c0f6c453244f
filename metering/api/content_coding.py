"""Refuse a request body sent with a content coding (``Content-Encoding: gzip``, ``br``, ...) with 415 problem+json.

Bodies are read as they are sent: nothing decodes them. A gzipped batch of events was answered 422 "the body is not
valid JSON (UTF-8)", and a body that only said it was gzipped was read as plain JSON and ingested. Both are now
refused before anything is read (RFC 9110, 15.5.16: a content coding the server does not accept is a 415).
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from metering.api.problems import problem_response

IDENTITY = "identity"


def unsupported_coding(content_encoding: str | None) -> str | None:
    """The content coding of a body that is not sent as it is (``identity``), else None."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    named = [c for c in codings if c and c != IDENTITY]
    return ", ".join(named) or None


class ContentCodingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        coding = None
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            has_body = "transfer-encoding" in headers or headers.get("content-length", "0").strip() not in ("", "0")
            coding = unsupported_coding(headers.get("content-encoding")) if has_body else None
        if coding is None:  # no body (a GET with the header is harmless), or one sent as it is
            await self.app(scope, receive, send)
            return
        detail = f"the request body must be sent uncompressed: Content-Encoding {coding!r} is not supported"
        response = problem_response(415, "unsupported_media_type", detail, instance=scope.get("path"))
        await response(scope, receive, send)
