"""Request and response bodies of the HTTP API (the OpenAPI document is generated from these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SkipValidation

from metering.billing.ingest import IngestResult
from metering.events import UsageEvent


class EventBatch(BaseModel):
    # Items are documented as UsageEvent but not validated here: ingest validates each one on its own, so one
    # malformed event is rejected with its index and reason and the others still go in.
    events: list[SkipValidation[UsageEvent]] = Field(
        description=(
            "Usage events, at most 5,000 (`METERING_API__MAX_BATCH_EVENTS`). Each is validated on its own: an "
            "invalid one is listed in `rejected` with its index, the others are ingested."
        ),
    )


class RejectedEvent(BaseModel):
    index: int = Field(description="Position of the event in the request's `events`.")
    event_id: str | None = Field(description="Its `event_id`, when it had one.")
    reason: str = Field(description="Why it was rejected, e.g. `tenant mismatch` or a validation message.")


class IngestResponse(BaseModel):
    inserted: int = Field(description="Events stored (and priced, billed, rolled up) by this request.")
    duplicates: int = Field(description="Events already stored, or repeated in this batch: not counted twice.")
    rejected: list[RejectedEvent] = Field(description="Events refused, in request order.")

    @classmethod
    def of(cls, result: IngestResult) -> IngestResponse:
        return cls.model_validate(result.as_dict())


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    database: Literal["ok"] = "ok"
    migrations: Literal["head"] = "head"
    revision: str | None = Field(description="The database's Alembic revision (the head).")
