"""Routes whose endpoints get a request of a class of their own (FastAPI's custom request class pattern): the events
route (``event_body``) and the money routes (``exact_json``) read their JSON bodies their own way."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from fastapi import Request, Response
from fastapi.routing import APIRoute


class RequestClassRoute(APIRoute):
    """Its endpoints get a ``request_class`` instead of Starlette's ``Request`` (subclasses say which)."""

    request_class: ClassVar[type[Request]] = Request

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler, request_class = super().get_route_handler(), self.request_class

        async def handle(request: Request) -> Response:
            return await handler(request_class(request.scope, request.receive))

        return handle
