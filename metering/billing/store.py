"""SQL of the billing write side: fast event inserts, transfers, balances, rollups, price overrides.

Only flushes / executes inside the caller's transaction; the edge commits. The fast paths talk to the
driver (``executemany`` on SQLite, ``COPY`` on PostgreSQL) because ingest is the hottest write path.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson
from psycopg.errors import UniqueViolation
from psycopg.types.json import set_json_loads
from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from metering.billing import batch_sql
from metering.billing.conflicts import CONTENT_FIELDS
from metering.billing.ledger import CURRENCY, MAX_BALANCE_NANOS, Account, Posting, past_balance_limit
from metering.billing.money import format_usd
from metering.billing.pricing import PriceBook, PriceOverride
from metering.billing.rollup import COUNTER_COLUMNS, KEY_COLUMNS, LOCK_ORDER, RollupKey, coarse_buckets
from metering.db.models import FinalizedPeriodRow, PriceOverrideRow, UsageEventRow
from metering.errors import BalanceLimitError
from metering.events import UsageEvent

EVENT_COLUMNS: tuple[str, ...] = tuple(column.name for column in UsageEventRow.__table__.columns)
TRANSFER_COLUMNS = (
    "id",
    "debit_account_id",
    "credit_account_id",
    "amount_nanos",
    "currency",
    "kind",
    "event_id",
    "reverses_id",
    "idempotency_key",
    "period",
    "memo",
    "created_at",
)
_IN_CHUNK = 500
NANOS_PER_MTOK_USD = Decimal(10**9)


def dialect(session: Session) -> str:
    return session.get_bind().dialect.name


# -- value conversion for the driver-level paths --------------------------------------------------


def sqlite_uuid(value: uuid.UUID | None) -> str | None:
    return None if value is None else value.hex


def sqlite_time(value: datetime) -> str:
    """How UTCDateTime stores a moment on SQLite: naive UTC, ``YYYY-MM-DD HH:MM:SS.ffffff``."""
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def posting_row(posting: Posting, created_at: datetime, sqlite: bool) -> tuple[Any, ...]:
    ids = (posting.id, posting.event_id, posting.reverses_id)
    if sqlite:
        ids = tuple(sqlite_uuid(i) for i in ids)  # type: ignore[assignment]
    return (
        ids[0],
        posting.debit.id,
        posting.credit.id,
        posting.amount_nanos,
        CURRENCY,
        posting.kind.value,
        ids[1],
        ids[2],
        posting.idempotency_key,
        posting.period,
        posting.memo,
        sqlite_time(created_at) if sqlite else created_at,
    )


# -- events ---------------------------------------------------------------------------------------


def insert_new_events(session: Session, rows: Sequence[tuple[Any, ...]], batch: uuid.UUID) -> set[str]:
    """SQLite: insert event rows (in ``EVENT_COLUMNS`` order, driver values, ``ingest_batch`` = ``batch``),
    skipping event ids already stored. Returns the ids (32-hex) this call inserted: exactly those, even when
    another process ingests the same events at the same moment. (PostgreSQL: ``unstored_events``, then
    ``insert_new_events_postgresql``.)"""
    if not rows:
        return set()
    return _insert_events_sqlite(session, rows, batch)


def _insert_events_sqlite(session: Session, rows: Sequence[tuple[Any, ...]], batch: uuid.UUID) -> set[str]:
    columns = ", ".join(EVENT_COLUMNS)
    marks = ", ".join("?" * len(EVENT_COLUMNS))
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        # The first write takes SQLite's write lock until commit: no other writer can interleave, and the
        # rows carrying this batch's id are exactly the ones inserted here.
        cursor.executemany(
            f"INSERT INTO usage_events ({columns}) VALUES ({marks}) ON CONFLICT (event_id) DO NOTHING", rows
        )
        ids = [row[0] for row in rows]
        inserted: set[str] = set()
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            cursor.execute(
                f"SELECT event_id FROM usage_events WHERE event_id IN ({', '.join('?' * len(chunk))}) "
                "AND ingest_batch = ?",
                [*chunk, batch.hex],
            )
            inserted.update(r[0] for r in cursor.fetchall())
        return inserted
    finally:
        cursor.close()


def _stage(cursor: Any, name: str, definition: str, columns: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """PostgreSQL: COPY ``rows`` into an empty per-transaction temporary table ``name``."""
    cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} {definition} ON COMMIT DELETE ROWS")
    cursor.execute(f"TRUNCATE {name}")  # a transaction may stage more than once (reprice pages)
    with cursor.copy(f"COPY {name} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _column_types(cursor: Any, table: str) -> list[str]:
    cursor.execute(
        "SELECT column_name, udt_name FROM information_schema.columns WHERE table_name = %s "
        "AND table_schema = current_schema()",
        [table],
    )
    types = dict(cursor.fetchall())
    return [types[c] for c in EVENT_COLUMNS]


_pg_event_types: list[str] | None = None


def stored_event_contents(session: Session, event_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[Any, ...]]:
    """The content (``conflicts.CONTENT_FIELDS``, in order) of those ``event_ids`` that are stored, as the events'
    own types: UUIDs, aware datetimes, bools, lists. Through the driver: SQLAlchemy's result processing cost
    ≈ 35 µs per row."""
    if not event_ids:
        return {}
    listed = ", ".join(("event_id", *CONTENT_FIELDS))
    cursor: Any = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    found: dict[uuid.UUID, tuple[Any, ...]] = {}
    try:
        if dialect(session) == "postgresql":
            set_json_loads(orjson.loads, cursor)  # the stdlib's json.loads took ≈ 9 µs per row
            ids = batch_sql.uuid_array([e.hex for e in event_ids])
            cursor.execute(f"SELECT {listed} FROM usage_events WHERE event_id = ANY(%s::uuid[])", [ids], binary=True)
            return {row[0]: row[1:] for row in cursor.fetchall()}
        convert = _SQLITE_READERS
        for start in range(0, len(event_ids), _IN_CHUNK):
            chunk = [e.hex for e in event_ids[start : start + _IN_CHUNK]]
            cursor.execute(
                f"SELECT {listed} FROM usage_events WHERE event_id IN ({', '.join('?' * len(chunk))})", chunk
            )
            for row in cursor.fetchall():
                found[uuid.UUID(row[0])] = tuple(f(v) if f else v for f, v in zip(convert, row[1:], strict=True))
    finally:
        cursor.close()
    return found


def _sqlite_readers() -> list[Any]:
    """Per content column, how a SQLite driver value becomes the model's type (None: as it is)."""
    table = UsageEventRow.__table__
    readers: list[Any] = []
    for name in CONTENT_FIELDS:
        kind = type(table.c[name].type).__name__
        if kind == "Uuid":
            readers.append(lambda v: None if v is None else uuid.UUID(v))
        elif kind == "UTCDateTime":
            readers.append(lambda v: None if v is None else datetime.fromisoformat(v).replace(tzinfo=UTC))
        elif kind == "Boolean":
            readers.append(lambda v: None if v is None else bool(v))
        elif kind == "JSON":
            readers.append(lambda v: None if v is None else orjson.loads(v))
        else:
            readers.append(None)
    return readers


