"""Request bodies sent with a content coding: ``gzip`` is decoded, any other coding is refused with 415.

``ContentCodingMiddleware`` (outermost) refuses a body whose ``Content-Encoding`` names a coding other than
``identity`` and ``gzip`` (``br``, ``deflate``, ``gzip`` twice: RFC 9110, 15.5.16) before anything is read.
``BodyLimitMiddleware`` then counts the body as sent against the limit and, for ``gzip``, decodes it with
``gunzip_bounded``: what it decodes to counts against the same limit (a small body that inflates to gigabytes is a
413 as soon as it passes the limit, never held in memory), and a body that is not gzip is a 400. The app sees the
decoded body, without the ``Content-Encoding`` header.
"""

from __future__ import annotations

import zlib

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from metering.api.problems import problem_response
from metering.errors import BadRequestError, PayloadTooLargeError

IDENTITY = "identity"
GZIP = "gzip"
_GZIP_NAMES = frozenset({GZIP, "x-gzip"})  # RFC 9110 8.4.1.3: x-gzip is gzip
_FIRST_FEED = 256  # bytes of a member given to its decoder at first, doubling up to _MAX_FEED
_MAX_FEED = 64 * 1024


class InvalidContentCodingError(BadRequestError):
    code = "invalid_content_coding"


def coding_of(content_encoding: str | None) -> str | None:
    """``None`` for a body sent as it is, ``"gzip"`` for one gzipped once, else the codings named (unsupported)."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    named = [c for c in codings if c and c != IDENTITY]
    if not named:
        return None
    if len(named) == 1 and named[0] in _GZIP_NAMES:
        return GZIP
    return ", ".join(named)


def request_coding(headers: Headers) -> str | None:
    """``coding_of`` the request's ``Content-Encoding``, all its header lines read as one list (RFC 9110 5.3): the
    first line alone let ``gzip`` then ``br`` pass as gzip."""
    return coding_of(", ".join(headers.getlist("content-encoding")))


def gunzip_bounded(data: bytes, max_bytes: int) -> bytes:
    """``data`` (one or more gzip members) decoded, refused past ``max_bytes`` decoded (413) or when it is not
    whole gzip (400); never more than ``max_bytes + 1`` bytes are inflated.

    Each member's decoder is fed the body in pieces (256 bytes, doubling to 64 KiB), never the whole rest of it:
    zlib copies what follows a member's end into ``unused_data``, so feeding the rest made a body of many tiny
    members (20 bytes each, nothing decoded) quadratic; the time is now linear in the body."""
    out: list[bytes] = []
    size = 0
    view = memoryview(data)
    start = 0
    while True:
        decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        position, feed = start, _FIRST_FEED
        while True:
            piece = view[position : position + feed]
            position += len(piece)
            feed = min(feed * 2, _MAX_FEED)
            try:
                chunk = decoder.decompress(piece, max_bytes + 1 - size)
            except zlib.error:
                raise InvalidContentCodingError("the request body is not valid gzip (Content-Encoding: gzip)") from None
            size += len(chunk)
            if size > max_bytes or decoder.unconsumed_tail:
                raise PayloadTooLargeError(f"the request body is larger than {max_bytes} bytes once decompressed")
            out.append(chunk)
            if decoder.eof:
                break
            if position >= len(data):
                raise InvalidContentCodingError("the request body is cut off gzip (Content-Encoding: gzip)")
        start = position - len(decoder.unused_data)
        if start >= len(data):
            return b"".join(out)


def decoded_headers(scope: Scope, body: bytes) -> Scope:
    """``scope`` for a decoded body: no ``Content-Encoding``, its ``Content-Length``."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-encoding", b"content-length")]
    return {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}


class ContentCodingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        coding = None
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            has_body = "transfer-encoding" in headers or headers.get("content-length", "0").strip() not in ("", "0")
            coding = request_coding(headers) if has_body else None
        if coding is None or coding == GZIP:  # no body (a GET with the header is harmless), one as it is, or gzip
            await self.app(scope, receive, send)
            return
        detail = f"the request body must be sent uncompressed or gzip: Content-Encoding {coding!r} is not supported"
        response = problem_response(415, "unsupported_media_type", detail, instance=scope.get("path"))
        await response(scope, receive, send)
