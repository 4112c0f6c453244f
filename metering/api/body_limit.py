"""Refuse request bodies above a byte limit with 413 problem+json, before any of it is parsed.

The declared ``Content-Length`` is checked first (nothing is read); a body without one (chunked) is counted
while it is read. The body is buffered (at most the limit) and replayed to the app; a gzip body decoded first, what
it decodes to bounded by the same limit (``content_coding``).

A gzip body of 8 KB decodes to 8 MiB, held until its request is answered: the bytes decoded and not yet answered
are at most ``DECODED_IN_FLIGHT`` times the limit, a request finding no room waiting for it (before, 100 such
requests at once, sent without a token, took a server from 120 MB to 1.8 GB). A body sent as it is was paid for
by its sender's bandwidth and is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metering.api.content_coding import GZIP, decoded_headers, gunzip_bounded, request_coding
from metering.api.problems import problem_response
from metering.errors import MeteringError, PayloadTooLargeError

DECODED_IN_FLIGHT = 4  # request bodies of the limit's size decoded from gzip and not yet answered, at most


class DecodedBytes:
    """Bytes of decoded bodies held, at most ``total``; ``take`` waits for room, first come first served."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, size: int) -> None:
        if not self._waiting and self.held + size <= self.total:
            self.held += size
            return
        waiter = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        try:
            await waiter[1]
        except BaseException:  # cancelled (the client left): its room, if given meanwhile, goes back
            if waiter[1].done() and not waiter[1].cancelled():
                self.give(size)
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)
            self._wake()
            raise

    def give(self, size: int) -> None:
        self.held -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self.held + self._waiting[0][0] <= self.total:
            size, future = self._waiting.popleft()
            if not future.done():
                self.held += size
                future.set_result(None)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.decoded = DecodedBytes(DECODED_IN_FLIGHT * (max_bytes + 1))

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
        held = 0
        if request_coding(Headers(scope=scope)) == GZIP and body:
            held = self.max_bytes + 1  # what it may decode to, until it is decoded
            await self.decoded.take(held)
            try:
                # on the loop: decoded in worker threads, 100 bombs left ~1 GB in their malloc arenas
                body = gunzip_bounded(body, self.max_bytes)
            except MeteringError as error:
                self.decoded.give(held)
                await self._refuse(scope, receive, send, error)
                return
            except BaseException:
                self.decoded.give(held)
                raise
            self.decoded.give(held - len(body))
            held = len(body)
            scope = decoded_headers(scope, body)
        pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            self.decoded.give(held)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: MeteringError | None = None) -> None:
        error = error or PayloadTooLargeError(f"the request body is larger than {self.max_bytes} bytes")
        response = problem_response(error.status, error.code, error.message, instance=scope.get("path"))
        await response(scope, receive, send)