_SQLITE_READERS = _sqlite_readers()


def unstored_events(
    session: Session, events: Sequence[UsageEvent], stored: dict[uuid.UUID, tuple[Any, ...]] | None = None
) -> list[UsageEvent]:
    """PostgreSQL: the events whose id is not stored yet, sorted by event id. Sorted: two batches sharing
    events then wait on each other in one order, never in a cycle (the later one gets a unique violation once
    the first commits, and takes the exact path). With ``stored``, the probe also reads the stored events'
    content (``conflicts.CONTENT_FIELDS``) into it: a replay is then compared without another query."""
    if stored is None:
        connection: Any = session.connection().connection.driver_connection
        with connection.cursor() as cursor:
            ids = batch_sql.uuid_array([e.event_id.hex for e in events])
            cursor.execute("SELECT event_id FROM usage_events WHERE event_id = ANY(%s::uuid[])", [ids])
            found: Any = {r[0] for r in cursor.fetchall()}
    else:
        found = stored
        stored.update(stored_event_contents(session, [e.event_id for e in events]))
    return sorted((e for e in events if e.event_id not in found), key=lambda e: e.event_id)


def insert_new_events_postgresql(session: Session, rows: Iterable[tuple[Any, ...]]) -> set[str]:
    """Binary-COPY event rows (``EVENT_COLUMNS`` order, driver values) straight into usage_events; ``rows``
    may be a generator (each row is made as COPY takes it). Returns the ids (32 hex) this call
    inserted. If another transaction stored one of them meanwhile, the COPY fails on the primary key: roll back
    to the savepoint and take the exact path (stage, then INSERT ... ON CONFLICT DO NOTHING RETURNING)."""
    global _pg_event_types
    connection: Any = session.connection().connection.driver_connection
    produced: list[tuple[Any, ...]] = []
    pending = iter(rows)
    with connection.cursor() as cursor:
        if _pg_event_types is None:
            _pg_event_types = _column_types(cursor, "usage_events")
        try:
            copy_sql = f"COPY usage_events ({', '.join(EVENT_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
            # A savepoint inside the batch's transaction, so a failed COPY leaves the batch usable.
            with connection.transaction(), cursor.copy(copy_sql) as copy:
                copy.set_types(_pg_event_types)
                for row in pending:
                    produced.append(row)
                    copy.write_row(row)
            return {row[0].hex for row in produced}
        except UniqueViolation:
            produced.extend(pending)  # raced by another ingest of the same events: take the exact path
    return _insert_events_postgresql_staged(session, produced)


