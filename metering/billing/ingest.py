"""Ingest: a batch of usage events becomes stored events, prices, ledger transfers and rollups, exactly once.

One call = one batch = one transaction (the caller commits). Per event: validate (a bad event is rejected
with its index and reason, the rest go on), skip event ids already stored, price (rate cards, else
genai-prices / overrides exactly), apply Policy A, assign the invoice period (late events of a finalized
period go to the next open one), then for the events this call actually inserted: post the charge and
the provider cost (transfer ids derived from the event id), update cached balances, the hourly rollups and the
coarse rollups. SQLite builds those rows here (``usage_transfer_rows``, ``fold_priced``); PostgreSQL prices the
new events as their COPY streams and derives the rest on the server in one statement (``batch_sql``).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from psycopg.types.json import Json
from pydantic import ValidationError

from metering.billing import store
from metering.billing.conflicts import conflict_reason, repeat_conflict_reason
from metering.billing.invoice_store import lock_billing_periods
from metering.billing.ledger import (
    CURRENCY,
    REVENUE,
    Account,
    TransferKind,
    provider_cost,
    provider_payable,
    usage_transfer_hex,
    user_wallet,
    wallet_id,
)
from metering.billing.periods import billing_period, period_of
from metering.billing.policy import BillingStatus, Decision, decide
from metering.billing.pricing import over_call_limit
from metering.billing.rates import RateCards
from metering.billing.rollup import COUNTER_COLUMNS, RollupKey, hour_of, latency_us, names_too_wide
from metering.events import Status, UsageEvent, event_from_record, shown, validation_reason

MAX_FUTURE = timedelta(minutes=5)
IN_THE_FUTURE = "is in the future"  # the words of the reason for an event past now + MAX_FUTURE (see spool.http_sink)
CHARGE, COST = TransferKind.USAGE_CHARGE.value, TransferKind.PROVIDER_COST.value
EARLIEST = datetime(2020, 1, 1, tzinfo=UTC)

_ROW_COLUMNS = (
    "event_id",
    "schema_version",
    "occurred_at",
    "ingested_at",
    "tenant_id",
    "user_id",
    "extension_id",
    "function",
    "action_type",
    "invocation_id",
    "call_index",
    "purpose",
    "provider",
    "model",
    "is_byollm",
    "is_failover",
    "is_stream",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "web_searches",
    "usage_completeness",
    "max_tokens",
    "stop_reason",
    "latency_ms",
    "time_to_first_token_ms",
    "status",
    "error_type",
    "prompt_fingerprint",
    "budget_exceeded",
    "ingest_batch",
    "billing_status",
    "charge_nanos",
    "cost_nanos",
    "shadow_nanos",
    "markup_pct",
    "price_source",
    "price_version",
    "invoice_period",
    "is_late",
)
if len(COUNTER_COLUMNS) != 14:  # fold_priced writes counters in this order
    raise RuntimeError("rollup counters changed: update metering.billing.ingest.fold_priced")
if store.EVENT_COLUMNS != _ROW_COLUMNS:  # _row writes values in this order
    raise RuntimeError("usage_events columns changed: update metering.billing.ingest._row")


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    event_id: str | None
    reason: str


@dataclass(slots=True)
class IngestResult:
    inserted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "inserted": self.inserted,
            "duplicates": self.duplicates,
            "rejected": [{"index": r.index, "event_id": r.event_id, "reason": r.reason} for r in self.rejected],
        }


@dataclass(frozen=True, slots=True)
class Priced:
    event: UsageEvent
    decision: Decision
    markup: str | None
    source: str | None
    version: str | None
    period: str | None
    late: bool


def _event_id_of(item: Any) -> str | None:
    value = item.get("event_id") if isinstance(item, Mapping) else getattr(item, "event_id", None)
    return None if value is None else shown(value)


def _json_kind(item: Any) -> str:
    """What an item that is not an object is, in JSON's words (the reasons said "not NoneType", "not list")."""
    if item is None:
        return "null"
    if isinstance(item, bool):
        return "a boolean"
    if isinstance(item, int | float):
        return "a number"
    if isinstance(item, str):
        return "a string"
    return "an array" if isinstance(item, list | tuple) else type(item).__name__


