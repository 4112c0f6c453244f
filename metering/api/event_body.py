"""The body of ``POST /v1/events``, parsed and validated in one pass by pydantic-core when the batch is valid.

FastAPI reads a JSON body with ``Request.json()`` (the stdlib's ``json.loads``) and then validates the declared
model, ``EventBatch``, whose items are ``SkipValidation``: ingest validates each event on its own, so that one bad
event is rejected with its index and the others go in. That costs a Python dict per event and a
``UsageEvent.model_validate`` call per event.

``EventsRequest.json`` first validates the whole body as ``{"events": [UsageEvent, ...]}`` with
``model_validate_json`` (parsing and validation in Rust, one pass). When every event is valid, the items handed to
``EventBatch`` (and so to ingest, which takes ``UsageEvent`` objects as they are) are the validated events. In any
other case (an invalid event, an item that is not an object, a body that is not a batch, JSON the Rust parser
refuses but ``json.loads`` accepts, such as a lone surrogate escape) it returns what ``Request.json`` returns, and
everything happens exactly as without this module: the same 400/422 problems, the same per-event rejections.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError

from metering.api.schemas import EventBatch
from metering.events import UsageEvent


class _ValidBatch(BaseModel):
    """The fast path's view of ``EventBatch``: the same body (other keys ignored) with every item validated."""

    events: list[UsageEvent] = Field(fail_fast=True)  # the first invalid event ends the attempt


class EventsRequest(Request):
    """A request whose JSON body, when it is a valid batch, holds validated ``UsageEvent`` items."""

    events_validated = False  # whether json() returned validated events
    _valid_body: bytes | None = None  # the body json() validated

    async def json(self) -> Any:
        body = await self.body()
        try:
            events = _ValidBatch.model_validate_json(body).events
        except ValidationError:
            return await super().json()  # json.loads: its errors, its values, the per-item path
        self.events_validated, self._valid_body = True, body
        return {"events": events}

    def json_events(self) -> list[Any]:
        """The items of a batch that ``json()`` validated, as ``json.loads`` + ``EventBatch`` give them."""
        if self._valid_body is None:
            raise RuntimeError("json_events() is for a body that json() validated")
        return EventBatch.model_validate(json.loads(self._valid_body)).events


def has_foreign_events(items: Sequence[Any], tenant_id: str | None) -> bool:
    """Whether a tenant-bound token sent validated events of another tenant."""
    return tenant_id is not None and any(isinstance(e, UsageEvent) and e.tenant_id != tenant_id for e in items)


class EventsRoute(APIRoute):
    """Routes whose endpoints get an ``EventsRequest`` (FastAPI's custom request class pattern)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(EventsRequest(request.scope, request.receive))

        return handle