def _insert_events_postgresql_staged(session: Session, rows: Sequence[tuple[Any, ...]]) -> set[str]:
    connection = session.connection().connection.driver_connection
    columns = ", ".join(EVENT_COLUMNS)
    with connection.cursor() as cursor:  # type: ignore[union-attr]
        _stage(cursor, "ingest_events", "(LIKE usage_events INCLUDING DEFAULTS)", columns, rows)
        # Sorted by event_id so two batches sharing events always lock them in the same order.
        cursor.execute(
            f"INSERT INTO usage_events ({columns}) SELECT {columns} FROM ingest_events ORDER BY event_id "
            "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
        )
        return {r[0].hex for r in cursor.fetchall()}


def post_batch_postgresql(session: Session, event_ids: set[str], now: datetime) -> None:
    """The transfers, balances and rollups of the events (32 hex) this transaction just stored."""
    if not event_ids:
        return
    found = batch_sql.post_batch(session.connection().connection.driver_connection, event_ids, now)
    if found != len(event_ids):  # cannot happen: they were inserted by this very transaction
        raise RuntimeError(f"posting a batch found {found} of its {len(event_ids)} new events")


# -- ledger ---------------------------------------------------------------------------------------


def post_transfers(session: Session, postings: Sequence[Posting], created_at: datetime) -> None:
    """Append transfers. Their ids are derived from their cause, so a duplicate is a bug: it fails loudly."""
    sqlite = dialect(session) == "sqlite"
    insert_transfer_rows(session, [posting_row(p, created_at, sqlite) for p in postings])


def insert_transfer_rows(session: Session, rows: Sequence[tuple[Any, ...]]) -> None:
    """Append transfer rows already in ``TRANSFER_COLUMNS`` order with driver values."""
    if not rows:
        return
    connection = session.connection().connection.driver_connection
    columns = ", ".join(TRANSFER_COLUMNS)
    if dialect(session) == "sqlite":
        marks = ", ".join("?" * len(TRANSFER_COLUMNS))
        connection.executemany(f"INSERT INTO transfers ({columns}) VALUES ({marks})", rows)  # type: ignore[union-attr]
        return
    with connection.cursor() as cursor, cursor.copy(f"COPY transfers ({columns}) FROM STDIN") as copy:  # type: ignore[union-attr]
        for row in rows:
            copy.write_row(row)


