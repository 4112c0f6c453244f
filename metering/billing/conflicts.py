"""Same event id, different content: a replay is a duplicate only if it says what the stored event says.

An event id names one provider call. A client that sends an id again with other tokens, another user or another
tenant is not replaying: it has a bug (or reuses ids), and counting it as a duplicate would hide that the
stored event, not the one just sent, is what gets billed. Such an event is rejected with the fields that
differ, and the stored event stands. Pure: the caller fetches the stored values.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any

from metering.events import UsageEvent

# Everything the producer says about the call (the id itself aside). Billing columns are ingest's, not the event's.
CONTENT_FIELDS: tuple[str, ...] = tuple(name for name in UsageEvent.model_fields if name != "event_id")
content_of = attrgetter(*CONTENT_FIELDS)  # an event's content: a tuple in CONTENT_FIELDS order


def _comparable(name: str, value: Any) -> Any:
    if name == "provider" and isinstance(value, str):
        return value.lower()  # rows stored before providers were lowercased keep the producer's spelling
    if name == "budget_exceeded":
        return sorted(str(flag) for flag in value or ())
    return value


def differing_fields(event: UsageEvent, stored: Sequence[Any]) -> list[str]:
    """The content fields in which ``event`` and a stored event (its values in ``CONTENT_FIELDS`` order) differ."""
    mine = content_of(event)
    if mine == tuple(stored):  # a replay, nearly always: one comparison
        return []
    return [
        name
        for name, a, b in zip(CONTENT_FIELDS, mine, stored, strict=True)
        if _comparable(name, a) != _comparable(name, b)
    ]


def conflict_reason(event: UsageEvent, stored: Sequence[Any]) -> str | None:
    """Why ``event`` is not a replay of the stored event with its id, or None when it is one. Another tenant's
    event is not described: only that the id is taken."""
    fields = differing_fields(event, stored)
    if not fields:
        return None
    if "tenant_id" in fields:
        return "event_id is already used by another stored event: not ingested (the stored event stands)"
    return (
        f"event_id is already stored with different content ({', '.join(fields)}): "
        "not ingested (the stored event stands)"
    )


def repeat_conflict_reason(event: UsageEvent, first: UsageEvent, first_index: int) -> str | None:
    """Why a later item of one batch is not a repeat of the earlier item with its id, or None when it is one."""
    fields = differing_fields(event, content_of(first))
    if not fields:
        return None
    return f"repeats the event_id of item {first_index} with different content ({', '.join(fields)}): not ingested"
