"""Data for the read-side API tests: events of two tenants ingested over several hours, days and two months,
with billed, BYOLLM, unpriced and failed calls; credits; expectations computed from the stored raw events."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from metering.billing.credits import add_credit
from metering.billing.ingest import ingest
from metering.billing.rollup import latency_us
from metering.db.models import UsageEventRow
from metering.events import event_from_record
from tests.fakes.events import record

ALPHA, BETA = "tenant-alpha", "tenant-beta"
MARKUP = Decimal(20)
T0 = datetime(2026, 9, 29, 21, 0, tzinfo=UTC)  # the events run into October: two billing periods
MODELS = (("anthropic", "claude-sonnet-4-6"), ("openai", "gpt-4o"), ("anthropic", "mystery-model-1"))


def seed(session_factory: sessionmaker[Session], n: int = 90) -> list[dict[str, Any]]:
    """Ingest ``n`` events in batches of 10 (each batch's transfers share a created_at); returns the records."""
    records = []
    for i in range(n):
        provider, model = MODELS[i % 3 if i % 11 else 2]
        records.append(
            record(
                i,
                tenant_id=ALPHA if i % 2 == 0 else BETA,
                user_id=f"user-{i % 3}",
                occurred_at=T0 + timedelta(minutes=37 * i + i % 7),
                provider=provider,
                model=model,
                extension_id="rewrite" if i % 4 else "summarize",
                function="rewrite" if i % 6 else "shorten",
                purpose="content_rewrite" if i % 5 else "summary",
                is_byollm=i % 5 == 0,
                status="error" if i % 13 == 0 else "ok",
                error_type="rate_limit" if i % 13 == 0 else None,
                input_tokens=1000 + 17 * i,
                output_tokens=200 + 3 * i,
                cache_read_tokens=(i % 4) * 50,
                cache_write_tokens=(i % 3) * 10,
                reasoning_tokens=i % 6,
                latency_ms=10 + (i % 9) * 1.25,
            )
        )
    with session_factory() as session:
        for start in range(0, n, 10):
            batch = records[start : start + 10]
            now = max(r["occurred_at"] for r in batch) + timedelta(minutes=1)
            ingest(session, [event_from_record(r) for r in batch], markup_pct=MARKUP, now=now)
        for tenant in (ALPHA, BETA):
            add_credit(
                session,
                tenant_id=tenant,
                user_id="user-1",
                amount=Decimal("5.25"),
                idempotency_key=f"topup-{tenant}",
                now=T0 + timedelta(days=1),
            )
        session.commit()
    return records


def stored_events(session_factory: sessionmaker[Session]) -> list[UsageEventRow]:
    with session_factory() as session:
        return list(session.scalars(select(UsageEventRow)))


def _sums(events: list[UsageEventRow]) -> dict[str, Any]:
    calls = len(events)
    latency = sum(latency_us(e.latency_ms) for e in events)
    billed = sum(e.charge_nanos for e in events)
    return {
        "calls": calls,
        "input_tokens": sum(e.input_tokens for e in events),
        "output_tokens": sum(e.output_tokens for e in events),
        "cache_read_tokens": sum(e.cache_read_tokens for e in events),
        "cache_write_tokens": sum(e.cache_write_tokens for e in events),
        "reasoning_tokens": sum(e.reasoning_tokens for e in events),
        "billed_nanos": billed,
        "billed_usd": format(Decimal(billed).scaleb(-9), "f"),
        "shadow_nanos": sum(e.shadow_nanos for e in events),
        "cost_nanos": sum(e.cost_nanos for e in events),
        "errors": sum(e.status == "error" for e in events),
        "unpriced": sum(e.billing_status == "unpriced" for e in events),
        "avg_latency_ms": round(latency / calls / 1000, 3) if calls else None,
    }


KEYS: dict[str, Callable[[UsageEventRow], Any]] = {
    "tenant_id": lambda e: e.tenant_id,
    "user_id": lambda e: e.user_id,
    "extension_id": lambda e: e.extension_id,
    "function": lambda e: e.function,
    "purpose": lambda e: e.purpose,
    "provider": lambda e: e.provider,
    "model": lambda e: e.model,
    "byollm": lambda e: e.is_byollm,
    "status": lambda e: e.status,
    "hour": lambda e: e.occurred_at.replace(minute=0, second=0, microsecond=0).isoformat().replace("+00:00", "Z"),
    "day": lambda e: e.occurred_at.date().isoformat(),
}


def expected_rows(events: Iterable[UsageEventRow], fields: list[str]) -> list[dict[str, Any]]:
    """What /v1/usage should answer for these events grouped by ``fields`` (result field names), in order."""
    groups: dict[tuple[Any, ...], list[UsageEventRow]] = defaultdict(list)
    for e in events:
        groups[tuple(KEYS[f](e) for f in fields)].append(e)
    return [dict(zip(fields, key, strict=True)) | _sums(groups[key]) for key in sorted(groups)]


def total(events: list[UsageEventRow]) -> dict[str, Any]:
    return _sums(events)


def comparable(row: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """A response row reduced to the expected keys (hours normalised to ...Z)."""
    out = {f: row[f] for f in fields}
    if "hour" in out:
        out["hour"] = datetime.fromisoformat(out["hour"]).astimezone(UTC).isoformat().replace("+00:00", "Z")
    for key in _sums([]):
        out[key] = row[key]
    return out
