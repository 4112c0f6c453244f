"""Shared CLI plumbing: services per command, error rendering, tables."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from metering.billing.money import format_usd
from metering.config import Settings
from metering.db.models import UsageEventRow
from metering.errors import MeteringError
from metering.wiring import Services, open_services

T = TypeVar("T")
# Markup off: ids, names, models and LLM output are printed as they are ("[/x]" as a tenant id used to crash a
# table). A message with markup of its own says so (``markup=True``) and escapes what it interpolates.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False, soft_wrap=True)  # an error is one line, however long


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    return typer.Exit(code)


@contextmanager
def services() -> Iterator[Services]:
    """Open everything a command needs; drain the spool into the database on the way out."""
    try:
        svc = open_services(Settings())
    except MeteringError as exc:
        raise fail(exc.message) from None
    try:
        yield svc
    except MeteringError as exc:
        raise fail(f"{exc.message} [{exc.code}]") from None
    finally:
        svc.close(drain=svc.drain_on_close)


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(_run(factory))


async def _run(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


def usage_table(rows: Sequence[UsageEventRow], title: str = "Recorded usage", *, owners: Sequence[str] = ()) -> Table:
    """One row per event; ``owners`` (of ``tenant``, ``user``, ``extension``) first, when the events may be of
    several (a user id is unique only within its tenant)."""
    table = Table(title=title, title_justify="left")
    owner_columns = {"tenant": "tenant_id", "user": "user_id", "extension": "extension_id"}
    for column in (
        *owners,
        "#",
        "function",
        "purpose",
        "provider",
        "model",
        "byollm",
        "failover",
        "status",
        "in",
        "cache r/w",
        "out",
        "searches",
        "usage",
        "latency ms",
        "billing",
        "charge $",
    ):
        right = column in ("#", "in", "out", "searches", "latency ms", "charge $")
        table.add_column(column, justify="right" if right else "left")
    for row in rows:
        table.add_row(
            *(getattr(row, owner_columns[owner]) for owner in owners),
            str(row.call_index),
            row.function,
            row.purpose,
            row.provider,
            row.model,
            "yes" if row.is_byollm else "no",
            "yes" if row.is_failover else "",
            row.status + (f" ({row.error_type})" if row.error_type else ""),
            str(row.input_tokens),
            f"{row.cache_read_tokens}/{row.cache_write_tokens}"
            + (f" ({row.cache_write_1h_tokens} 1h)" if row.cache_write_1h_tokens else ""),
            str(row.output_tokens),
            str(row.web_searches or ""),
            row.usage_completeness,
            f"{row.latency_ms:.1f}",
            row.billing_status,
            _amount(row),
        )
    return table


def _amount(row: Any) -> str:
    """The charge of a billed event; the shadow cost of a BYOLLM one, "unknown" while its model has no price."""
    if row.billing_status != "excluded_byollm":
        return format_usd(row.charge_nanos if row.billing_status == "billed" else row.shadow_nanos)
    if row.price_source is None:  # never priced: the shadow cost is unknown, not $0 (reprice fills it)
        return "unknown (shadow: no price)"
    return f"{format_usd(row.shadow_nanos)} (shadow)"


def print_json(value: Any) -> None:
    console.print_json(data=value, default=str)


def read_secret(value: str | None, prompt: str) -> str | None:
    """A secret from the option, else from stdin when piped, else from a hidden prompt."""
    if value:
        return value
    if not sys.stdin.isatty():
        data = sys.stdin.readline().strip()
        return data or None
    return typer.prompt(prompt, hide_input=True, default="", show_default=False) or None


@contextmanager
def admin_session() -> Iterator[tuple[Any, Any]]:
    """A migrated database session and the secret box; commits when the command succeeds."""
    from metering.crypto import secret_box_from_settings
    from metering.db import migrate
    from metering.db.engine import make_engine, make_session_factory

    settings = Settings()
    try:
        migrate.upgrade(settings.resolved_database_url)
        box = secret_box_from_settings(settings)
    except MeteringError as exc:
        raise fail(exc.message) from None
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            try:
                yield session, box
                session.commit()
            except MeteringError as exc:
                session.rollback()
                raise fail(f"{exc.message} [{exc.code}]") from None
    finally:
        engine.dispose()
