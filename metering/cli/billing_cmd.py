"""``metering billing``: balances, invoices, credits, price overrides, repricing, re-rating, checks."""

from __future__ import annotations

import typer
from rich.markup import escape

from metering.billing.checks import run_checks
from metering.cli.billing_invoices import invoices_app, ledger_export_command
from metering.cli.billing_ledger import register as register_ledger_commands
from metering.cli.common import admin_session, console

billing_app = typer.Typer(help="Prices, the ledger, invoices and their invariants.", no_args_is_help=True)
billing_app.add_typer(invoices_app, name="invoices")
billing_app.command("ledger-export")(ledger_export_command)
register_ledger_commands(billing_app)


@billing_app.command()
def check() -> None:
    """Prove the ledger, invoice and rollup invariants against the database; exit 1 on any violation."""
    with admin_session() as (session, _box):
        report = run_checks(session)
    console.print(f"accounts={report.accounts} transfers={report.transfers} rollups={report.rollups}")
    if report.ok:
        console.print("[green]ok[/]: balances sum to zero, cached balances match transfers, charges match events, "
                      "finalized invoices match their months' charges, rollups match raw events",
                      markup=True)  # fmt: skip
        return
    for problem in report.problems:
        console.print(f"[red]problem[/]: {escape(problem)}", markup=True, highlight=False)
    raise typer.Exit(1)
