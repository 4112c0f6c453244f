"""Admin price overrides (SQL; only flushes, the edge commits).

An override prices (provider, model glob) in [effective_from, effective_to), in USD per 1M tokens for each
token kind, optionally with its own markup. Prices are stored exactly, as integer nano-USD per 1M tokens:
a price finer than 1e-9 $/Mtok is refused rather than rounded. Overrides are never deleted: ``end_override``
closes the window, so past prices stay reproducible (a re-rate can still see what applied when). Ended at its start
(``withdraw``), the window is empty, [effective_from, effective_from): the override is withdrawn, it prices nothing
(``store.load_price_book`` leaves it out) and stays listed, and audited.
"""

from __future__ import annotations

import hashlib
import shlex
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from metering.billing import store
from metering.billing.credits import check_idempotency_key
from metering.billing.money import decimal_text
from metering.billing.policy import BillingStatus
from metering.billing.pricing import PriceOverride
from metering.config import without_zeros_past_nine_decimals
from metering.db.models import PriceOverrideRow, UsageEventRow
from metering.db.row_lock import get_for_update, lock_sqlite_for_write
from metering.db.unique import flush_or_conflict
from metering.errors import (
    ConflictError,
    IdempotencyConflictError,
    InvalidInputError,
    MeteringError,
    NotFoundError,
    OverridePricedEventsError,
)

NANOS_PER_USD = 10**9
MAX_NANOS = 2**63 - 1  # BIGINT
MAX_ID = 64
MAX_NOTE = 500


def nanos_per_mtok(name: str, usd_per_mtok: Decimal | None, unit: str = "$/Mtok") -> int | None:
    """$/Mtok (or $ per another ``unit``) as integer nano-USD, exactly; refuses finer precision, floats and
    absurd values."""
    if usd_per_mtok is None:
        return None
    if not isinstance(usd_per_mtok, Decimal) or not usd_per_mtok.is_finite() or usd_per_mtok < 0:
        raise InvalidInputError(f"{name} must be a finite, non-negative Decimal in {unit} (got {usd_per_mtok!r})")
    nanos = usd_per_mtok.scaleb(9)
    if nanos != nanos.to_integral_value():
        raise InvalidInputError(
            f"{name} = {usd_per_mtok} {unit} is finer than the stored precision of 0.000000001 {unit}"
        )
    if nanos > MAX_NANOS:
        raise InvalidInputError(f"{name} = {usd_per_mtok} {unit} is too large")
    return int(nanos)


# An override's markup follows the platform's (``config``'s ``markup_pct``): at least -100 % (a price of 0), at most
# 9 decimals and 18 digits; checked when it is added (not when stored ones are loaded: one never fails ingest).
# Unbounded, ``1e30`` made every call it prices cost more than a call may (``pricing.MAX_CALL_NANOS``): ingest
# rejected them all, to the dead letters.
MAX_MARKUP_PCT = Decimal("999999999.999999999")


def _markup_text(markup_pct: Decimal | None) -> str | None:
    if markup_pct is None:
        return None
    # (finite and >= -100: checked by pricing.PriceOverride, which a stored override is loaded into)
    if markup_pct > MAX_MARKUP_PCT:
        raise InvalidInputError(f"markup_pct {markup_pct} is above {MAX_MARKUP_PCT} (percent)")
    if markup_pct != markup_pct.quantize(Decimal("1e-9")):
        raise InvalidInputError(f"markup_pct {markup_pct} is finer than 9 decimals")
    # plain: "10", never "1E+1"; "12.5" and 40 zeros overflowed the column (32 characters)
    return format(without_zeros_past_nine_decimals(markup_pct), "f")


def add_override(session: Session, *, effective_from: datetime, **fields: Any) -> PriceOverrideRow:
    """``add`` with a start given (``fields``: its other keyword arguments), returning the flushed row (or, for an
    ``id`` already used by the same request, the stored one)."""
    return add(session, effective_from=effective_from, **fields).row


@dataclass(frozen=True, slots=True)
class Adding:
    row: PriceOverrideRow
    replayed: bool  # True: its id (or idempotency key) was used before for this request: the first one, nothing added


def key_override_id(idempotency_key: str) -> str:
    """The id of the override an idempotency key adds (both edges derive it alike): a digest, as long as a generated
    id, so any key (up to 200 characters, '/' too) makes an id the ``…/{id}:end`` route can address."""
    return "ovr_" + hashlib.sha256(b"price_override.idempotency_key:" + idempotency_key.encode()).hexdigest()[:32]


