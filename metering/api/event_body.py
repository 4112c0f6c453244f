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
everything happens exactly as without this module: the same 400/422 problems, the same per-event rejections. Only
an integer of more digits than Python reads (4,300), which ``json.loads`` refuses, is read as a ``HugeInt`` instead,
so that its event is rejected alone.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field, ValidationError

from metering.api.request_route import RequestClassRoute
from metering.api.schemas import EventBatch
from metering.events import UsageEvent


class _ValidBatch(BaseModel):
    """The fast path's view of ``EventBatch``: the same body (other keys ignored) with every item validated."""

    events: list[UsageEvent] = Field(fail_fast=True)  # the first invalid event ends the attempt


class HugeInt(int):
    """An integer of more digits than Python converts from text: ``json.loads`` refused the whole body for it (a 422
    "not valid JSON"), where its event alone is wrong. Beyond every bound of an event, so the event is rejected; its
    text is a description (``str`` of such an int raises ValueError, e.g. quoting it as a rejected event_id)."""

    def __repr__(self) -> str:
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"

    __str__ = __repr__


_HUGE = 10**5000


def _int_or_huge(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return HugeInt(-_HUGE if text.startswith("-") else _HUGE)


class EventsRequest(Request):
    """A request whose JSON body, when it is a valid batch, holds validated ``UsageEvent`` items."""

    events_validated = False  # whether json() returned validated events
    _valid_body: bytes | None = None  # the body json() validated

    async def json(self) -> Any:
        body = await self.body()
        try:
            events = _ValidBatch.model_validate_json(body).events
        except ValidationError:
            try:
                return await super().json()  # json.loads: its errors, its values, the per-item path
            except ValueError as exc:
                if type(exc) is not ValueError:  # not JSON, not UTF-8 (JSONDecodeError, UnicodeDecodeError)
                    raise
                # An integer of more digits than Python reads (4,300): valid JSON, refused by its event's bounds
                return json.loads(body, parse_int=_int_or_huge)
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


class EventsRoute(RequestClassRoute):
    """Routes whose endpoints get an ``EventsRequest`` (FastAPI's custom request class pattern)."""

    request_class = EventsRequest
