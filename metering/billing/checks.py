"""Ledger and rollup invariants, proven against the database (run by `metering billing check` and tests).

1. The balances of all accounts sum to zero (every transfer debits and credits the same amount).
2. Each account's cached balance equals credits minus debits over its transfers.
3. Every transfer names existing accounts; every wallet is its (tenant, user)'s, and every usage charge debits
   the wallet of its event's tenant and user. Every transfer moves between the accounts its kind names: a usage
   charge to platform revenue, a provider cost from its event's provider's cost account to its payable one, a
   credit from top-ups to a wallet, an adjustment between adjustments and a wallet.
4. Per event, the net usage charge posted (charges minus their reversals) equals the event's charge_nanos, and
   the net provider cost posted its cost_nanos; an event that is not billed has a net charge and cost of zero.
   Every usage charge and provider cost (and every transfer naming an event) names a stored event, and every
   reversal mirrors the one transfer it reverses (same amount and event, accounts swapped; not a reversal), which
   it alone reverses: no money moves for an event the per-event sums cannot see.
   Every BYOLLM event is ``excluded_byollm`` (Policy A: never billed, whatever its other columns say). Every other
   event is ``not_billable`` exactly when Policy A rule 2 says (``metering.events.used_nothing``: a failed call whose
   usage is missing or reports neither tokens nor web searches); a failed call with searches stored ``not_billable``
   by an earlier version is named (``metering billing reprice`` decides it again).
5. The hourly rollups and the coarse rollups (platform per hour and day, users per day) equal a
   recomputation from the raw events (an independent GROUP BY in SQL).
6. Per finalized month and user, the net usage charge posted in that month (charges minus their reversals, late
   billings and re-rate corrections included) equals the total of the user's finalized invoice of it (0 without
   one): nothing charged in a closed month is on no invoice, and no invoice shows what the ledger did not charge.
7. Every finalized invoice shows what it stores: its lines add up to its total, and its rounded total and residue
   are that total rounded once, half-even, to cents, and the rest.

All of them read one snapshot of the database (``metering.db.snapshot.read_snapshot``), so they can run while
ingest commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.orm import Session

from metering.billing.batch_sql import WALLET_ID_SQL
from metering.billing.ledger import ADJUSTMENTS, PLATFORM_REVENUE, TOPUPS
from metering.billing.money import NANOS_PER_CENT, round_cents
from metering.billing.rollup import COARSE_ROLLUPS, COUNTER_COLUMNS, KEY_COLUMNS
from metering.db.snapshot import read_snapshot


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    accounts: int = 0
    transfers: int = 0
    rollups: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _scalar(session: Session, sql: str) -> Any:
    return session.execute(text(sql)).scalar()


def check_ledger(session: Session, report: CheckReport) -> None:
    report.accounts = _scalar(session, "SELECT count(*) FROM accounts") or 0
    report.transfers = _scalar(session, "SELECT count(*) FROM transfers") or 0
    total = _scalar(session, "SELECT coalesce(sum(balance_nanos), 0) FROM accounts")
    if total != 0:
        report.problems.append(f"account balances sum to {total} nanos, not 0")
    drifted = session.execute(
        text(
            "SELECT a.id, a.balance_nanos, coalesce(c.s, 0) - coalesce(d.s, 0) FROM accounts a "
            "LEFT JOIN (SELECT credit_account_id AS id, sum(amount_nanos) AS s FROM transfers "
            "GROUP BY credit_account_id) c ON c.id = a.id "
            "LEFT JOIN (SELECT debit_account_id AS id, sum(amount_nanos) AS s FROM transfers "
            "GROUP BY debit_account_id) d ON d.id = a.id "
            "WHERE a.balance_nanos <> coalesce(c.s, 0) - coalesce(d.s, 0)"
        )
    ).all()
    for account, cached, derived in drifted[:20]:
        report.problems.append(f"account {account}: cached balance {cached} != {derived} from transfers")
    orphans = _scalar(
        session,
        "SELECT count(*) FROM transfers t WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = t.debit_account_id)"
        " OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = t.credit_account_id)",
    )
    if orphans:
        report.problems.append(f"{orphans} transfers name an account that does not exist")
    for kind, column, name in (("usage_charge", "charge_nanos", "charge"), ("provider_cost", "cost_nanos", "cost")):
        for event_id, status, amount, net in session.execute(text(_NET_MISMATCHES.format(kind=kind, column=column))):
            report.problems.append(f"event {event_id} ({status}): {name} {amount} but {net} posted")
    byollm_billed = session.execute(
        text(
            "SELECT event_id, billing_status FROM usage_events WHERE is_byollm AND billing_status <> "
            "'excluded_byollm' ORDER BY event_id LIMIT 20"
        )
    ).all()
    for event_id, status in byollm_billed:
        report.problems.append(f"event {event_id} is a BYOLLM call but {status}, not excluded_byollm (Policy A)")
    for event_id, status, completeness, tokens, searches, billing in session.execute(text(_RULE_2_MISMATCHES)):
        event_id = uuid.UUID(str(event_id))  # SQLite hands back 32 hex digits
        usage = f"{status}, usage {completeness}, {tokens} tokens, {searches} web searches"
        if billing == "not_billable":
            report.problems.append(
                f"event {event_id} ({usage}) is not_billable, but Policy A bills a failed call for the usage it "
                "reports (`metering billing reprice` decides it again)"
            )
        else:
            report.problems.append(f"event {event_id} ({usage}) is {billing}, but Policy A does not bill it")
    check_event_transfers(session, report)
    check_wallets(session, report)
    check_transfer_accounts(session, report)
    check_invoices(session, report)


# Per event: the net amount of one transfer kind posted (those transfers minus their reversals) against the event's
# column for it (0 unless billed); at most 20 that differ.
_NET_MISMATCHES = (
    "SELECT e.event_id, e.billing_status, e.{column}, coalesce(n.net, 0) FROM usage_events e "
    "LEFT JOIN (SELECT t.event_id, sum(CASE WHEN r.id IS NULL THEN t.amount_nanos ELSE -t.amount_nanos END)"
    " AS net FROM transfers t LEFT JOIN transfers r ON t.kind = 'reversal' AND r.id = t.reverses_id "
    "  AND r.kind = '{kind}' "
    " WHERE t.event_id IS NOT NULL AND (t.kind = '{kind}' OR r.id IS NOT NULL) GROUP BY t.event_id) n"
    " ON n.event_id = e.event_id "
    "WHERE coalesce(n.net, 0) <> CASE WHEN e.billing_status = 'billed' THEN e.{column} ELSE 0 END "
    "ORDER BY e.event_id LIMIT 20"
)
# Transfers naming an event that is not stored, and usage charges or provider costs naming none; at most 20.
_EVENTLESS = (
    "SELECT t.id, t.kind, t.event_id FROM transfers t WHERE (t.event_id IS NULL AND t.kind IN ('usage_charge', "
    "'provider_cost')) OR (t.event_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM usage_events e "
    "WHERE e.event_id = t.event_id)) ORDER BY t.id LIMIT 20"
)
# Reversals that do not mirror the transfer they reverse (or reverse none, or a reversal); at most 20.
_UNMIRRORED = (
    "SELECT t.id, t.reverses_id, r.id, r.kind FROM transfers t LEFT JOIN transfers r ON r.id = t.reverses_id "
    "WHERE t.kind = 'reversal' AND (r.id IS NULL OR r.kind = 'reversal' OR r.amount_nanos <> t.amount_nanos"
    " OR r.debit_account_id <> t.credit_account_id OR r.credit_account_id <> t.debit_account_id"
    " OR (r.event_id IS NULL) <> (t.event_id IS NULL) OR r.event_id <> t.event_id) "
    "ORDER BY t.id LIMIT 20"
)
# Transfers reversed more than once; at most 20.
_REVERSED_TWICE = (
    "SELECT reverses_id, count(*) FROM transfers WHERE kind = 'reversal' AND reverses_id IS NOT NULL "
    "GROUP BY reverses_id HAVING count(*) > 1 ORDER BY reverses_id LIMIT 20"
)
# Events not BYOLLM whose not_billable status disagrees with Policy A rule 2 (metering.events.used_nothing in SQL).
_RULE_2_MISMATCHES = (
    "SELECT event_id, status, usage_completeness, input_tokens + output_tokens, web_searches, billing_status "
    "FROM usage_events WHERE NOT is_byollm AND (billing_status = 'not_billable') <> ("
    " status IN ('error', 'cancelled') AND (usage_completeness = 'missing'"
    "  OR (input_tokens = 0 AND output_tokens = 0 AND web_searches = 0))) "
    "ORDER BY event_id LIMIT 20"
)
# Per (tenant, user, finalized period): the net usage charge posted in it, and its finalized invoice's total.
_INVOICED = (
    "SELECT tenant_id, user_id, period, sum(charged), sum(invoiced) FROM ("
    " SELECT e.tenant_id, e.user_id, t.period,"
    "  CASE WHEN t.kind = 'usage_charge' THEN t.amount_nanos ELSE -t.amount_nanos END AS charged, 0 AS invoiced"
    " FROM transfers t JOIN usage_events e ON e.event_id = t.event_id"
    " LEFT JOIN transfers r ON t.kind = 'reversal' AND r.id = t.reverses_id AND r.kind = 'usage_charge'"
    " WHERE (t.kind = 'usage_charge' OR r.id IS NOT NULL) AND t.period IN (SELECT period FROM finalized_periods)"
    " UNION ALL"
    " SELECT tenant_id, user_id, period, 0, total_nanos FROM invoices WHERE status = 'finalized'"
    ") x GROUP BY tenant_id, user_id, period HAVING sum(charged) <> sum(invoiced) ORDER BY period, tenant_id, user_id"
)


# Finalized invoices whose lines do not add up to their total, or whose rounded total and residue are not that total
# rounded half-even to cents (a multiple of 10^7 nanos at most half a cent away, the even one on a tie) and the rest.
_INVOICE_ARITHMETIC = (
    "SELECT i.tenant_id, i.user_id, i.period, i.total_nanos, i.rounded_nanos, i.residue_nanos, coalesce(l.s, 0) "
    "FROM invoices i LEFT JOIN (SELECT invoice_id, sum(billed_nanos) AS s FROM invoice_lines GROUP BY invoice_id) l"
    " ON l.invoice_id = i.id "
    "WHERE i.status = 'finalized' AND (coalesce(l.s, 0) <> i.total_nanos"
    " OR i.rounded_nanos + i.residue_nanos <> i.total_nanos OR i.rounded_nanos % {cent} <> 0"
    " OR abs(i.residue_nanos) > {half} OR (abs(i.residue_nanos) = {half} AND (i.rounded_nanos / {cent}) % 2 <> 0)) "
    "ORDER BY i.period, i.tenant_id, i.user_id LIMIT 20"
).format(cent=NANOS_PER_CENT, half=NANOS_PER_CENT // 2)


def check_invoices(session: Session, report: CheckReport) -> None:
    """Each finalized month's invoices show exactly what the ledger charged each user in it (invariant 6), and each
    finalized invoice's lines, rounded total and residue agree with its total (invariant 7)."""
    for tenant, user, period, charged, invoiced in session.execute(text(_INVOICED)).all()[:20]:
        report.problems.append(
            f"period {period}, tenant {tenant!r}, user {user!r}: {int(charged)} nanos charged, {int(invoiced)} invoiced"
        )
    for tenant, user, period, total, rounded, residue, lines in session.execute(text(_INVOICE_ARITHMETIC)):
        who = f"finalized invoice {period}, tenant {tenant!r}, user {user!r}"
        if int(lines) != total:
            report.problems.append(f"{who}: its lines add up to {int(lines)} nanos, its total is {total}")
        right = round_cents(total)
        if (rounded, residue) != right:
            report.problems.append(
                f"{who}: total {total} nanos shown rounded to {rounded} with residue {residue}, not {right[0]} with "
                f"{right[1]} (once, half-even, to cents)"
            )


