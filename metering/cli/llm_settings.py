"""Commands for the cascade's inputs: BYOLLM settings, per-purpose settings, call budgets, keys."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from metering import audit_snapshots as snap
from metering.cli import audit_trail
from metering.cli.common import admin_session, api_time, console, fail, print_json, read_secret
from metering.crypto import generate_key
from metering.llm import settings_admin
from metering.llm import settings_store as store

byollm_app = typer.Typer(help="A user's own LLM (BYOLLM). The api key is write-only: shown masked, never printed.")
purpose_app = typer.Typer(help="Admin per-purpose LLM settings.")
budget_app = typer.Typer(help="Per-extension call budgets (per handler invocation).")
keys_app = typer.Typer(help="Encryption keys for secrets at rest.")

UserArg = Annotated[str, typer.Option("--user", "-u", help="User id.")]


@byollm_app.command("set")
def byollm_set(
    user: UserArg,
    tenant: Annotated[str, typer.Option("--tenant", "-t")],
    provider: Annotated[str, typer.Option(help="anthropic | openai | openai_compatible | simulated")],
    model: Annotated[str, typer.Option()],
    api_key: Annotated[
        str | None,
        typer.Option(envvar="METERING_BYOLLM_API_KEY", help="Omit to read it from stdin or a prompt."),
    ] = None,
    base_url: Annotated[str | None, typer.Option(help="For openai_compatible: e.g. http://localhost:11434/v1")] = None,
    fallback: Annotated[str, typer.Option(help="platform (retry on the platform LLM) | error")] = "platform",
) -> None:
    """Set (or replace) a user's BYOLLM settings. For openai_compatible and simulated, without --api-key the stored
    key is kept (same provider and base_url; a new base_url needs the key again); --api-key '' removes it."""
    keyless = store.provider_name(provider) in ("simulated", "openai_compatible")
    key = api_key if keyless else read_secret(api_key, "API key")
    with admin_session() as (session, box):
        existing = store.byollm_row_to_replace(session, user, tenant)
        before = snap.byollm_snapshot(existing)
        old_ciphertext = existing.api_key_ciphertext if existing is not None else None
        if key is None:
            key = store.kept_key(existing, box, provider=provider, base_url=base_url)
        row = store.put_byollm(
            session,
            box,
            user_id=user,
            tenant_id=tenant,
            provider=provider,
            model=model,
            api_key=key,
            base_url=base_url,
            fallback_policy=fallback,
        )
        audit_trail.record(
            session,
            "byollm.set",
            snap.user_target(row.tenant_id, row.user_id),
            before=before,
            after=snap.byollm_snapshot(row),
            tenant_id=row.tenant_id,
            secret_changed=row.api_key_ciphertext != old_ciphertext,  # put_byollm keeps it for the same key
        )
        print_json(_byollm_view(row, box))


@byollm_app.command("show")
def byollm_show(user: UserArg) -> None:
    """Show a user's BYOLLM settings (the key masked)."""
    with admin_session() as (session, box):
        row = store.get_byollm_row(session, user)
        if row is None:
            raise fail(f"user {user!r} has no BYOLLM settings", code=2)
        print_json(_byollm_view(row, box))


@byollm_app.command("delete")
def byollm_delete(user: UserArg) -> None:
    """Delete a user's BYOLLM settings (their calls then use the platform LLM)."""
    with admin_session() as (session, _box):
        row = store.get_byollm_row(session, user, for_update=True)
        if row is None:
            raise fail(f"user {user!r} has no BYOLLM settings", code=2)
        tenant, before = row.tenant_id, snap.byollm_snapshot(row)
        if not store.delete_byollm(session, user):  # deleted by a concurrent command meanwhile
            raise fail(f"user {user!r} has no BYOLLM settings", code=2)
        target = snap.user_target(tenant, user)
        audit_trail.record(session, "byollm.delete", target, before=before, after=None, tenant_id=tenant)
        console.print(f"deleted BYOLLM settings of {user}")


def _byollm_view(row: Any, box: Any) -> dict[str, Any]:
    """The settings as the API answers them (``ByollmOut``: the same fields, by the same names)."""
    return store.byollm_view(row, store.stored_key_mask(row, box)) | {
        "created_at": api_time(row.created_at),
        "updated_at": api_time(row.updated_at),
    }


