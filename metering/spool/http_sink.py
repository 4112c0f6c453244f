"""HttpSink: delivers spooled batches to a metering service's ``POST /v1/events``.

Anything but a 200 raises, so the flusher keeps the batch and retries it with backoff: a service that is
down, slow, overloaded (429/5xx) or misconfigured (401/403) loses nothing. The endpoint is idempotent on
event_id, so a retry after a lost response counts duplicates instead of double-counting.

A 413 (more events or bytes than the service takes) is not retried as is, since it would never pass: the batch
is split in halves until each part passes, and a single event still refused is rejected (dead-lettered with the
service's reason) so that it cannot hold up the events behind it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import httpx
import orjson

from metering.events import UsageEvent
from metering.spool.sink import DeliveryResult

log = logging.getLogger("metering.spool")


class DeliveryError(Exception):
    """The service did not accept the batch (the flusher retries it later)."""


class HttpSink:
    def __init__(self, url: str, token: str, *, timeout_s: float = 30.0, client: httpx.Client | None = None) -> None:
        self._url = url.rstrip("/") + "/v1/events"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._client = client or httpx.Client(timeout=timeout_s)

    def __repr__(self) -> str:  # never the token
        return f"HttpSink({self._url!r})"

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        body = orjson.dumps({"events": [event.model_dump(mode="json") for event in events]})
        try:
            response = self._client.post(self._url, content=body, headers=self._headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"POST {self._url} failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 413:
            return self._split(events, response)
        if response.status_code != 200:
            detail = response.text[:300]
            raise DeliveryError(f"POST {self._url} answered {response.status_code}: {detail}")
        data = response.json()
        rejected = tuple((int(r["index"]), str(r["reason"])) for r in data.get("rejected", []))
        return DeliveryResult(inserted=int(data["inserted"]), duplicates=int(data["duplicates"]), rejected=rejected)

    def _split(self, events: Sequence[UsageEvent], refused: httpx.Response) -> DeliveryResult:
        if len(events) == 1:
            reason = f"the service refuses this event as too large ({refused.status_code}): {refused.text[:200]}"
            log.warning("spool: %s refused event %s as too large; dead-lettered", self._url, events[0].event_id)
            return DeliveryResult(inserted=0, duplicates=0, rejected=((0, reason),))
        half = len(events) // 2
        first, second = self.deliver(events[:half]), self.deliver(events[half:])
        return DeliveryResult(
            inserted=first.inserted + second.inserted,
            duplicates=first.duplicates + second.duplicates,
            rejected=first.rejected + tuple((index + half, reason) for index, reason in second.rejected),
        )

    def close(self) -> None:
        self._client.close()
