"""``metering tokens``: API tokens for the HTTP service. A secret is printed once, at creation, and never again."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from metering import audit_snapshots as snap
from metering.auth import Scope, create_token, get_token, list_tokens, revoke
from metering.auth.tokens import display_prefix
from metering.cli import audit_trail
from metering.cli.common import admin_session, console, err_console, fail, fold

tokens_app = typer.Typer(help="API tokens for `metering serve` (bearer secrets, stored hashed).", no_args_is_help=True)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


@tokens_app.command("create")
def create_command(
    name: Annotated[str, typer.Option("--name", "-n", help="What the token is for, e.g. 'spool-sink eu-1'.")],
    scope: Annotated[
        list[Scope] | None, typer.Option("--scope", "-s", help="Repeat for several: ingest, read, admin.")
    ] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Bind the token to one tenant.")] = None,
) -> None:
    """Create a token. Its secret goes to stdout, once: store it now, it cannot be shown again."""
    with admin_session() as (session, _box):
        row, secret = create_token(session, name, scope or [], tenant_id=tenant)
        after = snap.token_snapshot(row)  # id, name, scopes, tenant, prefix: never the secret or its digest
        audit_trail.record(
            session, "token.create", snap.token_target(row.id), before=None, after=after, tenant_id=row.tenant_id
        )
    err_console.print(
        f"created token [bold]{escape(row.name)}[/] id={row.id} prefix={escape(display_prefix(row.prefix))} "
        f"scopes={','.join(row.scopes)} tenant={escape(row.tenant_id or '(any)')}",
        markup=True,
    )
    typer.echo(secret)
    err_console.print("[yellow]This secret is shown only once: store it now.[/]", markup=True)


@tokens_app.command("list")
def list_command() -> None:
    """Every token (revoked ones too), without secrets."""
    with admin_session() as (session, _box):
        rows = list_tokens(session)
    table = Table(title=f"{len(rows)} API token(s)", title_justify="left")
    for column in ("id", "name", "prefix", "scopes", "tenant", "created", "last used", "revoked"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row.id),
            row.name,
            display_prefix(row.prefix),
            ",".join(row.scopes),
            row.tenant_id or "(any)",
            _when(row.created_at),
            _when(row.last_used_at),
            _when(row.revoked_at),
        )
    console.print(fold(table, whole={"id", "prefix"}))


@tokens_app.command("revoke")
def revoke_command(
    token_id: Annotated[str, typer.Argument(help="The token's id (see `metering tokens list`).")],
) -> None:
    """Revoke a token: requests with it are refused (401) from now on."""
    try:
        parsed = uuid.UUID(token_id)
    except ValueError:
        raise fail(f"{token_id!r} is not a token id (a UUID, see `metering tokens list`)", code=2) from None
    with admin_session() as (session, _box):
        before = snap.token_snapshot(get_token(session, parsed))
        row, revoked_now = revoke(session, parsed)
        if revoked_now:  # revoking a revoked token (also one revoked meanwhile by another command) changes nothing
            target, after = snap.token_target(row.id), snap.token_snapshot(row)
            audit_trail.record(session, "token.revoke", target, before=before, after=after, tenant_id=row.tenant_id)
    console.print(f"revoked token {row.name} ({row.id}) at {_when(row.revoked_at)}")