def apply_balances(session: Session, accounts: dict[str, Account], deltas: dict[str, int], now: datetime) -> None:
    """Create missing accounts and add each delta to its cached balance, in account-id order (no deadlocks).

    Raises ``BalanceLimitError`` (nothing applied) when a balance would pass ``ledger.MAX_BALANCE_NANOS``."""
    if not deltas:
        return
    sqlite = dialect(session) == "sqlite"
    stamp: Any = sqlite_time(now) if sqlite else now
    ordered = sorted(deltas)
    new_accounts = [
        (i, accounts[i].kind.value, accounts[i].tenant_id, accounts[i].user_id, CURRENCY, stamp) for i in ordered
    ]
    updates = [(deltas[i], i) for i in ordered if deltas[i]]
    mark = "?" if sqlite else "%s"
    insert = (
        "INSERT INTO accounts (id, kind, tenant_id, user_id, currency, balance_nanos, created_at) "
        f"VALUES ({mark}, {mark}, {mark}, {mark}, {mark}, 0, {mark}) ON CONFLICT (id) DO NOTHING"
    )
    update = f"UPDATE accounts SET balance_nanos = balance_nanos + {mark} WHERE id = {mark}"
    connection = session.connection().connection.driver_connection
    if sqlite:  # the INSERT took the database's write lock: the balances read next cannot change under us
        connection.executemany(insert, new_accounts)  # type: ignore[union-attr]
        if changed := [u[1] for u in updates]:
            current = connection.execute(  # type: ignore[union-attr]
                f"SELECT id, balance_nanos FROM accounts WHERE id IN ({', '.join('?' * len(changed))})", changed
            ).fetchall()
            _check_balance_limit(dict(current), deltas)
        connection.executemany(update, updates)  # type: ignore[union-attr]
    else:  # set-based: the batch's accounts and deltas as arrays, two statements
        ids = [row[0] for row in new_accounts]
        with connection.cursor() as cursor:  # type: ignore[union-attr]
            # One statement creates the missing accounts and locks the existing ones (a no-op update), all in id
            # order, as an ingest takes them (batch_sql): creating the missing ones first, then locking the others,
            # a new wallet (user:...) was held before the revenue account (platform:revenue), and an ingest of that
            # user holding the revenue while it waited for the wallet deadlocked with it.
            cursor.execute(
                "INSERT INTO accounts (id, kind, tenant_id, user_id, currency, balance_nanos, created_at) "
                "SELECT a.id, a.kind, a.tenant_id, a.user_id, %s, 0, %s "
                "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS a(id, kind, tenant_id, user_id) "
                "ORDER BY a.id ON CONFLICT (id) DO UPDATE SET balance_nanos = accounts.balance_nanos "
                "RETURNING id, balance_nanos",
                [CURRENCY, now, ids, [r[1] for r in new_accounts], [r[2] for r in new_accounts],
                 [r[3] for r in new_accounts]],
            )  # fmt: skip
            _check_balance_limit(dict(cursor.fetchall()), deltas)
            cursor.execute(
                "UPDATE accounts a SET balance_nanos = a.balance_nanos + d.delta "
                "FROM unnest(%s::text[], %s::int8[]) AS d(id, delta) WHERE a.id = d.id",
                [[u[1] for u in updates], [u[0] for u in updates]],
            )


def _check_balance_limit(balances: dict[str, int], deltas: Mapping[str, int]) -> None:
    if past := past_balance_limit(balances, deltas):
        raise BalanceLimitError(
            f"posting this would take the balance of {', '.join(past)} past what the ledger can store "
            f"(±{format_usd(MAX_BALANCE_NANOS)}); nothing was posted"
        )


# -- rollups --------------------------------------------------------------------------------------


def upsert_rollups(session: Session, buckets: dict[RollupKey, list[int]]) -> None:
    """Add each bucket's counters to its hourly rollup row and to the coarse rollups' rows it sums into,
    in key order, the tables in ``rollup.LOCK_ORDER`` (no deadlocks). The PostgreSQL ingest path does the same in
    SQL (``batch_sql``), in that order."""
    if not buckets:
        return
    writes: dict[str, tuple[tuple[str, ...], Mapping[tuple[Any, ...], list[int]]]] = {
        "usage_rollups": (KEY_COLUMNS, buckets)
    }
    for rollup, coarse in coarse_buckets(buckets).items():
        writes[rollup.table] = (rollup.key_columns, coarse)
    for table in LOCK_ORDER:
        _upsert_counters(session, table, *writes[table])


def _sqlite_grain(value: datetime | date) -> str:
    """A rollup's grain as SQLite's driver stores it (moments as naive UTC text, dates ISO)."""
    if isinstance(value, datetime):
        return sqlite_time(value)
    return value.isoformat()


