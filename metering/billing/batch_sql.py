"""PostgreSQL: post a batch's ledger transfers, balances and rollups from its stored events, in one statement.

Ingest COPYs the priced events into ``usage_events`` (each row carries its billing status, charge, cost and
invoice period); this statement then derives, on the server, what the Python path
(``ingest.usage_transfer_rows`` / ``fold_priced`` + ``store``) builds row by row for SQLite:

- one ``usage_charge`` (user wallet -> platform revenue) and one ``provider_cost`` (provider cost -> provider
  payable) transfer per billed event with a positive amount, its id ``ledger.usage_transfer_hex`` computed
  in SQL (a test holds both equal), so a replay can never post twice;
- the accounts they touch, created if missing, their cached balances moved by the summed deltas;
- the hourly rollups and the coarse rollups (``rollup.COARSE_ROLLUPS``) the events fall in.

Rows are locked in key order within each table (rollups by key, accounts by id), the tables always in the
same order, so two batches ingested at once may wait for each other but never deadlock. PostgreSQL runs the
data-modifying ``WITH`` clauses last-written first: the accounts, then ``rollup.LOCK_ORDER`` (the coarse rollups
from the coarsest, then the hourly ones), then the transfers. Reprice and re-rate (``store.apply_balances``, then
``store.upsert_rollups``) take them in that order too, or a batch and a correction moving the same buckets
deadlock (a test holds them to it).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from typing import Any

from metering.billing.ledger import CURRENCY, REVENUE, AccountKind, TransferKind
from metering.billing.rollup import COARSE_ROLLUPS, COUNTER_COLUMNS, KEY_COLUMNS

_HOUR = "date_trunc('hour', occurred_at, 'UTC')"
_DAY = "CAST(timezone('UTC', occurred_at) AS date)"
# The rollup counters (COUNTER_COLUMNS order) summed over a group of events.
COUNTER_SUMS = (
    "count(*)",
    "sum(input_tokens)",
    "sum(output_tokens)",
    "sum(cache_read_tokens)",
    "sum(cache_write_tokens)",
    "sum(reasoning_tokens)",
    "sum(charge_nanos)",
    "sum(shadow_nanos)",
    "sum(cost_nanos)",
    "sum(CAST(floor(latency_ms * 1000 + 0.5) AS BIGINT))",
    "count(*) FILTER (WHERE status = 'error')",
    "count(*) FILTER (WHERE billing_status = 'unpriced')",
    "sum(cache_write_1h_tokens)",
    "sum(web_searches)",
)
if len(COUNTER_SUMS) != len(COUNTER_COLUMNS):
    raise RuntimeError("rollup counters changed: update metering.billing.batch_sql")


def _rollup_upsert(table: str, keys: Sequence[str], expressions: Sequence[str]) -> str:
    names = ", ".join((*keys, *COUNTER_COLUMNS))
    positions = ", ".join(str(i + 1) for i in range(len(keys)))
    updates = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in COUNTER_COLUMNS)
    return (
        f"INSERT INTO {table} ({names}) SELECT {', '.join((*expressions, *COUNTER_SUMS))} FROM b "
        f"GROUP BY {positions} ORDER BY {positions} ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
    )


_COARSE = "".join(
    f""", {r.table} AS (
    {_rollup_upsert(r.table, r.key_columns, (_HOUR if r.grain == "hour" else _DAY, *r.dimensions))}
)"""
    for r in COARSE_ROLLUPS
)
_BILLED = "billing_status = 'billed' AND invoice_period IS NOT NULL"
# ledger.wallet_id in SQL (both databases): the tenant's '~' and ':' escaped, so no two (tenant, user) share a wallet
WALLET_ID_SQL = "'user:' || replace(replace({tenant}, '~', '~7E'), ':', '~3A') || ':' || {user}"
_CHARGE, _COST = TransferKind.USAGE_CHARGE.value, TransferKind.PROVIDER_COST.value
# ledger.usage_transfer_hex: the event id as a UUIDv8, variant bits 10 (charge) / 11 (cost)
_CHARGE_ID = "CAST(overlay(h placing '8' from 13 for 1) AS uuid)"
_COST_ID = (
    "CAST(overlay(h placing '8' || substr(h, 14, 3) || translate(substr(h, 17, 1), '89ab', 'cdef') from 13 for 5) "
    "AS uuid)"
)
_EVENT_COLUMNS = (
    "event_id, occurred_at, tenant_id, user_id, extension_id, function, purpose, provider, model, is_byollm, "
    "status, billing_status, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, "
    "reasoning_tokens, charge_nanos, shadow_nanos, cost_nanos, latency_ms, invoice_period, cache_write_1h_tokens, "
    "web_searches"
)

POST_BATCH = f"""
WITH b AS MATERIALIZED (
    SELECT {_EVENT_COLUMNS}, replace(CAST(event_id AS text), '-', '') AS h
    FROM usage_events WHERE event_id = ANY(CAST(%(ids)s AS uuid[]))
), t AS MATERIALIZED (
    SELECT {_CHARGE_ID} AS id, event_id, invoice_period, '{_CHARGE}' AS kind,
           charge_nanos AS amount, {WALLET_ID_SQL.format(tenant="tenant_id", user="user_id")} AS debit,
           '{AccountKind.USER_WALLET.value}' AS debit_kind, tenant_id, user_id,
           '{REVENUE.id}' AS credit, '{REVENUE.kind.value}' AS credit_kind
    FROM b WHERE {_BILLED} AND charge_nanos > 0
    UNION ALL
    SELECT {_COST_ID}, event_id, invoice_period, '{_COST}', cost_nanos,
           'provider:' || provider || ':cost', '{AccountKind.PROVIDER_COST.value}', NULL, NULL,
           'provider:' || provider || ':payable', '{AccountKind.PROVIDER_PAYABLE.value}'
    FROM b WHERE {_BILLED} AND cost_nanos > 0
), posted AS (
    INSERT INTO transfers (id, debit_account_id, credit_account_id, amount_nanos, currency, kind, event_id,
                           period, created_at)
    SELECT id, debit, credit, amount, '{CURRENCY}', kind, event_id, invoice_period, %(now)s FROM t
), rolled AS (
    {_rollup_upsert("usage_rollups", KEY_COLUMNS, (_HOUR, *KEY_COLUMNS[1:]))}
){_COARSE}, balances AS (
    INSERT INTO accounts (id, kind, tenant_id, user_id, currency, balance_nanos, created_at)
    SELECT id, min(kind), min(tenant_id), min(user_id), '{CURRENCY}', sum(delta), %(now)s FROM (
        SELECT debit AS id, min(debit_kind) AS kind, min(tenant_id) AS tenant_id, min(user_id) AS user_id,
               -sum(amount) AS delta
        FROM t GROUP BY debit
        UNION ALL
        SELECT credit, min(credit_kind), NULL, NULL, sum(amount) FROM t GROUP BY credit
    ) d GROUP BY id ORDER BY id
    ON CONFLICT (id) DO UPDATE SET balance_nanos = accounts.balance_nanos + excluded.balance_nanos
)
SELECT count(*) FROM b
"""


def uuid_array(hex_ids: Iterable[str]) -> str:
    """UUIDs (32 hex each) as one PostgreSQL array literal, for a ``CAST(... AS uuid[])`` parameter: psycopg
    dumps a list of 1,000 ids element by element in Python, ~1-2 ms more per batch than this one string."""
    return "{" + ",".join(hex_ids) + "}"


def post_batch(connection: Any, event_ids: Collection[str], now: datetime) -> int:
    """Derive and write the transfers, balances and rollups of the just-stored events ``event_ids`` (32 hex;
    psycopg connection, in the batch's transaction); returns how many of those events it found."""
    with connection.cursor() as cursor:
        cursor.execute(POST_BATCH, {"ids": uuid_array(sorted(event_ids)), "now": now})
        row = cursor.fetchone()
    return int(row[0])
