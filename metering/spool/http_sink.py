"""HttpSink: delivers spooled batches to a metering service's ``POST /v1/events``.

A 200 is delivered. A 413 (more events or bytes than the service takes) or the service's own 500 (its problem
document, code ``internal_error``: ingest fails on something in the batch) would be answered again to the same
batch: they raise ``RefusedBatchError``, and the flusher isolates the event at fault (``spool.isolation``: halves
until the parts pass; a single event too large is dead-lettered with the service's reason). Anything else raises
``DeliveryError``, and the flusher keeps the batch and retries it with backoff: a service that is down, slow,
overloaded (429/502/503), misconfigured (401/403/404), or a 500 that is not the service's (a proxy's error page)
loses nothing (a 429 or 503 with ``Retry-After``, seconds or an HTTP date, is retried no sooner than
it asks, up to the flusher's ``max_backoff_s``); so does a 200 that does not account for every event sent (each
inserted, a duplicate, or rejected at its index), which is not the service's answer, and so does a 200 rejecting
events as ``tenant mismatch`` (the token is bound to another tenant: the operator's to fix, as a wrong token is) or
as in the future when they are not by this host's clock (the service's clock is behind: it takes them later).
The endpoint is idempotent on event_id, so a retry after a lost response counts duplicates instead of
double-counting. Each event is sent as its spool line says it (``events.record_of``: the counts added since the
first release only when not 0), so a service that does not know them yet takes every event that does not use them.

Batches are sent gzipped (``Content-Encoding: gzip``, level 1: JSON events shrink several times) unless
``gzip=False``. A service from before it decoded gzip answers 415: the sink then sends the same batch uncompressed
at once, and every later one, so producers can be upgraded before the service.
"""

from __future__ import annotations

import email.utils
import gzip
import os
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime

import httpx
import orjson

from metering.auth.tokens import TENANT_MISMATCH
from metering.billing.ingest import IN_THE_FUTURE, MAX_FUTURE
from metering.events import UsageEvent, record_of
from metering.spool.sink import DeliveryResult, RefusedBatchError


class DeliveryError(Exception):
    """The service did not accept the batch (the flusher retries it later). ``retry_after_s``: how long the service
    asked to be left alone (a 429's or 503's ``Retry-After``), which the flusher waits at least (capped by its
    ``max_backoff_s``)."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header's wait in seconds: delay-seconds, or an HTTP date (0 once past); None without one
    or for one that is neither."""
    if value is None or not (value := value.strip()):
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT (RFC 9110); "-0000" is parsed as naive
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _refused_by_the_service(response: httpx.Response) -> bool:
    """Whether the answer is the service's own 500: its problem document (``application/problem+json``, code
    ``internal_error``), ingest failing on something in the batch. A 500 from anything else (a proxy's or a gateway's
    error page, an empty body) says nothing about the events: it was taken as a refusal, and a proxy flapping
    between 500 and the service while the flusher isolated the event at fault dead-lettered healthy events."""
    if response.status_code != 500:
        return False
    media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/problem+json":
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == 500 and body.get("code") == "internal_error"