def _upsert_counters(
    session: Session, table: str, keys: Sequence[str], buckets: Mapping[tuple[Any, ...], list[int]]
) -> None:
    sqlite = dialect(session) == "sqlite"
    columns = (*keys, *COUNTER_COLUMNS)
    updates = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in COUNTER_COLUMNS)
    rows = []
    if sqlite:  # only the grain (hour or day) needs converting: the other key values are text, or a bool (0/1)
        grains: dict[Any, Any] = {}
        for key in sorted(buckets):
            grain = grains.get(key[0])
            if grain is None:
                grain = grains[key[0]] = _sqlite_grain(key[0])
            rows.append((grain, *key[1:], *buckets[key]))
    else:
        rows = [(*key, *buckets[key]) for key in sorted(buckets)]
    connection = session.connection().connection.driver_connection
    names, conflict = ", ".join(columns), ", ".join(keys)
    if sqlite:
        marks = ", ".join("?" * len(columns))
        connection.executemany(  # type: ignore[union-attr]
            f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT ({conflict}) DO UPDATE SET {updates}", rows
        )
        return
    # set-based: COPY the batch's buckets, then one INSERT ... SELECT ... ON CONFLICT DO UPDATE
    with connection.cursor() as cursor:  # type: ignore[union-attr]
        _stage(cursor, f"ingest_{table}", f"(LIKE {table} INCLUDING DEFAULTS)", names, rows)
        cursor.execute(
            f"INSERT INTO {table} ({names}) SELECT {names} FROM ingest_{table} ORDER BY {conflict} "
            f"ON CONFLICT ({conflict}) DO UPDATE SET {updates}"
        )


# -- price book and invoices ----------------------------------------------------------------------


def override_from_row(row: PriceOverrideRow) -> PriceOverride:
    def usd(nanos: int | None) -> Decimal | None:
        return None if nanos is None else Decimal(nanos) / NANOS_PER_MTOK_USD

    return PriceOverride(
        id=row.id,
        provider=row.provider,
        model_pattern=row.model_pattern,
        effective_from=row.effective_from,
        effective_to=row.effective_to,
        input_mtok=usd(row.input_nanos_per_mtok),  # type: ignore[arg-type]
        output_mtok=usd(row.output_nanos_per_mtok),  # type: ignore[arg-type]
        cache_read_mtok=usd(row.cache_read_nanos_per_mtok),
        cache_write_mtok=usd(row.cache_write_nanos_per_mtok),
        markup_pct=None if row.markup_pct is None else Decimal(row.markup_pct),
        cache_write_1h_mtok=usd(row.cache_write_1h_nanos_per_mtok),
        web_search_per_k=usd(row.web_search_nanos_per_k),  # nanos per 1,000 searches -> USD per 1,000
        created_at=row.created_at,
    )


def lock_price_book(session: Session, *, change: bool) -> None:
    """PostgreSQL: the price book's transaction lock, held to commit. An ingest, a reprice and a re-rate take it
    shared before they read the overrides (``corrections.PagePrices``); a change of the overrides
    (``overrides.add_override``, ``overrides.end``) takes it exclusive. So a change commits after every run that
    priced without it (and one starting meanwhile waits for it): a reprice or re-rate run once the change is committed
    finds every event priced without it. Before, an ingest (or a reprice) in flight committed its events after the
    change, and after the reprice (re-rate) that was run to correct them: they stayed held (billed at the old price).
    SQLite: nothing (they take the database write lock before they read the overrides; a change needs it too)."""
    if dialect(session) == "postgresql":
        mode = "" if change else "_shared"
        session.execute(text(f"SELECT pg_advisory_xact_lock{mode}(hashtext('price_book'))"))


def load_price_book(session: Session, markup_pct: Decimal) -> PriceBook:
    """The overrides that price something: a withdrawn one (ended at its start, ``effective_to`` = ``effective_from``:
    an empty window) is no part of the book (``PriceOverride`` refuses an empty window)."""
    o = PriceOverrideRow
    rows = session.scalars(select(o).where(or_(o.effective_to.is_(None), o.effective_to > o.effective_from))).all()
    return PriceBook(overrides=tuple(override_from_row(r) for r in rows), markup_pct=markup_pct)


def finalized_periods(session: Session) -> set[str]:
    """The finalized months (``finalized_periods``, one row each): finalizing closes a month for every user."""
    return set(session.scalars(select(FinalizedPeriodRow.period)))