def _uuid(value: Any) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(str(value))  # SQLite hands back 32 hex digits


def check_event_transfers(session: Session, report: CheckReport) -> None:
    """Every transfer the per-event sums must see is seen: usage transfers name stored events, reversals mirror the
    transfer they reverse, once (invariant 4)."""
    for ident, kind, event_id in session.execute(text(_EVENTLESS)):
        named = f"names event {_uuid(event_id)}, which is not stored" if event_id is not None else "names no event"
        report.problems.append(f"transfer {_uuid(ident)} ({kind}) {named}")
    for ident, reverses, original, kind in session.execute(text(_UNMIRRORED)):
        if reverses is None or original is None:
            what = "reverses no transfer" if reverses is None else f"reverses {_uuid(reverses)}, which does not exist"
            report.problems.append(f"reversal {_uuid(ident)} {what}")
        elif kind == "reversal":
            report.problems.append(f"reversal {_uuid(ident)} reverses another reversal, {_uuid(original)}")
        else:
            report.problems.append(
                f"reversal {_uuid(ident)} does not mirror transfer {_uuid(original)} (the same amount between the "
                "same accounts, the other way, for the same event)"
            )
    for reverses, times in session.execute(text(_REVERSED_TWICE)):
        report.problems.append(f"transfer {_uuid(reverses)} is reversed {times} times")


