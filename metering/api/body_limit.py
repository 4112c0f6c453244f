"""Refuse request bodies above a byte limit with 413 problem+json, before any of it is parsed.

The declared ``Content-Length`` is checked first (nothing is read); a body without one (chunked) is counted
while it is read. The body is buffered (at most the limit) and replayed to the app; a gzip body decoded first, what
it decodes to bounded by the same limit (``content_coding``).
"""

from __future__ import annotations

import anyio.to_thread
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metering.api.content_coding import GZIP, decoded_headers, gunzip_bounded, request_coding
from metering.api.problems import problem_response
from metering.errors import MeteringError, PayloadTooLargeError


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client left mid-body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if request_coding(Headers(scope=scope)) == GZIP and body:
            try:
                body = await anyio.to_thread.run_sync(gunzip_bounded, body, self.max_bytes)  # not on the loop
            except MeteringError as error:
                await self._refuse(scope, receive, send, error)
                return
            scope = decoded_headers(scope, body)
        pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: MeteringError | None = None) -> None:
        error = error or PayloadTooLargeError(f"the request body is larger than {self.max_bytes} bytes")
        response = problem_response(error.status, error.code, error.message, instance=scope.get("path"))
        await response(scope, receive, send)
