"""Commands for monthly invoices and the period's ledger export."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from metering import audit_snapshots as snap
from metering.billing import invoice_store
from metering.billing.export import invoice_csv, ledger_csv_chunks
from metering.billing.invoices import Invoice
from metering.billing.money import format_usd
from metering.cli import audit_trail
from metering.cli.common import admin_session, api_time, console, err_console, fail, fold, printable
from metering.config import Settings
from metering.db.snapshot import read_snapshot

invoices_app = typer.Typer(
    help="Monthly invoices: drafts while the period is open (plus a grace period), then finalized and immutable.",
    no_args_is_help=True,
)

PeriodArg = Annotated[str, typer.Argument(help="Billing period, YYYY-MM (a calendar month in UTC).")]
OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="Write the CSV here (default: stdout).")]


def _summary_table(invoices: list[Invoice]) -> Table:
    table = Table(title=f"{len(invoices)} invoice(s)", title_justify="left")
    for column in ("period", "tenant", "user", "status", "lines", "calls", "total", "rounded", "residue"):
        table.add_column(
            column, justify="right" if column in ("lines", "calls", "total", "rounded", "residue") else "left"
        )
    for inv in invoices:
        table.add_row(
            inv.period,
            printable(inv.tenant_id),
            printable(inv.user_id),
            inv.status,
            str(len(inv.lines)),
            str(inv.calls),
            format_usd(inv.total_nanos),
            format_usd(inv.rounded_nanos),
            format_usd(inv.residue_nanos),
        )
    return fold(table, whole=("total", "rounded", "residue"))


def _invoice_table(inv: Invoice) -> Table:
    when = f", finalized {api_time(inv.finalized_at)}" if inv.finalized_at else ""
    table = Table(
        title=f"Invoice {inv.period} · {printable(inv.tenant_id)} / {printable(inv.user_id)} · {inv.status}{when}",
        title_justify="left",
    )
    for column in ("extension", "model", "late", "calls", "amount"):
        table.add_column(column, justify="right" if column in ("calls", "amount") else "left")
    for line in inv.lines:
        late = f"re-rate of {line.correction_of}" if line.correction_of else "late" if line.is_late else ""
        cells = (printable(line.extension_id), printable(line.model), late, str(line.calls))
        table.add_row(*cells, format_usd(line.billed_nanos))
    table.add_section()
    table.add_row("total", "", "", str(inv.calls), format_usd(inv.total_nanos))
    table.add_row("total (rounded to cents, half-even)", "", "", "", format_usd(inv.rounded_nanos))
    table.add_row("rounding residue", "", "", "", format_usd(inv.residue_nanos))
    return fold(table, whole=("amount",))


def _write(chunks: Iterable[str], out: Path | None) -> None:
    """Write the text, a chunk at a time, to ``out`` (else stdout). A new or regular file appears whole or not at
    all: it is written beside ``out`` and renamed once complete (a failure midway leaves no short export behind).
    Anything else is written through, as it is: a device or a pipe (``-o /dev/stdout``, ``-o >(gzip > x.gz)``;
    renamed over, ``/dev/stdout`` itself was replaced by a file, as root) or a symlink (its target is written)."""
    if out is None:  # the bytes a file gets: click's echo strips ANSI sequences (cells of clients) when not a tty
        sys.stdout.flush()
        stdout = sys.stdout.buffer
        for chunk in chunks:
            stdout.write(chunk.encode("utf-8"))
        stdout.flush()
        return
    try:
        if out.is_symlink() or (out.exists() and not out.is_file()):
            with out.open("w", encoding="utf-8", newline="") as file:
                file.writelines(chunks)
        else:
            _replace_whole(chunks, out)
    except OSError as exc:  # no such directory, a directory, no permission, disk full
        raise fail(f"cannot write {out}: {exc.strerror or exc}") from None
    err_console.print(f"wrote {out}", highlight=False)  # stderr: with -o /dev/stdout, stdout is the CSV alone


def _replace_whole(chunks: Iterable[str], out: Path) -> None:
    partial = out.with_name(f".{out.name}.partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as file:
            file.writelines(chunks)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)


@invoices_app.command("list")
def list_command(
    period: Annotated[str | None, typer.Option("--period", "-p", help="Only this period (YYYY-MM).")] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant.")] = None,
) -> None:
    """List invoices: finalized ones, and drafts of every user with billed usage."""
    with admin_session() as (session, _box):
        read_snapshot(session)
        console.print(_summary_table(invoice_store.list_invoices(session, period=period, tenant_id=tenant)))


@invoices_app.command("show")
def show_command(
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    user: Annotated[str, typer.Argument(help="User id.")],
    period: PeriodArg,
) -> None:
    """Show one invoice (the draft as of now, unless it is finalized); none without billed usage in the period."""
    with admin_session() as (session, _box):
        read_snapshot(session)
        invoice = invoice_store.existing_invoice(session, tenant, user, period)
    console.print(_invoice_table(invoice))


@invoices_app.command("finalize")
def finalize_command(
    period: PeriodArg,
    force: Annotated[
        bool, typer.Option("--force", help="Finalize even inside the grace period (never a month that has not begun).")
    ] = False,
) -> None:
    """Finalize a period's invoices (after its end plus the grace period). Running it again changes nothing."""
    grace = timedelta(hours=Settings().billing.invoice_grace_hours)
    with admin_session() as (session, _box):
        done = invoice_store.finalize(session, period, datetime.now(UTC), grace, force=force)
        issued = done.issued
        if issued or done.closed_now:  # running it again (or after a concurrent run) changes nothing: no entry
            after = snap.finalize_snapshot(period, issued, forced=force)
            before = {"period": period, "closed": not done.closed_now}
            audit_trail.record(session, "invoices.finalize", f"period:{period}", before=before, after=after)
    total = sum(inv.rounded_nanos for inv in issued)
    console.print(f"finalized {len(issued)} invoice(s) of {period}, {format_usd(total)} in all", highlight=False)


@invoices_app.command("export")
def export_command(
    tenant: Annotated[str, typer.Argument(help="Tenant id.")],
    user: Annotated[str, typer.Argument(help="User id.")],
    period: PeriodArg,
    out: OutOption = None,
) -> None:
    """Export one invoice as CSV (exact amounts; total, rounded total and residue rows at the end)."""
    with admin_session() as (session, _box):
        read_snapshot(session)
        text = invoice_csv(invoice_store.existing_invoice(session, tenant, user, period))
    _write((text,), out)


def ledger_export_command(period: PeriodArg, out: OutOption = None) -> None:
    """Export every ledger transfer of a period as CSV, in posting order."""
    with admin_session() as (session, _box):
        _write(ledger_csv_chunks(session, period), out)
