"""The ``metering`` command: the edge that opens services and commits."""

from __future__ import annotations

from typing import Annotated

import typer

from metering.cli import billing_cmd, llm_settings, run, serve_cmd, spool_cmd, tokens_cmd
from metering.cli import demo as demo_cmd
from metering.cli.clean_errors import CleanErrorsGroup
from metering.cli.common import admin_session, console, usage_table
from metering.config import Settings
from metering.db import migrate as db_migrate
from metering.db.event_store import count_events, recent_events

app = typer.Typer(
    cls=CleanErrorsGroup,  # invalid settings and an unusable database are one error line, never a traceback
    help="Billing and usage metering for LLM calls made by chat extensions.",
    no_args_is_help=True,
)
app.command()(run.rewrite)
app.command()(run.invoke)
app.command()(demo_cmd.demo)
app.add_typer(llm_settings.byollm_app, name="byollm")
app.add_typer(llm_settings.purpose_app, name="purpose")
app.add_typer(llm_settings.budget_app, name="budget")
app.add_typer(llm_settings.keys_app, name="keys")
app.add_typer(spool_cmd.spool_app, name="spool")
app.add_typer(billing_cmd.billing_app, name="billing")
app.add_typer(tokens_cmd.tokens_app, name="tokens")
app.command()(serve_cmd.serve)


@app.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head)."""
    url = Settings().resolved_database_url
    db_migrate.upgrade(url)
    console.print(f"database at head ({db_migrate.head_revision(url)})")


MAX_LAST = 10_000  # events one `metering usage` shows


@app.command()
def usage(
    last: Annotated[int, typer.Option(min=1, max=MAX_LAST, help="How many events.")] = 20,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Only this user's (of every tenant).")] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant's.")] = None,
) -> None:
    """Show the most recent recorded usage events, with their tenant, user and extension."""
    with admin_session() as (session, _box):
        rows = recent_events(session, limit=last, user_id=user, tenant_id=tenant)
        whose = (f" of user {user}" if user is not None else "") + (
            f" of tenant {tenant}" if tenant is not None else ""
        )
        total = count_events(session, user_id=user, tenant_id=tenant)
        owners = [name for name, given in (("tenant", tenant), ("user", user)) if given is None]
        title = f"Last {len(rows)} of {total} events{whose}"
        console.print(usage_table(list(reversed(rows)), title=title, owners=owners))
