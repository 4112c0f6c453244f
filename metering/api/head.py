"""``HEAD`` on every path served by ``GET``: the GET is run (same authentication, tenancy, status and headers) and
its body is not sent. FastAPI's routes register only the methods they are declared with, so monitors and
``curl -I`` got 405 everywhere; the OpenAPI document still lists the GET operations only.

A streamed answer (the ledger CSV export) is stopped after its first chunk: the app is told the client left, so the
export's query and pooled connection end at once instead of running to the end for nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import anyio
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_DISCONNECT: Message = {"type": "http.disconnect"}


def serves_get(routes: Iterable[BaseRoute], scope: Scope) -> bool:
    """Whether some route takes a GET of this request's path."""
    as_get = {**scope, "method": "GET"}
    return any(route.matches(as_get)[0] is Match.FULL for route in routes)


class HeadMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        app = scope.get("app")
        if app is not None and serves_get(app.router.routes, scope):
            # ASGI 2.3: a streamed response listens for the disconnect ``receive_until_sent`` reports (from 2.4 on,
            # Starlette waits for a failed send instead, and would stream to the end).
            scope = {**scope, "method": "GET", "asgi": {**scope.get("asgi", {}), "spec_version": "2.3"}}
        sent = anyio.Event()

        async def send_headers_only(message: Message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
            elif not sent.is_set():
                sent.set()
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def receive_until_sent() -> Message:
            if sent.is_set():
                return _DISCONNECT
            received: Message = _DISCONNECT
            async with anyio.create_task_group() as group:

                async def from_client() -> None:
                    nonlocal received
                    received = await receive()
                    group.cancel_scope.cancel()

                async def until_sent() -> None:
                    await sent.wait()
                    group.cancel_scope.cancel()

                group.start_soon(from_client)
                group.start_soon(until_sent)
            return received

        await self.app(scope, receive_until_sent, send_headers_only)
