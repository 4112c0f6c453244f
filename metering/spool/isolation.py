"""Poison isolation: a batch the sink refuses because of one of its events must not hold up the others for good.

A sink raises ``RefusedBatchError`` when it refuses a batch as it is and would refuse it again (the service
answers 413 or its own 500, the database raises a data or integrity error, ingest hits a bug on some value); any
other error means the sink is unavailable, and the flusher retries the batch later, as it is.

``deliver_isolating`` then splits the refused batch in halves until the parts pass. An event refused on its own
is rejected (dead-lettered with the reason: ``metering spool redrive`` puts it back once the cause is fixed)
only if its refusal is its own: it is too large (413), or some other part of the batch was delivered (or, when
every part is refused, the events that follow the batch in its slot: the flusher tries them), and it is refused
``ATTEMPTS`` times in a row. When
every part is refused, the error propagates; the flusher then tries the events that follow the batch in its
slot: if the sink takes them, the batch's refusals are its events' own (a batch of one, or bad events at the end
of a segment) and they are dead-lettered; if not (a broken service or schema), or nothing follows yet (then
nothing is held up), the whole batch is retried later, nothing dead-lettered. Parts delivered before an error are
delivered again with the batch; the sink is idempotent on event_id, so they count as duplicates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from metering.events import UsageEvent
from metering.spool.sink import DeliveryResult, RefusedBatchError, Sink

log = logging.getLogger("metering.spool")

MAX_REASON = 500
ATTEMPTS = 3  # an event refused on its own is tried this many times before it is dead-lettered


class _Isolation:
    def __init__(self, sink: Sink, *, sink_healthy: bool) -> None:
        self.sink = sink
        # Some part of the batch (or, sink_healthy, what follows it) was delivered: a refusal that remains is its
        # event's own.
        self.passed = sink_healthy

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        try:
            result = self.sink.deliver(events)
        except RefusedBatchError as exc:
            if len(events) > 1:
                return self._split(events)
            if not (exc.too_large or self.passed):
                raise
            for _ in range(ATTEMPTS - 1):  # a refusal that passes on a retry (a race) is not the event's fault
                try:
                    result = self.sink.deliver(events)
                except RefusedBatchError as again:
                    exc = again
                else:
                    self.passed = True
                    return result
            log.warning("spool: the sink refuses event %s on its own; dead-lettered: %s", events[0].event_id, exc)
            return DeliveryResult(inserted=0, duplicates=0, rejected=((0, str(exc)[:MAX_REASON]),))
        self.passed = True
        return result

    def _split(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        half = len(events) // 2
        results: dict[int, DeliveryResult] = {}
        refused: list[tuple[int, Sequence[UsageEvent], RefusedBatchError]] = []
        for offset, part in ((0, events[:half]), (half, events[half:])):
            try:
                results[offset] = self.deliver(part)
            except RefusedBatchError as exc:
                refused.append((offset, part, exc))
        for offset, part, refusal in refused:
            if not self.passed:  # nothing of the batch passes: not one event's fault
                raise refusal
            results[offset] = self.deliver(part)  # again, now that its refusals are known to be its own
        return DeliveryResult(
            inserted=sum(r.inserted for r in results.values()),
            duplicates=sum(r.duplicates for r in results.values()),
            rejected=tuple((offset + i, reason) for offset, r in sorted(results.items()) for i, reason in r.rejected),
        )


def deliver_isolating(sink: Sink, events: Sequence[UsageEvent], *, sink_healthy: bool = False) -> DeliveryResult:
    """``sink.deliver(events)``, isolating the events it refuses (see the module docstring). ``sink_healthy``:
    the sink took other events meanwhile (the flusher tried those that follow), so refusals are the events' own."""
    return _Isolation(sink, sink_healthy=sink_healthy).deliver(events)