def add(
    session: Session,
    *,
    provider: str,
    model_pattern: str,
    effective_from: datetime | None,
    effective_to: datetime | None,
    input_mtok: Decimal,
    output_mtok: Decimal,
    cache_read_mtok: Decimal | None = None,
    cache_write_mtok: Decimal | None = None,
    markup_pct: Decimal | None = None,
    note: str | None = None,
    cache_write_1h_mtok: Decimal | None = None,
    web_search_per_k: Decimal | None = None,
    id: str | None = None,
    idempotency_key: str | None = None,
    now: datetime | None = None,
) -> Adding:
    """``add_override``, safe to retry. The override's id is ``id``, or the one derived from ``idempotency_key``
    (``key_override_id``; not both: an id already identifies the request), or a generated one. An id (a key) used
    before by the same request answers that override, ``replayed``, and adds nothing; by another request it is a
    ``ConflictError`` (``IdempotencyConflictError`` for a key) naming the stored override and what differs. The same
    request: the same provider (any case), pattern, window and prices (as values: "3" is "3.00"), as the override is
    stored now (ended or withdrawn since, it is no longer what was asked for: a conflict, it is never reopened); the
    note is not compared (a retry may reword it: the first stays). ``effective_from`` None: ``now`` for a new
    override, the stored start for a retry (the CLI without ``--from``). Checked and added under the price book's lock
    (PostgreSQL) or the database write lock (SQLite): the same key twice at once adds one override."""
    now = now or datetime.now(UTC)
    override_id = _override_id(id, idempotency_key)
    if note is not None and len(note) > MAX_NOTE:
        raise InvalidInputError(f"a note has at most {MAX_NOTE} characters")
    # Stored lowercase, as events and per-purpose and BYOLLM settings (``settings_store.provider_name``) store it;
    # matching and ``list_overrides`` ignore case, so overrides stored as sent ("Ollama") before still price.
    provider = provider.lower()
    if len(provider) > 50 or len(model_pattern) > 200:
        raise InvalidInputError("provider has at most 50 characters and model_pattern at most 200")
    prices = {
        "input_mtok": nanos_per_mtok("input_mtok", input_mtok),
        "output_mtok": nanos_per_mtok("output_mtok", output_mtok),
        "cache_read_mtok": nanos_per_mtok("cache_read_mtok", cache_read_mtok),
        "cache_write_mtok": nanos_per_mtok("cache_write_mtok", cache_write_mtok),
        "cache_write_1h_mtok": nanos_per_mtok("cache_write_1h_mtok", cache_write_1h_mtok),
        "web_search_per_k": nanos_per_mtok("web_search_per_k", web_search_per_k, "$ per 1,000 searches"),
    }
    store.lock_price_book(session, change=True)  # after every ingest that priced without it (PostgreSQL)
    lock_sqlite_for_write(session)  # SQLite: a request adding the same id meanwhile has committed (and is found)
    existing = session.get(PriceOverrideRow, override_id, populate_existing=True)
    if effective_from is None:
        effective_from = existing.effective_from if existing is not None else now
    # Checked with the start resolved: without one, a retry takes the stored start (checked against the retry's own
    # "now", a window ended since refused the same request as invalid).
    try:
        PriceOverride(
            id=override_id,
            provider=provider,
            model_pattern=model_pattern,
            effective_from=effective_from,
            effective_to=effective_to,
            input_mtok=input_mtok,
            output_mtok=output_mtok,
            cache_read_mtok=cache_read_mtok,
            cache_write_mtok=cache_write_mtok,
            markup_pct=markup_pct,
            cache_write_1h_mtok=cache_write_1h_mtok,
            web_search_per_k=web_search_per_k,
        )
    except ValueError as exc:
        raise InvalidInputError(f"invalid price override: {exc}") from None
    markup = _markup_text(markup_pct)  # (once checked finite: a NaN cannot be compared)
    if existing is not None:
        asked = _identity(provider, model_pattern, effective_from, effective_to, prices, markup)
        differs = [f for f, stored in _row_identity(existing).items() if asked[f] != stored]
        if not differs:
            return Adding(existing, replayed=True)
        raise _conflict(existing, idempotency_key, differs, asked)
    row = PriceOverrideRow(
        id=override_id,
        provider=provider,
        model_pattern=model_pattern,
        effective_from=effective_from,
        effective_to=effective_to,
        input_nanos_per_mtok=prices["input_mtok"],
        output_nanos_per_mtok=prices["output_mtok"],
        cache_read_nanos_per_mtok=prices["cache_read_mtok"],
        cache_write_nanos_per_mtok=prices["cache_write_mtok"],
        cache_write_1h_nanos_per_mtok=prices["cache_write_1h_mtok"],
        web_search_nanos_per_k=prices["web_search_per_k"],
        markup_pct=markup,
        note=note,
        created_at=now,
    )
    session.add(row)
    # (a concurrent request adding it meanwhile waited for the locks above: a unique violation cannot be that one)
    flush_or_conflict(session, f"a price override with id {override_id!r} was added meanwhile: send it again")
    return Adding(row, replayed=False)


