"""Derived usage transfer ids (pure): one per (event, kind), time-ordered, never another transfer's."""

from __future__ import annotations

import uuid

import pytest

from metering.billing.ledger import TransferKind, transfer_id, usage_transfer_hex, usage_transfer_id
from metering.events import uuid7

CHARGE, COST = TransferKind.USAGE_CHARGE, TransferKind.PROVIDER_COST


def test_each_event_and_kind_has_its_own_id_in_event_order() -> None:
    events = [uuid7() for _ in range(2000)]
    charges = [usage_transfer_id(e, CHARGE) for e in events]
    costs = [usage_transfer_id(e, COST) for e in events]
    assert len(set(charges) | set(costs)) == 4000
    assert sorted(charges, key=lambda u: u.bytes[:8]) == charges  # the events' time order
    for event, charge, cost in zip(events, charges, costs, strict=True):
        assert charge.hex[12] == cost.hex[12] == "8"  # version nibble 8 (UUIDv8)
        assert charge.hex[:12] == cost.hex[:12] == event.hex[:12]
        assert int(charge.hex[16], 16) >> 2 == 0b10 and int(cost.hex[16], 16) >> 2 == 0b11
        assert usage_transfer_id(event, CHARGE) == charge  # derived: the same every time


def test_ids_never_meet_keyed_transfer_ids() -> None:
    keyed = transfer_id("some-key", TransferKind.CREDIT)
    assert keyed.version == 5 and keyed != usage_transfer_id(uuid7(), CHARGE)


def test_only_usage_kinds_of_uuid7_events_have_usage_ids() -> None:
    with pytest.raises(ValueError, match="UUIDv7"):
        usage_transfer_hex(uuid.uuid4().hex, CHARGE)
    with pytest.raises(ValueError, match="usage transfer kind"):
        usage_transfer_hex(uuid7().hex, TransferKind.CREDIT)
