"""Commands for prices and money: overrides, credits, balances, reprice of held events, re-rate.

Money on the command line is USD as a decimal string (never a float); prices are $ per 1M tokens;
moments are ISO 8601 (a moment without a timezone is UTC; a bare date is its midnight UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from metering import audit_snapshots as snap
from metering.billing import credits, overrides
from metering.billing.money import decimal_text, format_usd, plain_decimal
from metering.billing.pricing import MAX_CALL_NANOS
from metering.billing.reprice import reprice_held
from metering.billing.rerate import DiffLine, RerateResult, apply_rerate, plan_rerate
from metering.cli import audit_trail
from metering.cli.common import admin_session, api_time, console, fail, fold, print_json, printable
from metering.config import Settings
from metering.db.models import PriceOverrideRow
from metering.events import to_utc

overrides_app = typer.Typer(help="Admin price overrides: provider + model glob, effective-dated, $/Mtok.")
credit_app = typer.Typer(help="Credits, top-ups and manual adjustments (idempotent per key).")


def _decimal(name: str, value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        return plain_decimal(value.strip())
    except ValueError as exc:
        raise fail(f"{name} {value!r}: {exc}") from None


def _moment(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise fail(f"{name} must be an ISO 8601 date or moment, not {value!r}") from None
    try:
        return to_utc(parsed)  # as the API does: a moment whose UTC value overflows is refused, not a traceback
    except ValueError as exc:
        raise fail(f"{name} {value!r}: {exc}") from None


def _usd_per_mtok(nanos: int | None) -> str | None:
    return None if nanos is None else format(Decimal(nanos).scaleb(-9), "f")  # "20.000000000", never "2E+1"


def _override_view(row: PriceOverrideRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "provider": row.provider,
        "model_pattern": row.model_pattern,
        "effective_from": api_time(row.effective_from),
        "effective_to": None if row.effective_to is None else api_time(row.effective_to),
        "input_usd_per_mtok": _usd_per_mtok(row.input_nanos_per_mtok),
        "output_usd_per_mtok": _usd_per_mtok(row.output_nanos_per_mtok),
        "cache_read_usd_per_mtok": _usd_per_mtok(row.cache_read_nanos_per_mtok),
        "cache_write_usd_per_mtok": _usd_per_mtok(row.cache_write_nanos_per_mtok),
        "cache_write_1h_usd_per_mtok": _usd_per_mtok(row.cache_write_1h_nanos_per_mtok),
        "web_search_usd_per_k": _usd_per_mtok(row.web_search_nanos_per_k),
        "markup_pct": row.markup_pct,
        "note": row.note,
        "created_at": api_time(row.created_at),
        "withdrawn": overrides.is_withdrawn(row),
    }


@overrides_app.command("add")
def overrides_add(
    provider: Annotated[str, typer.Option(help="e.g. openai_compatible, anthropic, ollama")],
    model: Annotated[str, typer.Option(help="Model name or glob, e.g. 'llama3*'.")],
    input_price: Annotated[str, typer.Option("--input", help="$ per 1M input tokens, e.g. 0.15")],
    output_price: Annotated[str, typer.Option("--output", help="$ per 1M output tokens")],
    start: Annotated[str | None, typer.Option("--from", help="Effective from (default: now).")] = None,
    end: Annotated[str | None, typer.Option("--to", help="Effective until (exclusive; default: open).")] = None,
    cache_read: Annotated[str | None, typer.Option(help="$ per 1M cache-read tokens (default: input)")] = None,
    cache_write: Annotated[str | None, typer.Option(help="$ per 1M cache-write tokens (default: input)")] = None,
    cache_write_1h: Annotated[
        str | None, typer.Option("--cache-write-1h", help="$ per 1M 1-hour cache-write tokens (default: cache-write)")
    ] = None,
    web_search: Annotated[
        str | None,
        typer.Option(help="$ per 1,000 web searches (default: none; a call with searches stays unpriced)"),
    ] = None,
    markup: Annotated[str | None, typer.Option(help="Markup percent for this price (default: platform's)")] = None,
    note: Annotated[str | None, typer.Option()] = None,
    override_id: Annotated[str | None, typer.Option("--id", help="Default: generated.")] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="E.g. a UUID, shared with the API's Idempotency-Key: run again with it and the same request, it "
            "prints the first override ('replayed': true) and adds nothing; with another request it is refused. Not "
            "with --id (an id already makes it safe to run again).",
        ),
    ] = None,
) -> None:
    """Add a price override. Past events priced before it are changed only by `rerate` / `reprice`. Safe to run
    again with --idempotency-key or --id (without --from, a retry takes the first run's start)."""
    with admin_session() as (session, _box):
        adding = overrides.add(
            session,
            provider=provider,
            model_pattern=model,
            effective_from=_moment("--from", start),  # None: now, or the start of the override a retry finds
            effective_to=_moment("--to", end),
            input_mtok=_decimal("--input", input_price),  # type: ignore[arg-type]
            output_mtok=_decimal("--output", output_price),  # type: ignore[arg-type]
            cache_read_mtok=_decimal("--cache-read", cache_read),
            cache_write_mtok=_decimal("--cache-write", cache_write),
            cache_write_1h_mtok=_decimal("--cache-write-1h", cache_write_1h),
            web_search_per_k=_decimal("--web-search", web_search),
            markup_pct=_decimal("--markup", markup),
            note=note,
            id=override_id,
            idempotency_key=idempotency_key,
        )
        row = adding.row
        if not adding.replayed:  # a replay (the first run's override) added nothing: not audited, as in the API
            target, after = snap.override_target(row.id), snap.override_snapshot(row)
            audit_trail.record(session, "price_override.add", target, before=None, after=after)
        print_json({**_override_view(row), "replayed": adding.replayed})


@overrides_app.command("list")
def overrides_list(
    provider: Annotated[str | None, typer.Option()] = None,
    active: Annotated[bool, typer.Option("--active", help="Only overrides in effect now.")] = False,
) -> None:
    """List price overrides."""
    with admin_session() as (session, _box):
        rows = overrides.list_overrides(session, provider=provider, active_at=datetime.now(UTC) if active else None)
        print_json([_override_view(row) for row in rows])


KeepPricedEvents = Annotated[
    bool,
    typer.Option(
        "--keep-priced-events",
        help="End it although it priced billed events at or after the end: they keep its price until you "
        "re-rate them (the output's events_to_rerate says how). Without it such an end is refused.",
    ),
]


@overrides_app.command("end")
def overrides_end(
    override_id: Annotated[str, typer.Argument(help="The override's id.")],
    at: Annotated[
        str | None, typer.Option(help="End moment, exclusive (default: now). At its start: withdrawn.")
    ] = None,
    keep_priced_events: KeepPricedEvents = False,
) -> None:
    """End an override (it is kept, so past prices stay reproducible)."""
    end_at = _moment("--at", at) or datetime.now(UTC)
    with admin_session() as (session, _box):
        before = snap.override_snapshot(overrides.get_for_change(session, override_id))
        ending = overrides.end(session, override_id, end_at, keep_priced_events=keep_priced_events)
        _audit_end(session, before, ending)
        print_json(_ended_view(ending))


@overrides_app.command("withdraw")
def overrides_withdraw(
    override_id: Annotated[str, typer.Argument(help="The override's id.")],
    keep_priced_events: KeepPricedEvents = False,
) -> None:
    """Withdraw an override scheduled by mistake: end it at its start (an empty window), so it prices nothing, before
    or after it started. It stays listed; billed events it priced refuse it unless --keep-priced-events."""
    with admin_session() as (session, _box):
        before = snap.override_snapshot(overrides.get_for_change(session, override_id))
        ending = overrides.withdraw(session, override_id, keep_priced_events=keep_priced_events)
        _audit_end(session, before, ending)
        print_json(_ended_view(ending))


def _audit_end(session: Session, before: snap.Snapshot | None, ending: overrides.Ending) -> None:
    if ending.changed:  # ending it when it already ends then: nothing changed, nothing audited
        target, after = snap.override_target(ending.row.id), snap.override_snapshot(ending.row)
        audit_trail.record(session, snap.override_end_action(ending.row), target, before=before, after=after)


def _ended_view(ending: overrides.Ending) -> dict[str, Any]:
    beyond, row = ending.priced_beyond, ending.row
    to_rerate = None
    if beyond.first is not None and beyond.last is not None:
        to_rerate = {
            "billed": beyond.billed,
            "byollm": beyond.byollm,
            "first_occurred_at": api_time(beyond.first),
            "last_occurred_at": api_time(beyond.last),
            "rerate": beyond.rerate_command(row.model_pattern),
        }
    return {**_override_view(row), "events_to_rerate": to_rerate}


@credit_app.command("add")
def credit_add(
    tenant: Annotated[str, typer.Option("--tenant", "-t")],
    user: Annotated[str, typer.Option("--user", "-u")],
    amount: Annotated[str, typer.Option(help="USD, e.g. 25 or 12.50 (negative only with --adjustment).")],
    key: Annotated[str, typer.Option(help="Idempotency key: repeating it returns the first result.")],
    adjustment: Annotated[bool, typer.Option("--adjustment", help="A manual adjustment, not a credit.")] = False,
    memo: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Credit a user's wallet (or adjust it either way), once per idempotency key."""
    with admin_session() as (session, _box):
        result = credits.add_credit(
            session,
            tenant_id=tenant,
            user_id=user,
            amount=_decimal("--amount", amount),  # type: ignore[arg-type]
            idempotency_key=key,
            kind="adjustment" if adjustment else "credit",
            memo=memo,
        )
        if not result.replayed:  # a replay of the key posted nothing: not audited, as in the API
            target = snap.user_target(result.tenant_id, result.user_id)
            after = snap.credit_snapshot(result)
            audit_trail.record(
                session, snap.credit_action(result), target, before=None, after=after, tenant_id=result.tenant_id
            )
        print_json(
            {
                "transfer_id": str(result.transfer_id),
                "kind": result.kind,
                "tenant_id": result.tenant_id,
                "user_id": result.user_id,
                "amount": decimal_text(result.amount_nanos),  # as the API returns it (a decimal, no "$" or ",")
                "amount_nanos": result.amount_nanos,
                "idempotency_key": result.idempotency_key,
                "memo": result.memo,
                "created_at": api_time(result.created_at),
                "replayed": result.replayed,
            }
        )


def balances_cmd(tenant: Annotated[str | None, typer.Option("--tenant", "-t")] = None) -> None:
    """Cached account balances (credits minus debits), optionally of one tenant's users."""
    with admin_session() as (session, _box):
        rows = credits.balances(session, tenant)
    table = Table(title="Balances" + (f" of tenant {printable(tenant)}" if tenant else ""), title_justify="left")
    for column, justify in (("account", "left"), ("kind", "left"), ("balance", "right"), ("nanos", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for account, kind, nanos in rows:
        table.add_row(printable(account), kind, format_usd(nanos), str(nanos))
    table.add_section()
    total = sum(nanos for _, _, nanos in rows)
    table.add_row("total", "", format_usd(total), str(total))
    console.print(fold(table, whole=("balance", "nanos")))


def reprice_cmd() -> None:
    """Price held (`unpriced`) events with the current price book (after adding an override)."""
    markup = Settings().billing.markup_pct
    with admin_session() as (session, _box):
        result = reprice_held(session, markup_pct=markup)
        if result.priced or result.shadow_priced or result.searches_redecided:  # nothing changed: no entry
            after = snap.reprice_snapshot(result)
            audit_trail.record(session, "billing.reprice", "events:held", before=None, after=after)
    console.print(
        f"priced {result.priced} held event(s) ({format_usd(result.charge_nanos)} charged, "
        f"{format_usd(result.cost_nanos)} provider cost); {result.still_unpriced} still unpriced"
    )
    if result.still_unpriced:
        console.print(
            "an override prices only the events that occurred while it is effective (`overrides add --from`, "
            "default now); `metering usage` shows the held events"
        )
    if result.searches_redecided:
        console.print(
            f"{result.searches_redecided} failed call(s) whose usage reports web searches, stored not_billable by an "
            "earlier version, decided again (billed, or held until their searches have a price)"
        )
    if result.shadow_priced or result.shadow_unpriced:
        console.print(
            f"BYOLLM (never billed): shadow cost of {result.shadow_priced} event(s) now known "
            f"({format_usd(result.shadow_nanos)}); {result.shadow_unpriced} still without a price"
        )
    if result.over_limit:
        console.print(
            f"{result.over_limit} held event(s) kept held: the current prices put them above "
            f"{format_usd(MAX_CALL_NANOS)} for one call (check their token counts and the override)"
        )


def _diff_table(title: str, lines: dict[Any, DiffLine], *key_names: str) -> Table:
    """One row per key; a (tenant, user) key in a column each: joined as ``tenant/user``, tenant ``a/b`` with user
    ``c`` and tenant ``a`` with user ``b/c`` were two rows both named ``a/b/c``."""
    table = Table(title=title, title_justify="left")
    for key_name in key_names:
        table.add_column(key_name)
    for column in ("events", "old charge", "new charge", "delta", "cost delta"):
        table.add_column(column, justify="right")
    for key in sorted(lines, key=lambda k: k if isinstance(k, tuple) else (k,)):
        line = lines[key]
        table.add_row(
            *map(printable, key if isinstance(key, tuple) else (str(key),)),
            str(line.events),
            format_usd(line.old_charge_nanos),
            format_usd(line.new_charge_nanos),
            format_usd(line.charge_delta),
            format_usd(line.cost_delta),
        )
    return fold(table, whole=("old charge", "new charge", "delta", "cost delta"))


def _print_rerate(result: RerateResult) -> None:
    diff = result.diff
    console.print(_diff_table("Per user", diff.by_user, "tenant", "user"))
    console.print(_diff_table("Per extension", diff.by_extension, "extension"))
    total = diff.total
    console.print(
        f"{diff.examined} billed event(s) in [{api_time(result.start)}, {api_time(result.end)}): "
        f"{total.events} changed ({format_usd(total.old_charge_nanos)} -> {format_usd(total.new_charge_nanos)}, "
        f"delta {format_usd(total.charge_delta)}), {diff.unpriceable} without a current price (left as they are)"
    )
    shadow = diff.shadow
    if shadow.examined:
        console.print(
            f"{shadow.examined} BYOLLM event(s) (never billed) with a shadow cost: {shadow.events} changed "
            f"({format_usd(shadow.old_nanos)} -> {format_usd(shadow.new_nanos)}), {shadow.unpriceable} without a "
            "current price (left as they are)"
        )
    if not result.applied:
        if result.late_corrections:
            console.print(
                f"{result.late_corrections} correction(s) would be posted after a finalized invoice: in the user's "
                "first open month, as correction lines of its invoice (a finalized invoice never changes)"
            )
        console.print("dry run: nothing changed. Apply with --apply --run-id <ID>.")
        return
    console.print(
        f"run {result.run_id or ''}: {result.transfers} transfer(s) posted, {result.skipped} event(s) already "
        f"corrected by this run, {result.late_corrections} correction(s) posted after a finalized invoice, "
        f"{result.relabelled} event(s) re-labelled (the same charge, now from another price)"
    )


def rerate_cmd(
    start: Annotated[str, typer.Option("--from", help="Window start (occurred_at >= this).")],
    end: Annotated[str, typer.Option("--to", help="Window end (occurred_at < this).")],
    provider: Annotated[str | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option(help="Model name or glob.")] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Post the corrections (default: dry run).")] = False,
    run_id: Annotated[str | None, typer.Option(help="Required with --apply; re-applying a run does nothing.")] = None,
) -> None:
    """Re-rate billed events of a window with the current prices: a dry-run diff, or reversals + new transfers."""
    if apply and not run_id:
        raise fail("--apply needs --run-id (it makes the re-rate idempotent)")
    window = {"start": _moment("--from", start), "end": _moment("--to", end)}
    scope: dict[str, Any] = {**window, "provider": provider, "model_pattern": model}
    markup = Settings().billing.markup_pct
    with admin_session() as (session, _box):
        if apply:
            result = apply_rerate(session, **scope, markup_pct=markup, run_id=run_id)  # type: ignore[arg-type]
            # a re-applied run changes nothing: no entry; BYOLLM shadow costs moved without a transfer are a change,
            # and so are events re-labelled (the same charge, now from another price: their price source changed)
            if result.diff.total.events or result.transfers or result.diff.shadow.events or result.relabelled:
                after = snap.rerate_snapshot(result)
                audit_trail.record(session, "billing.rerate", f"rerate:{run_id}", before=None, after=after)
        else:
            result = plan_rerate(session, **scope, markup_pct=markup)
    _print_rerate(result)


def register(app: typer.Typer) -> None:
    """Add these commands to ``app`` (e.g. the ``billing`` group): overrides, credit, balances, reprice, rerate."""
    app.add_typer(overrides_app, name="overrides")
    app.add_typer(credit_app, name="credit")
    app.command("balances")(balances_cmd)
    app.command("reprice")(reprice_cmd)
    app.command("rerate")(rerate_cmd)