def check_wallets(session: Session, report: CheckReport) -> None:
    """Each wallet is its (tenant, user)'s, and each usage charge debits the wallet of its event's (tenant, user)."""
    misnamed = session.execute(
        text(
            "SELECT id, tenant_id, user_id FROM accounts WHERE kind = 'user_wallet' AND id <> "
            + WALLET_ID_SQL.format(tenant="tenant_id", user="user_id")
        )
    ).all()
    for account, tenant, user in misnamed[:20]:
        report.problems.append(f"wallet {account} is not the wallet id of tenant {tenant!r}, user {user!r}")
    misrouted = session.execute(
        text(
            "SELECT t.id, t.debit_account_id, e.tenant_id, e.user_id FROM transfers t "
            "JOIN usage_events e ON e.event_id = t.event_id WHERE t.kind = 'usage_charge' AND t.debit_account_id <> "
            + WALLET_ID_SQL.format(tenant="e.tenant_id", user="e.user_id")
        )
    ).all()
    for transfer, debit, tenant, user in misrouted[:20]:
        report.problems.append(f"usage charge {transfer} debits {debit}, not the wallet of {tenant!r}/{user!r}")


# Usage charges credited elsewhere than to revenue; credits and adjustments between other accounts than theirs.
_MISBOOKED = (
    "SELECT t.id, t.kind, t.debit_account_id, t.credit_account_id FROM transfers t"
    " LEFT JOIN accounts d ON d.id = t.debit_account_id LEFT JOIN accounts c ON c.id = t.credit_account_id "
    f"WHERE (t.kind = 'usage_charge' AND t.credit_account_id <> '{PLATFORM_REVENUE}')"
    f" OR (t.kind = 'credit' AND (t.debit_account_id <> '{TOPUPS}' OR coalesce(c.kind, '') <> 'user_wallet'))"
    f" OR (t.kind = 'adjustment' AND NOT ((t.debit_account_id = '{ADJUSTMENTS}'"
    " AND coalesce(c.kind, '') = 'user_wallet')"
    f"  OR (t.credit_account_id = '{ADJUSTMENTS}' AND coalesce(d.kind, '') = 'user_wallet'))) "
    "ORDER BY t.id LIMIT 20"
)
# Provider costs not booked from their event's provider's cost account to its payable one, under the provider's stored
# spelling or in lowercase (as reprice and re-rate post an event stored before provider names were lowercased). SQL's
# lower() may differ from Python's outside ASCII: rows are candidates, confirmed in Python, read a page at a time by
# id (keyset), every page: a legacy spelling SQL cannot lowercase makes every cost of its events a candidate, and
# reading only the first 200 never saw a misbooking behind them.
_COST_PAIR = (  # ':' || 'cost', as text() would read ':cost' as a bind parameter
    "(t.debit_account_id = 'provider:' || {p} || ':' || 'cost'"
    " AND t.credit_account_id = 'provider:' || {p} || ':' || 'payable')"
)
_COST_PAGE = 200
_MISBOOKED_COSTS = (
    "SELECT t.id, t.event_id, e.provider, t.debit_account_id, t.credit_account_id FROM transfers t"
    " JOIN usage_events e ON e.event_id = t.event_id "
    f"WHERE t.kind = 'provider_cost' AND NOT ({_COST_PAIR.format(p='e.provider')}"
    f" OR {_COST_PAIR.format(p='lower(e.provider)')}){{after}} ORDER BY t.id LIMIT {_COST_PAGE}"
)