Variants = dict[uuid.UUID, list[tuple[int, UsageEvent]]]


def validate(
    items: Sequence[UsageEvent | Mapping[str, Any]], now: datetime, indexes: Sequence[int] | None = None
) -> tuple[list[UsageEvent], list[Rejection], dict[uuid.UUID, list[int]], dict[uuid.UUID, int], Variants]:
    """Valid, batch-unique events; rejections with their index; the indexes of the items that repeated an
    earlier valid item (same event_id and content: counted as duplicates), by event_id; the index of each valid
    event's item; the items with an earlier item's event_id but other content (index, event), by event_id.
    Those are rejected here; ingest counts one as a duplicate after all if it is what is stored under its id
    (the earlier item being the one that differs). ``indexes``: each item's index as the caller numbers them
    (its position in the request), by default its position in ``items``; every index, reasons included, is one."""
    events: list[UsageEvent] = []
    rejected: list[Rejection] = []
    seen: dict[uuid.UUID, int] = {}
    firsts: dict[uuid.UUID, int] = {}  # event_id -> position in events
    repeats: dict[uuid.UUID, list[int]] = {}
    variants: Variants = {}
    latest = now + MAX_FUTURE
    for index, item in zip(range(len(items)) if indexes is None else indexes, items, strict=True):
        if isinstance(item, UsageEvent):
            event = item
        elif isinstance(item, Mapping):
            try:
                event = event_from_record(dict(item))
            except ValidationError as exc:
                rejected.append(Rejection(index, _event_id_of(item), validation_reason(exc)))
                continue
        else:
            rejected.append(Rejection(index, None, f"an event must be a JSON object, not {_json_kind(item)}"))
            continue
        if event.occurred_at > latest:
            reason = f"occurred_at {event.occurred_at.isoformat()} {IN_THE_FUTURE} (now {now.isoformat()})"
            rejected.append(Rejection(index, str(event.event_id), reason))
            continue
        if event.occurred_at < EARLIEST:
            rejected.append(Rejection(index, str(event.event_id), "occurred_at is before 2020-01-01"))
            continue
        names = (event.tenant_id, event.user_id, event.extension_id, event.function, event.purpose, event.provider,
                 event.model)  # fmt: skip
        if (too_wide := names_too_wide(names)) is not None:
            rejected.append(Rejection(index, str(event.event_id), too_wide))
            continue
        if event.event_id in seen:
            first = seen[event.event_id]
            if (conflict := repeat_conflict_reason(event, events[firsts[event.event_id]], first)) is not None:
                rejected.append(Rejection(index, str(event.event_id), conflict))
                variants.setdefault(event.event_id, []).append((index, event))
            else:
                repeats.setdefault(event.event_id, []).append(index)
            continue
        seen[event.event_id] = index
        firsts[event.event_id] = len(events)
        events.append(event)
    return events, rejected, repeats, seen, variants


def price(
    events: Sequence[UsageEvent],
    cards: RateCards,
    finalized: set[str],
    over_limit: list[tuple[UsageEvent, str]] | None = None,
) -> list[Priced]:
    return list(iter_priced(events, cards, finalized, over_limit))