def _override_id(id: str | None, idempotency_key: str | None) -> str:
    if id is not None and idempotency_key is not None:
        raise InvalidInputError(
            "send an override id or an idempotency key, not both: the id already makes the request safe to retry "
            "(the same id and request again answer the first override)"
        )
    if idempotency_key is not None:
        check_idempotency_key(idempotency_key)
        return key_override_id(idempotency_key)
    override_id = id or f"ovr_{uuid.uuid4().hex}"
    if len(override_id) > MAX_ID:
        raise InvalidInputError(f"an override id has at most {MAX_ID} characters")
    if "/" in override_id:  # the API addresses an override in a path segment: POST …/price-overrides/{id}:end
        raise InvalidInputError(
            f"an override id cannot contain '/' (got {override_id!r}): the API could never end it "
            "(POST /v1/admin/price-overrides/{id}:end takes one path segment)"
        )
    return override_id


Identity = dict[str, str | None]


def _identity(
    provider: str,
    model_pattern: str,
    start: datetime,
    end: datetime | None,
    prices: dict[str, int | None],
    markup: str | None,
) -> Identity:
    """What a request must repeat to be answered with the override it added (pure; prices and markup as values)."""
    return {
        "provider": provider.lower(),
        "model_pattern": model_pattern,
        "effective_from": _moment(start),
        "effective_to": _moment(end),
        **{name: decimal_text(nanos) for name, nanos in prices.items()},
        "markup_pct": None if markup is None else format(Decimal(markup).quantize(Decimal("1e-9")), "f"),
    }


def _row_identity(row: PriceOverrideRow) -> Identity:
    prices = {
        "input_mtok": row.input_nanos_per_mtok,
        "output_mtok": row.output_nanos_per_mtok,
        "cache_read_mtok": row.cache_read_nanos_per_mtok,
        "cache_write_mtok": row.cache_write_nanos_per_mtok,
        "cache_write_1h_mtok": row.cache_write_1h_nanos_per_mtok,
        "web_search_per_k": row.web_search_nanos_per_k,
    }
    return _identity(row.provider, row.model_pattern, row.effective_from, row.effective_to, prices, row.markup_pct)


def _moment(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).isoformat()


def _conflict(row: PriceOverrideRow, key: str | None, differs: list[str], asked: Identity) -> MeteringError:
    stored = _row_identity(row)
    window = f"from {stored['effective_from']} " + (
        "(withdrawn)" if is_withdrawn(row) else f"to {stored['effective_to']}" if row.effective_to else "(open-ended)"
    )
    first = (
        f"{row.provider} {row.model_pattern!r} {window}, input {stored['input_mtok']} / output "
        f"{stored['output_mtok']} $/Mtok"
    )
    how = ", ".join(f"{f} (stored: {stored[f] or 'none'}, requested: {asked[f] or 'none'})" for f in differs)
    if key is not None:
        return IdempotencyConflictError(
            f"idempotency key {key!r} was already used for a different request: override {row.id!r} ({first}); this "
            f"request differs in {how}"
        )
    return ConflictError(
        f"price override {row.id!r} already exists for a different request ({first}); this request differs in {how}. "
        "To change a price, end it and add a new override under a new id"
    )


def list_overrides(
    session: Session, *, provider: str | None = None, active_at: datetime | None = None
) -> list[PriceOverrideRow]:
    """Overrides (optionally of one provider, its name in any case, as overrides match it; or active at one
    moment), by provider, pattern and start."""
    stmt = select(PriceOverrideRow)
    if provider is not None:
        stmt = stmt.where(func.lower(PriceOverrideRow.provider) == provider.lower())
    if active_at is not None:
        stmt = stmt.where(
            PriceOverrideRow.effective_from <= active_at,
            (PriceOverrideRow.effective_to.is_(None)) | (PriceOverrideRow.effective_to > active_at),
        )
    stmt = stmt.order_by(PriceOverrideRow.provider, PriceOverrideRow.model_pattern, PriceOverrideRow.effective_from)
    return list(session.scalars(stmt))