def check_transfer_accounts(session: Session, report: CheckReport) -> None:
    """Each transfer moves between the accounts its kind names (a usage charge's wallet: ``check_wallets``)."""
    for ident, kind, debit, credit in session.execute(text(_MISBOOKED)):
        if kind == "usage_charge":
            wrong = f"credits {credit}, not {PLATFORM_REVENUE}"
        elif kind == "credit":
            wrong = f"debits {debit}, not {TOPUPS}" if debit != TOPUPS else f"credits {credit}, not a user's wallet"
        else:
            wrong = f"moves {debit} -> {credit}, not between {ADJUSTMENTS} and a user's wallet"
        report.problems.append(f"transfer {_uuid(ident)} ({kind}) {wrong}")
    misbooked = 0
    for ident, event_id, provider, debit, credit in _cost_candidates(session):
        if any(
            (debit, credit) == (f"provider:{p}:cost", f"provider:{p}:payable") for p in (provider, provider.lower())
        ):
            continue
        misbooked += 1
        report.problems.append(
            f"transfer {_uuid(ident)} (provider_cost) of event {_uuid(event_id)} moves {debit} -> {credit}, not "
            f"provider:{provider.lower()}:cost -> provider:{provider.lower()}:payable"
        )
        if misbooked == 20:
            return