def iter_priced(
    events: Iterable[UsageEvent],
    cards: RateCards,
    finalized: set[str],
    over_limit: list[tuple[UsageEvent, str]] | None = None,
) -> Iterator[Priced]:
    """Each event priced (rate cards, else exactly), Policy A applied, its invoice period assigned. An event
    priced above ``pricing.MAX_CALL_NANOS`` is not yielded: it goes to ``over_limit`` with the reason (without
    that list, it raises ValueError)."""
    quote_of, billed = cards.quote, BillingStatus.BILLED
    for e in events:
        at = e.occurred_at
        quote = quote_of(
            e.provider,
            e.model,
            at,
            e.input_tokens,
            e.output_tokens,
            e.cache_read_tokens,
            e.cache_write_tokens,
            e.cache_write_1h_tokens,
            e.web_searches,
        )
        if quote is not None and (reason := over_call_limit(quote)) is not None:
            if over_limit is None:
                raise ValueError(f"event {e.event_id}: {reason}")
            over_limit.append((e, reason))
            continue
        decision = decide(
            is_byollm=e.is_byollm,
            status=e.status,
            usage_completeness=e.usage_completeness,
            total_tokens=e.input_tokens + e.output_tokens,
            web_searches=e.web_searches,
            quote=quote,
        )
        period, late = None, False
        if decision.status is billed:
            period = period_of(at)
            if period in finalized:
                period, late = billing_period(period, finalized)
        if quote is None:
            yield Priced(e, decision, None, None, None, period, late)
        else:
            yield Priced(e, decision, quote.markup_text, quote.source, quote.source_version, period, late)


_NO_BUDGET_FLAGS = "[]"


def _orjson_text(value: Any) -> str:
    return orjson.dumps(value).decode()


# PostgreSQL (jsonb): the stdlib's json.dumps cost ~4 us per row; most events have no flags at all.
_NO_BUDGET_FLAGS_JSONB = Json([], dumps=lambda _value: _NO_BUDGET_FLAGS)


def _budget_json(flags: list[Any], sqlite: bool) -> Any:
    if sqlite:
        return _orjson_text(flags) if flags else _NO_BUDGET_FLAGS
    return Json(flags, dumps=_orjson_text) if flags else _NO_BUDGET_FLAGS_JSONB


def _row(p: Priced, batch: uuid.UUID, now: datetime, sqlite: bool) -> tuple[Any, ...]:
    e, d = p.event, p.decision
    if sqlite:  # the driver values SQLAlchemy's types would bind (bools bind as 0/1 by themselves)
        if _batch_values[0] is not batch or _batch_values[1] is not now:
            _batch_values[:] = [batch, now, batch.hex, store.sqlite_time(now)]
        ids: tuple[Any, Any, Any] = (e.event_id.hex, e.invocation_id.hex, _batch_values[2])
        occurred: Any = store.sqlite_time(e.occurred_at)
        ingested: Any = _batch_values[3]
    else:
        ids, occurred, ingested = (e.event_id, e.invocation_id, batch), e.occurred_at, now
    return (
        ids[0], e.schema_version, occurred, ingested, e.tenant_id, e.user_id, e.extension_id, e.function,
        e.action_type, ids[1], e.call_index, e.purpose, e.provider, e.model, e.is_byollm, e.is_failover,
        e.is_stream, e.input_tokens, e.output_tokens, e.cache_read_tokens, e.cache_write_tokens,
        e.cache_write_1h_tokens, e.reasoning_tokens, e.web_searches, e.usage_completeness.value, e.max_tokens,
        e.stop_reason, e.latency_ms, e.time_to_first_token_ms, e.status.value, e.error_type, e.prompt_fingerprint,
        _budget_json(e.budget_exceeded, sqlite), ids[2], d.status.value, d.charge_nanos, d.cost_nanos,
        d.shadow_nanos, p.markup, p.source, p.version, p.period, p.late,
    )  # fmt: skip


_batch_values: list[Any] = [None, None, None, None]  # (batch, now, batch.hex, sqlite_time(now)) of the last row