def get_override(session: Session, id: str, *, for_update: bool = False) -> PriceOverrideRow | None:
    """``for_update``: to end it (``row_lock``: waits for a concurrent end, so an audit's before is right)."""
    if for_update:
        return get_for_update(session, PriceOverrideRow, id)
    return session.get(PriceOverrideRow, id)


@dataclass(frozen=True, slots=True)
class PricedBeyond:
    """Events an override priced that a new end leaves outside its window (``occurred_at`` at or after it): they
    keep its price, which no longer applied when they occurred, until a re-rate prices them again."""

    billed: int = 0
    byollm: int = 0  # BYOLLM events whose shadow cost it priced (never billed)
    first: datetime | None = None  # the earliest and latest occurred_at among them
    last: datetime | None = None

    def rerate_command(self, model_pattern: str) -> str | None:
        """The CLI's re-rate of a window holding every one of them (``--to`` is exclusive), or None if none."""
        if self.first is None or self.last is None:
            return None
        end = self.last + timedelta(microseconds=1)
        window = f"--from {self.first.isoformat()} --to {end.isoformat()}"
        return f"metering billing rerate {window} --model {shlex.quote(model_pattern)}"


def priced_beyond(session: Session, id: str, at: datetime) -> PricedBeyond:
    """Billed events (and BYOLLM shadow costs) override ``id`` priced that occurred at or after ``at``. An event names
    the override that priced it: ``price_source`` ``override`` and ``price_version`` its id."""
    e = UsageEventRow
    stmt = (
        select(e.billing_status, func.count(), func.min(e.occurred_at), func.max(e.occurred_at))
        .where(
            e.price_source == "override",
            e.price_version == id,
            e.occurred_at >= at,
            e.billing_status.in_((BillingStatus.BILLED.value, BillingStatus.EXCLUDED_BYOLLM.value)),
        )
        .group_by(e.billing_status)
    )
    found = {status: (count, first, last) for status, count, first, last in session.execute(stmt)}
    if not found:
        return PricedBeyond()
    firsts = [first for _, first, _ in found.values()]
    lasts = [last for _, _, last in found.values()]
    return PricedBeyond(
        billed=found.get(BillingStatus.BILLED.value, (0, None, None))[0],
        byollm=found.get(BillingStatus.EXCLUDED_BYOLLM.value, (0, None, None))[0],
        first=min(firsts),
        last=max(lasts),
    )


@dataclass(frozen=True, slots=True)
class Ending:
    row: PriceOverrideRow
    changed: bool  # False: it already ended at that moment (a retry), nothing changed
    priced_beyond: PricedBeyond  # what it priced past its end, kept at its price until re-rated


def end_override(session: Session, id: str, at: datetime, *, keep_priced_events: bool = False) -> PriceOverrideRow:
    """Close an override's window at ``at`` (exclusive). It can only be shortened; it is never deleted."""
    return end(session, id, at, keep_priced_events=keep_priced_events).row