class HttpSink:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        client: httpx.Client | None = None,
        gzip: bool = True,
    ) -> None:
        self._url = url.rstrip("/") + "/v1/events"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._timeout_s = timeout_s
        self._client: httpx.Client | None = client or httpx.Client(timeout=timeout_s)
        self.gzip = gzip  # turned off for good by a service that answers 415 to a gzipped batch
        if client is None:  # a client given is the caller's to replace in a forked child
            _OWN_CLIENTS.add(self)

    def _after_fork_in_child(self) -> None:
        """The connections the client keeps open are the parent's: a child posting over one wrote into the parent's
        TCP stream (their requests interleaved, each could read the other's answer). A new client, with none, made at
        the child's first delivery (not at the fork: a child that execs never needs it)."""
        if self._client is not None:
            _INHERITED_CLIENTS.append(self._client)  # never used here, nor closed (collected, it would close them)
        self._client = None

    def __repr__(self) -> str:  # never the token
        return f"HttpSink({self._url!r})"

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        body = orjson.dumps({"events": [record_of(event) for event in events]})
        if self.gzip:
            response = self._post(gzip.compress(body, compresslevel=1, mtime=0), {"Content-Encoding": "gzip"})
            if response.status_code == 415:  # a service that does not decode gzip yet
                self.gzip = False
                response = self._post(body, {})
        else:
            response = self._post(body, {})
        if response.status_code == 413 or _refused_by_the_service(response):
            too_large = response.status_code == 413
            raise RefusedBatchError(
                f"the service refuses {'as too large ' if too_large else ''}({response.status_code}): "
                f"{response.text[:300]}",
                too_large=too_large,
            )
        if response.status_code != 200:
            # a redirect is not followed (the token would go with it, maybe to another host): say where it points
            where = f" (Location: {response.headers['location']})" if "location" in response.headers else ""
            wait = retry_after_s(response.headers.get("retry-after")) if response.status_code in (429, 503) else None
            asked = f" (Retry-After: {response.headers['retry-after']})" if wait is not None else ""
            raise DeliveryError(
                f"POST {self._url} answered {response.status_code}{where}{asked}: {response.text[:300]}",
                retry_after_s=wait,
            )
        try:
            data = response.json()
            rejected = tuple((int(r["index"]), str(r["reason"])) for r in data.get("rejected", []))
            result = DeliveryResult(int(data["inserted"]), int(data["duplicates"]), rejected)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a proxy's page, another service's JSON
            # (its error said "Expecting value: line 1 column 1 (char 0)" or "KeyError: 'inserted'", naming nobody)
            raise DeliveryError(
                f"POST {self._url} answered 200 but not with the service's answer ({type(exc).__name__}: {exc}): "
                f"{response.text[:300]}"
            ) from exc
        accounted = result.inserted + result.duplicates + len({index for index, _ in rejected})
        if accounted != len(events) or any(not 0 <= index < len(events) for index, _ in rejected):
            # the service accounts for each event (inserted, duplicate, or rejected at its index): anything else is
            # not it (a proxy, another service at the URL) and acknowledging the batch would lose its events
            raise DeliveryError(
                f"POST {self._url} answered 200 but does not account for the {len(events)} events sent "
                f"(inserted {result.inserted}, duplicates {result.duplicates}, rejected {len(rejected)}): "
                f"{response.text[:300]}"
            )
        self._raise_for_refusals_to_keep(events, rejected)
        return result

    def _raise_for_refusals_to_keep(self, events: Sequence[UsageEvent], rejected: tuple[tuple[int, str], ...]) -> None:
        """A ``DeliveryError`` (the batch kept and retried) when the service rejects events for a cause outside them,
        and takes them once it is gone: dead-lettered, they left billing until someone redrove them. The batch's other
        events, stored now, count as duplicates then."""
        foreign = sorted({events[index].tenant_id for index, reason in rejected if reason == TENANT_MISMATCH})
        if foreign:  # the token is bound to another tenant: the operator's to fix, as a wrong token (401) is
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise DeliveryError(
                f"POST {self._url} refuses events of tenant {shown} ({TENANT_MISMATCH}): the sink's token is bound "
                "to another tenant; the events are kept and retried: set METERING_SPOOL__HTTP_TOKEN to an ingest "
                "token bound to no tenant (or to theirs)"
            )
        # In the future to the service, not by this host's clock (which wrote them): the service's clock is behind,
        # and takes them once it gets there (one in the future here too is the flusher's: this host's clock stepped
        # back since it wrote them, and it holds them, see spool.held; too far ahead, they are dead-lettered).
        latest = datetime.now(UTC) + MAX_FUTURE
        early = [
            why
            for index, why in rejected
            if why.startswith("occurred_at ") and IN_THE_FUTURE in why and events[index].occurred_at <= latest
        ]  # (the refusal of the event's time, not another reason quoting those words)
        if early:
            minutes = MAX_FUTURE.total_seconds() / 60
            raise DeliveryError(
                f"POST {self._url} refuses {len(early)} event(s) as in the future though they are not by this host's "
                f"clock (the service's clock is behind it by more than {minutes:g} minutes): the events are kept and "
                f"retried until the service's clock gets there; sync the clocks (NTP): {early[0][:200]}"
            )

    def _post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        if self._client is None:  # in a forked child: see _after_fork_in_child
            self._client = httpx.Client(timeout=self._timeout_s)
        try:
            return self._client.post(self._url, content=body, headers={**self._headers, **headers})
        except httpx.HTTPError as exc:
            raise DeliveryError(f"POST {self._url} failed: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


# Sinks with a client of their own, for the child of a fork (a prefork server, a task queue): see
# ``HttpSink._after_fork_in_child``.
_OWN_CLIENTS: weakref.WeakSet[HttpSink] = weakref.WeakSet()
_INHERITED_CLIENTS: list[httpx.Client] = []


def _after_fork_in_child() -> None:
    for sink in list(_OWN_CLIENTS):
        sink._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