def ingest(
    session: Any,
    items: Sequence[UsageEvent | Mapping[str, Any]],
    *,
    markup_pct: Decimal = Decimal(0),
    now: datetime | None = None,
    indexes: Sequence[int] | None = None,
) -> IngestResult:
    """Ingest one batch in the caller's transaction (only flushes; the caller commits). ``indexes``: the index
    of each item in the caller's request (default: its position in ``items``), as rejections and reasons give it."""
    clock = now is None
    now = now or datetime.now(UTC)
    events, rejected, repeats, positions, variants = validate(items, now, indexes)
    result = IngestResult(duplicates=sum(map(len, repeats.values())), rejected=rejected)
    if not events:
        return result
    # Finalizing a period takes its lock exclusively: hold it shared (every period an event may be billed in,
    # late ones included) while we read which invoices are final and bill into them (PostgreSQL). On SQLite,
    # take the database write lock now instead.
    finalized = lock_billing_periods(session, {period_of(e.occurred_at) for e in events})
    store.lock_price_book(session, change=False)  # an override change waits for this batch (PostgreSQL)
    if clock:  # the posting time is taken once the locks are held: a batch that waited posts after what it waited for
        now = datetime.now(UTC)
    cards = RateCards(store.load_price_book(session, markup_pct))
    batch = uuid.uuid4()
    over_limit: list[tuple[UsageEvent, str]] = []
    stored: dict[uuid.UUID, tuple[Any, ...]] = {}  # the content of stored events with the batch's ids, once read
    if store.dialect(session) == "postgresql":
        inserted_ids = _store_and_post_postgresql(session, events, cards, finalized, batch, now, over_limit, stored)
    else:
        priced = price(events, cards, finalized, over_limit)
        inserted_ids = store.insert_new_events(session, [_row(p, batch, now, True) for p in priced], batch)
        new = [p for p in priced if p.event.event_id.hex in inserted_ids]
        rows, deltas, accounts = usage_transfer_rows(new, now, True)
        store.insert_transfer_rows(session, rows)
        store.apply_balances(session, accounts, deltas, now)
        store.upsert_rollups(session, fold_priced(new))
    result.inserted = len(inserted_ids)
    if result.inserted < len(events):
        over = {e.event_id: why for e, why in over_limit}
        _settle_not_inserted(session, events, inserted_ids, stored, positions, repeats, variants, over, result)
    return result


def _settle_not_inserted(
    session: Any,
    events: list[UsageEvent],
    inserted_ids: set[str],
    stored: dict[uuid.UUID, tuple[Any, ...]],
    positions: dict[uuid.UUID, int],
    repeats: dict[uuid.UUID, list[int]],
    variants: Variants,
    over_limit: dict[uuid.UUID, str],
    result: IngestResult,
) -> None:
    """Each event this call did not insert is a duplicate if a stored event has its id and its content (a
    replay never re-prices, even one priced above the per-call limit today); else it is rejected: with the
    fields that differ from the stored event, or, when none is stored, with why it was not priced. The later
    items of the batch that repeated a rejected event were counted as duplicates of it: they are rejected too;
    a later item with its id but other content, rejected for differing from it, is a duplicate after all when
    it is what is stored."""
    missing = [e for e in events if e.event_id.hex not in inserted_ids]
    stored.update(store.stored_event_contents(session, [e.event_id for e in missing if e.event_id not in stored]))
    for e in missing:
        row = stored.get(e.event_id)
        if row is not None:
            reason = conflict_reason(e, row)
        elif e.event_id in over_limit:
            reason = over_limit[e.event_id]
        else:  # neither inserted nor stored nor refused: never silently count it as anything
            raise RuntimeError(f"event {e.event_id} was neither inserted nor found stored")
        if reason is None:
            result.duplicates += 1
            continue
        result.rejected.append(Rejection(positions[e.event_id], str(e.event_id), reason))
        if row is not None and e.event_id in variants:
            _settle_variants(variants[e.event_id], row, result)
        for index in repeats.get(e.event_id, ()):
            result.duplicates -= 1
            why = f"repeats the event_id of item {positions[e.event_id]}, which is rejected: {reason}"
            result.rejected.append(Rejection(index, str(e.event_id), why))
    result.rejected.sort(key=lambda r: r.index)


def _settle_variants(variants: list[tuple[int, UsageEvent]], stored: tuple[Any, ...], result: IngestResult) -> None:
    """The first item with an id differed from the stored event: a later variant that equals it is a replay."""
    replays = {index for index, variant in variants if conflict_reason(variant, stored) is None}
    if replays:
        result.rejected = [r for r in result.rejected if r.index not in replays]
        result.duplicates += len(replays)