@purpose_app.command("set")
def purpose_set(
    purpose: Annotated[str, typer.Argument(help="e.g. content_rewrite")],
    provider: Annotated[str, typer.Option()],
    model: Annotated[str, typer.Option()],
    base_url: Annotated[str | None, typer.Option()] = None,
    params: Annotated[str, typer.Option(help='Extra provider params as JSON, e.g. {"top_p": 0.9}')] = "{}",
) -> None:
    """Set the platform LLM used for one purpose (when the user has no BYOLLM)."""
    try:
        parsed = json.loads(params)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested thousands of levels deep
        raise fail(f"--params is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise fail("--params must be a JSON object")
    with admin_session() as (session, _box):
        before = snap.purpose_snapshot(settings_admin.get_purpose_row(session, purpose, for_update=True))
        row = store.put_purpose(
            session, purpose=purpose, provider=provider, model=model, base_url=base_url, params=parsed
        )
        after = snap.purpose_snapshot(row)
        audit_trail.record(session, "purpose.set", snap.purpose_target(purpose), before=before, after=after)
        print_json(_purpose_view(row))


@purpose_app.command("list")
def purpose_list() -> None:
    """List per-purpose settings."""
    with admin_session() as (session, _box):
        print_json([_purpose_view(row) for row in store.list_purposes(session)])


@purpose_app.command("delete")
def purpose_delete(purpose: Annotated[str, typer.Argument()]) -> None:
    """Delete one purpose's settings (it then uses the platform default)."""
    with admin_session() as (session, _box):
        before = snap.purpose_snapshot(settings_admin.get_purpose_row(session, purpose, for_update=True))
        if before is None or not store.delete_purpose(session, purpose):
            raise fail(f"no settings for purpose {purpose!r}", code=2)
        audit_trail.record(session, "purpose.delete", snap.purpose_target(purpose), before=before, after=None)
        console.print(f"deleted settings of purpose {purpose}")


def _purpose_view(row: Any) -> dict[str, Any]:
    return {
        "purpose": row.purpose,
        "provider": row.provider,
        "model": row.model,
        "base_url": row.base_url,
        "params": row.params,
        "updated_at": api_time(row.updated_at),
    }


@budget_app.command("set")
def budget_set(
    extension: Annotated[str, typer.Argument()],
    max_calls: Annotated[int | None, typer.Option(help="Max LLM calls per invocation.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max input+output tokens per invocation.")] = None,
    mode: Annotated[str, typer.Option(help="report (flag the event) | enforce (refuse the call)")] = "report",
) -> None:
    """Set an extension's per-invocation call budget."""
    with admin_session() as (session, _box):
        before = snap.budget_snapshot(settings_admin.get_budget_row(session, extension, for_update=True))
        row = store.put_budget(session, extension_id=extension, max_calls=max_calls, max_tokens=max_tokens, mode=mode)
        after = snap.budget_snapshot(row)
        audit_trail.record(session, "budget.set", snap.budget_target(extension), before=before, after=after)
        print_json(_budget_view(row))


@budget_app.command("list")
def budget_list() -> None:
    """List the extensions' call budgets."""
    with admin_session() as (session, _box):
        print_json([_budget_view(row) for row in settings_admin.list_budgets(session)])


@budget_app.command("delete")
def budget_delete(extension: Annotated[str, typer.Argument()]) -> None:
    """Delete an extension's call budget (its invocations then have none)."""
    with admin_session() as (session, _box):
        before = snap.budget_snapshot(settings_admin.get_budget_row(session, extension, for_update=True))
        if before is None or not settings_admin.delete_budget(session, extension):
            raise fail(f"extension {extension!r} has no call budget", code=2)
        audit_trail.record(session, "budget.delete", snap.budget_target(extension), before=before, after=None)
        console.print(f"deleted the call budget of extension {extension}")


def _budget_view(row: Any) -> dict[str, Any]:
    return {
        "extension_id": row.extension_id,
        "max_calls": row.max_calls_per_invocation,
        "max_tokens": row.max_tokens_per_invocation,
        "mode": row.mode,
        "updated_at": api_time(row.updated_at),
    }


@keys_app.command("generate")
def keys_generate() -> None:
    """Print a new Fernet key. Prepend it to METERING_SECRET_KEYS, then run `metering keys rotate`."""
    typer.echo(generate_key())


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Re-encrypt every stored secret under the newest key in METERING_SECRET_KEYS."""
    with admin_session() as (session, box):
        rotation = store.rotate_byollm_keys(session, box)
        count = rotation.reencrypted
        if count:  # nothing re-encrypted: nothing changed, nothing to audit
            audit_trail.record(session, "keys.rotate", "byollm_api_keys", before=None, after={"reencrypted": count})
        console.print(f"re-encrypted {count} stored api key(s) under the newest key")
        if rotation.unreadable:  # the others are rotated (committed): the old key may go once these are dealt with
            session.commit()
            users = ", ".join(repr(user) for user in rotation.unreadable[:20])
            more = f" and {len(rotation.unreadable) - 20} more" if len(rotation.unreadable) > 20 else ""
            raise fail(
                f"{len(rotation.unreadable)} stored api key(s) cannot be decrypted with METERING_SECRET_KEYS and were "
                f"left as they are, of user(s) {users}{more}: put back the key that encrypted them and rotate again, "
                "or set (or delete) their BYOLLM settings"
            )