def end(session: Session, id: str, at: datetime, *, keep_priced_events: bool = False) -> Ending:
    """``end_override``, also telling whether this call changed the window. Ending it at the moment it already ends
    (a retry, or two identical ends at once) changes nothing: ``changed`` False, and the edges audit nothing (they
    recorded a second ``price_override.end`` with ``before`` equal to ``after``, a change nobody made). Ending it at
    its start withdraws it (an empty window, see ``withdraw``); before its start is refused.

    Billed events it priced at or after ``at`` would keep a price that no longer applied when they occurred, silently:
    the end is refused (``OverridePricedEventsError``, naming them and the re-rate that prices them again) unless
    ``keep_priced_events``, the admin's word that a re-rate follows (it must come after: a re-rate prices with the
    overrides in effect, so it can only undo this one's prices once it is ended). BYOLLM shadow costs it priced there
    (reporting, never billed) do not refuse it; ``priced_beyond`` tells both. Counted under the price book's lock
    (PostgreSQL) or the database write lock (SQLite), so an ingest pricing with it at the same moment has either
    committed (and is counted) or prices without it."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise InvalidInputError("the end of an override must be timezone-aware")
    at = at.astimezone(UTC)
    lock_for_change(session)
    o = PriceOverrideRow
    beyond = priced_beyond(session, id, at)
    if beyond.billed and not keep_priced_events:  # BYOLLM shadow costs alone: reporting, never billed; answered
        row = session.get(o, id, populate_existing=True)
        if row is not None and _shortens(row, at):  # (a retry that changes nothing is no new end: answered below)
            raise OverridePricedEventsError(_priced_beyond_problem(row, at, beyond))
    # One conditional UPDATE, so the rule holds against a concurrent end: checked on a row read before, an end that
    # waited for another one's lock lengthened the window the first had just shortened.
    shortened = session.execute(
        update(o)
        .where(o.id == id, o.effective_from <= at, or_(o.effective_to.is_(None), o.effective_to > at))
        .values(effective_to=at)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    row = session.get(o, id, populate_existing=True)
    if row is None:
        raise NotFoundError(f"no price override with id {id!r}")
    if shortened:
        return Ending(row, True, beyond)
    if at < row.effective_from:
        raise InvalidInputError(
            f"override {id!r} starts at {row.effective_from.isoformat()}: end it at or after that (at its start "
            "withdraws it)"
        )
    assert row.effective_to is not None
    if row.effective_to == at:
        return Ending(row, False, beyond)
    if is_withdrawn(row):
        raise InvalidInputError(f"override {id!r} is withdrawn (ended at its start, {row.effective_to.isoformat()})")
    raise InvalidInputError(f"override {id!r} already ends at {row.effective_to.isoformat()}")


def lock_for_change(session: Session) -> None:
    """The locks an end (or a withdrawal) takes before it reads or changes the override's row, held to commit: the
    price book's, exclusive (PostgreSQL: after every ingest that priced with the longer window), and the database's
    write lock (SQLite: no ingest commits between the count of ``priced_beyond`` and the change). A caller that locks
    the row first (to snapshot it for the audit) takes these before: the other way round, it and an end of the same
    override at once each waited for the other, and PostgreSQL failed one with a deadlock."""
    store.lock_price_book(session, change=True)
    lock_sqlite_for_write(session)


def get_for_change(session: Session, id: str) -> PriceOverrideRow | None:
    """The override's row locked for an end or a withdrawal (its ``before`` for the audit), after the locks those take
    first (``lock_for_change``)."""
    lock_for_change(session)
    return get_override(session, id, for_update=True)


def withdraw(session: Session, id: str, *, keep_priced_events: bool = False) -> Ending:
    """End the override at its start: an empty window, so it prices nothing, anywhere (ingest, reprice, re-rate,
    quotes; ``list_overrides(active_at=…)`` never lists it), though it stays stored and listed. For an override
    scheduled by mistake (a wrong start, price or pattern), before or after it started. As ``end``: a retry changes
    nothing, and billed events it priced refuse it unless ``keep_priced_events`` (then re-rate them, as
    ``priced_beyond`` says)."""
    # Read without a row lock (its start never changes): ``end`` takes the price book's lock, then the row; taken the
    # other way round here, a withdrawal and an end of the same override at once deadlocked (PostgreSQL).
    row = session.get(PriceOverrideRow, id)
    if row is None:
        raise NotFoundError(f"no price override with id {id!r}")
    return end(session, id, row.effective_from, keep_priced_events=keep_priced_events)


def is_withdrawn(row: PriceOverrideRow) -> bool:
    """Ended at its start: an empty window, it prices nothing."""
    return row.effective_to == row.effective_from


def _shortens(row: PriceOverrideRow, at: datetime) -> bool:
    """Whether ending ``row`` at ``at`` shortens its window (the conditional UPDATE of ``end``, on a locked row)."""
    return row.effective_from <= at and (row.effective_to is None or row.effective_to > at)


def _priced_beyond_problem(row: PriceOverrideRow, at: datetime, beyond: PricedBeyond) -> str:
    assert beyond.first is not None and beyond.last is not None
    what = f"{beyond.billed} billed event(s)" + (
        f" and {beyond.byollm} BYOLLM event(s) (shadow cost)" if beyond.byollm else ""
    )
    return (
        f"override {row.id!r} priced {what} that occurred at or after {at.isoformat()} (from "
        f"{beyond.first.isoformat()} to {beyond.last.isoformat()}): ended there, they would keep its price. To end it "
        "anyway, send keep_priced_events (CLI: --keep-priced-events), then re-rate them: "
        f"{beyond.rerate_command(row.model_pattern)} (a dry run; then --apply --run-id ID)"
    )