def _store_and_post_postgresql(
    session: Any,
    events: list[UsageEvent],
    cards: RateCards,
    finalized: set[str],
    batch: uuid.UUID,
    now: datetime,
    over_limit: list[tuple[UsageEvent, str]],
    stored: dict[uuid.UUID, tuple[Any, ...]],
) -> set[str]:
    """PostgreSQL: skip the stored ids, then price the new events as COPY takes them, then derive transfers,
    balances and rollups on the server. Returns the ids (32 hex) of the events this call inserted. (Pricing does
    not overlap the server's work: a binary COPY buffers up to 1,000 rows before it inserts them, so a batch is
    inserted after its last row is sent; bench/RESULTS.md, "post_batch_parts".)"""
    new = store.unstored_events(session, events, stored)
    if not new:
        return set()
    rows = (_row(p, batch, now, False) for p in iter_priced(new, cards, finalized, over_limit))
    inserted_ids = store.insert_new_events_postgresql(session, rows)
    store.post_batch_postgresql(session, inserted_ids, now)
    return inserted_ids


def usage_transfer_rows(
    new: Sequence[Priced], now: datetime, sqlite: bool
) -> tuple[list[tuple[Any, ...]], dict[str, int], dict[str, Account]]:
    """The rows of ``ledger.usage_postings`` for every billed event of the batch, built without intermediate
    objects (the ingest hot path; ids equal ``transfer_id``), with the balance deltas and accounts touched."""
    rows: list[tuple[Any, ...]] = []
    deltas: dict[str, int] = defaultdict(int)
    accounts: dict[str, Account] = {REVENUE.id: REVENUE}
    created: Any = store.sqlite_time(now) if sqlite else now
    for p in new:
        d = p.decision
        if d.status is not BillingStatus.BILLED or p.period is None:
            continue
        e = p.event
        event_ref = e.event_id.hex
        if d.charge_nanos > 0:
            wallet = wallet_id(e.tenant_id, e.user_id)
            if wallet not in accounts:
                accounts[wallet] = user_wallet(e.tenant_id, e.user_id)
            rows.append((usage_transfer_hex(event_ref, CHARGE), wallet, REVENUE.id, d.charge_nanos, CURRENCY, CHARGE,
                         event_ref, None, None, p.period, None, created))  # fmt: skip
            deltas[wallet] -= d.charge_nanos
            deltas[REVENUE.id] += d.charge_nanos
        if d.cost_nanos > 0:
            cost, payable = f"provider:{e.provider}:cost", f"provider:{e.provider}:payable"
            if cost not in accounts:
                accounts[cost], accounts[payable] = provider_cost(e.provider), provider_payable(e.provider)
            rows.append((usage_transfer_hex(event_ref, COST), cost, payable, d.cost_nanos, CURRENCY, COST, event_ref,
                         None, None, p.period, None, created))  # fmt: skip
            deltas[cost] -= d.cost_nanos
            deltas[payable] += d.cost_nanos
    return rows, dict(deltas), accounts


def fold_priced(new: Sequence[Priced]) -> dict[RollupKey, list[int]]:
    """Sum the rollup counters (``rollup.COUNTER_COLUMNS`` order) of each bucket the new events fall in."""
    buckets: dict[RollupKey, list[int]] = {}
    error, unpriced = Status.ERROR, BillingStatus.UNPRICED
    for p in new:
        e, d = p.event, p.decision
        key = (hour_of(e.occurred_at), e.tenant_id, e.user_id, e.extension_id, e.function, e.purpose, e.provider,
               e.model, e.is_byollm, e.status.value)  # fmt: skip
        c = buckets.get(key)
        if c is None:
            c = buckets[key] = [0] * 14
        c[0] += 1
        c[1] += e.input_tokens
        c[2] += e.output_tokens
        c[3] += e.cache_read_tokens
        c[4] += e.cache_write_tokens
        c[5] += e.reasoning_tokens
        c[6] += d.charge_nanos
        c[7] += d.shadow_nanos
        c[8] += d.cost_nanos
        c[9] += latency_us(e.latency_ms)
        c[10] += e.status is error
        c[11] += d.status is unpriced
        c[12] += e.cache_write_1h_tokens
        c[13] += e.web_searches
    return buckets
