"""Poison isolation (pure logic, against an in-memory sink): a batch refused because of one event delivers the
others and dead-letters that one; a refusal of everything dead-letters nothing."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from metering.events import UsageEvent, event_from_record
from metering.spool.http_sink import DeliveryError
from metering.spool.isolation import deliver_isolating
from metering.spool.sink import DeliveryResult, RefusedBatchError
from tests.fakes.events import record

EVENTS = [event_from_record(record(i)) for i in range(100)]


class Sink:
    """Stores events idempotently; refuses any batch holding a poisoned event (or everything, or too large)."""

    def __init__(self, poison: set[int] = frozenset(), *, everything: bool = False, too_large: bool = False) -> None:
        self.poison = {EVENTS[i].event_id for i in poison}
        self.everything = everything
        self.too_large = too_large
        self.stored: set[object] = set()
        self.calls = 0
        self.down_after: int | None = None

    def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
        self.calls += 1
        if self.down_after is not None and self.calls > self.down_after:
            raise DeliveryError("connection refused")
        if self.everything or any(e.event_id in self.poison for e in events):
            raise RefusedBatchError("DataError: value too long", too_large=self.too_large)
        new = {e.event_id for e in events} - self.stored
        self.stored |= new
        return DeliveryResult(inserted=len(new), duplicates=len(events) - len(new))


@pytest.mark.parametrize("poison", [{0}, {37}, {99}, {3, 4}, {0, 99}, {10, 50, 90}])
def test_the_poisoned_events_alone_are_rejected_and_the_rest_delivered(poison: set[int]) -> None:
    sink = Sink(poison)
    result = deliver_isolating(sink, EVENTS)
    assert sink.stored == {e.event_id for i, e in enumerate(EVENTS) if i not in poison}
    assert result.inserted == 100 - len(poison) and result.duplicates == 0
    assert [index for index, _ in result.rejected] == sorted(poison)
    assert all("DataError: value too long" in reason for _, reason in result.rejected)
    assert sink.calls < 60  # halves, not one event at a time


def test_a_batch_refused_whole_is_retried_later_and_nothing_is_dead_lettered() -> None:
    sink = Sink(everything=True)
    with pytest.raises(RefusedBatchError):
        deliver_isolating(sink, EVENTS)
    assert sink.stored == set()


def test_a_lone_event_is_dead_lettered_only_when_its_refusal_is_its_own() -> None:
    with pytest.raises(RefusedBatchError):  # nothing else to tell it from a broken service
        deliver_isolating(Sink({0}), EVENTS[:1])
    result = deliver_isolating(Sink({0}, too_large=True), EVENTS[:1])  # its own size
    assert result.rejected and result.rejected[0][0] == 0 and result.inserted == 0


def test_an_outage_during_isolation_propagates_and_what_passed_counts_as_duplicates_on_retry() -> None:
    sink = Sink({80})
    sink.down_after = 2  # the batch, its first half, then the service goes down
    with pytest.raises(DeliveryError):
        deliver_isolating(sink, EVENTS)
    assert len(sink.stored) == 50
    sink.down_after = None
    result = deliver_isolating(sink, EVENTS)
    assert (result.inserted, result.duplicates, [i for i, _ in result.rejected]) == (49, 50, [80])


def test_an_event_refused_once_then_taken_is_not_dead_lettered() -> None:
    class Flaky(Sink):
        def deliver(self, events: Sequence[UsageEvent]) -> DeliveryResult:
            if len(events) == 1 and events[0].event_id in self.poison:
                self.poison.clear()  # refused once (e.g. a race), then taken
                raise RefusedBatchError("IntegrityError: duplicate key")
            return super().deliver(events)

    sink = Flaky({5})
    result = deliver_isolating(sink, EVENTS[:10])
    assert (result.inserted, result.rejected) == (10, ())
