"""Shared CLI plumbing: services per command, error rendering, tables."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import typer
from pydantic import TypeAdapter
from rich.console import Console, ConsoleDimensions
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
# Emoji codes off too: rich replaces ":thumbs_up:" by its emoji even with markup off (a tenant ":thumbs_up:-acme"
# was shown as "👍-acme").
# Piped (``| grep``, ``> file``, cron) with no COLUMNS, rich took 80 columns: a table was squeezed into them, its
# dates wrapped one character per line. Rows are for reading and grepping whole there: a width no table reaches.
PIPED_WIDTH = 1000


class _Console(Console):
    """A console whose width, when it writes to no terminal and COLUMNS is not set, is ``PIPED_WIDTH``; a terminal's
    own width (or COLUMNS) otherwise, where a table wraps its cells as documented."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal and not self._environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(PIPED_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


console = _Console(markup=False, emoji=False)
err_console = Console(stderr=True, markup=False, emoji=False, soft_wrap=True)  # an error is one line, however long


# C0 and C1 control characters (ESC starts terminal sequences: colours, a cleared screen, OSC 8 links, OSC 52
# clipboard writes; a newline or a tab breaks a cell) and the bidirectional overrides and isolates (text shown in
# another order than it is stored).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe for a terminal: each control or bidirectional-override character as its ``\\xNN`` /
    ``\\uNNNN`` escape (``"a\\x1b[2Jb"``), the rest as it is. Ids, names and models can come from a client (an
    ingest token) and are printed to an operator's terminal."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


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
    """One row per event. ``owners`` (``tenant``, ``user``, or both): shown first, a column each, when the events
    may be of several (a user id is unique only within its tenant; joined as ``tenant/user``, tenant ``a/b`` with
    user ``c`` and tenant ``a`` with user ``b/c`` read the same). The cache and search columns only when
    an event has some. Cells wrap rather than cut (``overflow="fold"``): an id is never shown as ``…``, and an
    amount stays on one line."""
    table = Table(title=title, title_justify="left")
    owner_columns = {"tenant": "tenant_id", "user": "user_id"}
    cached = any(row.cache_read_tokens or row.cache_write_tokens for row in rows)
    searched = any(row.web_searches for row in rows)
    columns = [*owners, "call", "purpose", "model", "llm", "status"]
    columns += ["in", "out", *(["cache r/w"] if cached else []), *(["searches"] if searched else []), "ms", "charge"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("in", "out", "searches", "ms") else "left")
    for row in rows:
        cells = [
            *(getattr(row, owner_columns[owner]) for owner in owners),
            f"{row.extension_id}.{row.function}#{row.call_index}",
            row.purpose,
            f"{row.provider}/{row.model}",
            "byollm" if row.is_byollm else "failover" if row.is_failover else "platform",
            _status(row),
            str(row.input_tokens),
            str(row.output_tokens),
        ]
        if cached:
            cells.append(
                f"{row.cache_read_tokens}/{row.cache_write_tokens}"
                + (f" ({row.cache_write_1h_tokens} 1h)" if row.cache_write_1h_tokens else "")
            )
        if searched:
            cells.append(str(row.web_searches or ""))
        table.add_row(*map(printable, cells), f"{row.latency_ms:.1f}", _amount(row))
    return fold(table, whole={"charge"})


def fold(table: Table, whole: Collection[str] = ()) -> Table:
    """``table`` with cells that wrap rather than cut (``overflow="fold"``): in a narrow terminal rich cut every
    cell to ``…``, an id (``tenant-ab…``) or an amount (``$0.00…``, a residue that is not zero) with it. The columns
    named in ``whole`` (amounts) stay on one line at their full width: the others are narrowed first.
    Call it once every row is added."""
    for column in table.columns:
        column.overflow = "fold"
        if column.header in whole:
            column.no_wrap = True
            column.min_width = max((len(str(cell)) for cell in column.cells), default=0)
    return table


def _status(row: Any) -> str:
    """The outcome, its error type, and how the token counts are known when the provider did not report them."""
    status = row.status + (f" ({row.error_type})" if row.error_type else "")
    return status if row.usage_completeness == "reported" else f"{status}, usage {row.usage_completeness}"


def _amount(row: Any) -> str:
    """The charge of a billed event; the shadow cost of a BYOLLM one, "unknown" while its model has no price;
    why nothing is charged otherwise."""
    if row.billing_status == "billed":
        return format_usd(row.charge_nanos)
    if row.billing_status == "unpriced":
        return "held: unpriced"
    if row.billing_status == "not_billable":
        return "not billable"
    if row.price_source is None:  # never priced: the shadow cost is unknown, not $0 (reprice fills it)
        return "no price (shadow)"
    return f"{format_usd(row.shadow_nanos)} (shadow)"


_TIME = TypeAdapter(datetime)


def api_time(value: datetime) -> str:
    """``value`` written as the API's JSON writes it (pydantic: ``2026-11-28T17:40:56.243392Z``), where
    ``isoformat()`` gives ``…+00:00``: the JSON a command prints as the API's answer holds the same text."""
    text: str = _TIME.dump_python(value, mode="json")
    return text


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
