"""HttpSink: delivers spooled batches to a metering service's ``POST /v1/events``.

A 200 is delivered. A 413 (more events or bytes than the service takes) or a 500 (the service fails on
something in the batch) would be answered again to the same batch: they raise ``RefusedBatchError``, and the
flusher isolates the event at fault (``spool.isolation``: halves until the parts pass; a single event too large
is dead-lettered with the service's reason). Anything else raises ``DeliveryError``, and the flusher keeps the
batch and retries it with backoff: a service that is down, slow, overloaded (429/502/503) or misconfigured
(401/403/404) loses nothing. The endpoint is idempotent on event_id, so a retry after a lost response counts
duplicates instead of double-counting. Each event is sent as its spool line says it (``events.record_of``: the
counts added since the first release only when not 0), so a service that does not know them yet takes every
event that does not use them.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx
import orjson

from metering.events import UsageEvent, record_of
from metering.spool.sink import DeliveryResult, RefusedBatchError


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
        body = orjson.dumps({"events": [record_of(event) for event in events]})
        try:
            response = self._client.post(self._url, content=body, headers=self._headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"POST {self._url} failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code in (413, 500):
            too_large = response.status_code == 413
            raise RefusedBatchError(
                f"the service refuses {'as too large ' if too_large else ''}({response.status_code}): "
                f"{response.text[:300]}",
                too_large=too_large,
            )
        if response.status_code != 200:
            detail = response.text[:300]
            raise DeliveryError(f"POST {self._url} answered {response.status_code}: {detail}")
        data = response.json()
        rejected = tuple((int(r["index"]), str(r["reason"])) for r in data.get("rejected", []))
        return DeliveryResult(inserted=int(data["inserted"]), duplicates=int(data["duplicates"]), rejected=rejected)

    def close(self) -> None:
        self._client.close()