def _cost_candidates(session: Session) -> Iterator[Row[Any, Any, str, str, str]]:
    """Every candidate of ``_MISBOOKED_COSTS``, ``_COST_PAGE`` rows held at a time."""
    page = session.execute(text(_MISBOOKED_COSTS.format(after=""))).all()
    while page:
        yield from page
        if len(page) < _COST_PAGE:
            return
        after = text(_MISBOOKED_COSTS.format(after=" AND t.id > :after"))
        page = session.execute(after, {"after": page[-1][0]}).all()


_RECOMPUTED = (
    "SELECT {time_expr} AS t, {keys}, count(*) AS calls, sum(input_tokens) AS input_tokens, "
    "sum(output_tokens) AS output_tokens, sum(cache_read_tokens) AS cache_read_tokens, "
    "sum(cache_write_tokens) AS cache_write_tokens, sum(reasoning_tokens) AS reasoning_tokens, "
    "sum(charge_nanos) AS billed_nanos, sum(shadow_nanos) AS shadow_nanos, sum(cost_nanos) AS cost_nanos, "
    "sum({latency}) AS latency_us_sum, sum(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS error_count, "
    "sum(CASE WHEN billing_status = 'unpriced' THEN 1 ELSE 0 END) AS unpriced_count, "
    "sum(cache_write_1h_tokens) AS cache_write_1h_tokens, sum(web_searches) AS web_searches "
    "FROM usage_events GROUP BY {time_expr}, {keys}"
)
# (table, its time column, its other key columns), the time column holding the hour or the UTC day
_ROLLUPS = (("usage_rollups", "hour", KEY_COLUMNS[1:]), *((r.table, r.grain, r.dimensions) for r in COARSE_ROLLUPS))


def _time_expressions(postgresql: bool) -> dict[str, str]:
    if postgresql:
        return {
            "hour": "date_trunc('hour', occurred_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
            "day": "CAST(occurred_at AT TIME ZONE 'UTC' AS DATE)",
        }
    return {"hour": "strftime('%Y-%m-%d %H:00:00.000000', occurred_at)", "day": "substr(occurred_at, 1, 10)"}


def _normal(key: tuple[Any, ...], chars: int, flag: int | None) -> tuple[Any, ...]:
    """A rollup key in one form on both backends (SQLite hands back text moments and dates, 0/1 flags):
    the time as text cut to ``chars``, the value at ``flag`` (is_byollm) as a bool."""
    values = [str(key[0])[:chars], *key[1:]]
    if flag is not None:
        values[flag] = bool(values[flag])
    return tuple(values)


def check_rollups(session: Session, report: CheckReport) -> None:
    """Every rollup table equals an independent GROUP BY of the raw events (rows emptied by corrections, all
    counters zero, count as absent)."""
    postgresql = session.get_bind().dialect.name == "postgresql"
    times = _time_expressions(postgresql)
    latency = (
        "CAST(floor(latency_ms * 1000 + 0.5) AS BIGINT)" if postgresql else "CAST(latency_ms * 1000 + 0.5 AS INTEGER)"
    )
    for table, time_column, keys in _ROLLUPS:
        sql = _RECOMPUTED.format(time_expr=times[time_column], keys=", ".join(keys), latency=latency)
        columns = (time_column, *keys, *COUNTER_COLUMNS)
        width = 1 + len(keys)
        chars = 19 if time_column == "hour" else 10
        flag = 1 + keys.index("is_byollm") if "is_byollm" in keys else None
        stored = {
            _normal(tuple(row[:width]), chars, flag): tuple(row[width:])
            for row in session.execute(text(f"SELECT {', '.join(columns)} FROM {table}")).all()
        }
        fresh = {
            _normal(tuple(row[:width]), chars, flag): tuple(row[width:]) for row in session.execute(text(sql)).all()
        }
        if table == "usage_rollups":
            report.rollups = len(stored)
        stored = {k: v for k, v in stored.items() if any(v)}
        problems = 0
        for key in sorted(set(stored) | set(fresh), key=str):
            if stored.get(key) != fresh.get(key):
                report.problems.append(f"{table} {key[:3]}...: stored {stored.get(key)} != recomputed {fresh.get(key)}")
                problems += 1
                if problems > 20:
                    break


def run_checks(session: Session) -> CheckReport:
    """Every invariant, read from one snapshot when the checks begin the session's transaction."""
    read_snapshot(session)
    report = CheckReport()
    check_ledger(session, report)
    check_rollups(session, report)
    return report
