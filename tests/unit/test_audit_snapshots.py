"""The shared audit snapshots read as the API's responses did (the API's entries are unchanged by the move)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from metering import audit_snapshots as snap
from metering.api.admin_schemas import PriceOverrideOut
from metering.api.routers.admin_billing import _credit_out
from metering.billing.credits import TransferResult
from metering.db.models import PriceOverrideRow

T0 = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)


def test_override_snapshot_is_the_api_s_json() -> None:
    row = PriceOverrideRow(
        id="o1", provider="ollama", model_pattern="llama3*", effective_from=T0, effective_to=None,
        input_nanos_per_mtok=150_000_000, output_nanos_per_mtok=20_000_000_000, cache_read_nanos_per_mtok=None,
        cache_write_nanos_per_mtok=7, markup_pct="12.5", note="n", created_at=T0,
    )  # fmt: skip
    assert snap.override_snapshot(row) == PriceOverrideOut.of(row).model_dump(mode="json")
    assert snap.override_snapshot(row)["effective_from"] == "2026-11-01T12:00:00.123456Z"  # type: ignore[index]
    assert snap.override_snapshot(None) is None


def test_credit_snapshot_is_the_api_s_json_less_replayed() -> None:
    result = TransferResult(uuid.uuid4(), "adjustment", "acme", "alice", -1_500_000_000, "k1", None, T0, False)
    assert snap.credit_snapshot(result) == _credit_out(result).model_dump(mode="json", exclude={"replayed"})
    assert snap.credit_action(result) == "adjustment.add"
