"""POST /v1/events: usage events in, idempotently (the spool's HTTP sink and other producers)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from metering.api.deps import AppSettings, DbSession, Ingester
from metering.api.event_body import EventsRequest, EventsRoute, has_foreign_events
from metering.api.problems import problem_responses
from metering.api.schemas import EventBatch, IngestResponse
from metering.api.tenancy import ingest_as
from metering.errors import TooManyEventsError
from metering.metrics import metrics_for

router = APIRouter(tags=["events"], route_class=EventsRoute)  # a valid batch is validated in one pass


@router.post(
    "/events",
    summary="Ingest a batch of usage events",
    description=(
        "Requires the `ingest` scope. One request is one transaction: events are stored, priced, posted to the "
        "ledger and rolled up exactly once (idempotent on `event_id`: a replay counts as `duplicates`). Each "
        "event is validated on its own; an invalid one, or one of another tenant when the token is bound to a "
        "tenant, is listed in `rejected` with its index and the others are ingested."
    ),
    responses=problem_responses(401, 403, 413, 422, 503),
)
def post_events(
    request: EventsRequest, batch: EventBatch, principal: Ingester, session: DbSession, settings: AppSettings
) -> IngestResponse:
    items: list[Any] = batch.events  # validated UsageEvents when the whole batch is valid, else the JSON items
    limit = settings.api.max_batch_events
    if len(items) > limit:
        raise TooManyEventsError(
            f"a batch holds at most {limit} events and this one has {len(items)}: send it in smaller batches"
        )
    if has_foreign_events(items, principal.tenant_id):
        items = request.json_events()  # `tenant mismatch` reports each event_id as sent: the per-item path
    result = ingest_as(session, principal, items, markup_pct=settings.billing.markup_pct)
    metrics_for(request.app.state).count_after_commit(session, result)  # metering_ingest_events_total
    return IngestResponse.of(result)
