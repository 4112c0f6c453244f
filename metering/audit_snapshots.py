"""What the audit log records of each admin change: targets and before/after snapshots, for every edge.

The API and the CLI both build their audit entries from these functions, so an entry reads the same whichever
edge made the change. A snapshot is plain JSON (strings, numbers, lists, ``None``); moments are ISO 8601 in UTC
with a ``Z``, money is an exact decimal string with 9 decimals (and its nanos where the API answers them).
Secrets never get here: a BYOLLM snapshot says ``"api_key": "***"`` (or ``null``), a token snapshot has its
display prefix, never the secret or its digest. ``metering.audit.record`` still redacts secret-named keys.

Pure: no session, no SQL; rows in, dicts out.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from metering.audit import REDACTED
from metering.billing.credits import TransferResult
from metering.billing.invoices import Invoice
from metering.billing.money import decimal_text
from metering.billing.overrides import is_withdrawn
from metering.billing.reprice import RepriceResult
from metering.billing.rerate import RerateResult
from metering.db.models import ApiTokenRow, ByollmSettingsRow, ExtensionBudgetRow, PriceOverrideRow, PurposeSettingsRow

Snapshot = dict[str, Any]


def moment(value: datetime | None) -> str | None:
    """``2026-11-01T12:00:00Z``: as the API's JSON writes a UTC moment."""
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- targets ------------------------------------------------------------------------------------------


def purpose_target(purpose: str) -> str:
    return f"purpose:{purpose}"


def user_target(tenant_id: str, user_id: str) -> str:
    return f"user:{tenant_id}/{user_id}"


def budget_target(extension_id: str) -> str:
    return f"budget:{extension_id}"


def override_target(override_id: str) -> str:
    return f"price_override:{override_id}"


def override_end_action(row: PriceOverrideRow) -> str:
    """``price_override.withdraw`` for an end that left the window empty (at its start: ``…:withdraw``, or ``…:end``
    with ``at`` = ``effective_from``), else ``price_override.end``: the same change, the same action."""
    return "price_override.withdraw" if is_withdrawn(row) else "price_override.end"


def token_target(token_id: object) -> str:
    return f"token:{token_id}"


# -- LLM settings -------------------------------------------------------------------------------------


def purpose_snapshot(row: PurposeSettingsRow | None) -> Snapshot | None:
    if row is None:
        return None
    return {"provider": row.provider, "model": row.model, "base_url": row.base_url, "params": dict(row.params or {})}


def byollm_fields(row: ByollmSettingsRow) -> Snapshot:
    """A user's BYOLLM settings without anything of the key: what the audit log, the admin API and the CLI show alike
    (each then says in its own way whether a key is stored)."""
    return {
        "user_id": row.user_id,
        "tenant_id": row.tenant_id,
        "provider": row.provider,
        "model": row.model,
        "base_url": row.base_url,
        "fallback_policy": row.fallback_policy,
    }


def byollm_snapshot(row: ByollmSettingsRow | None) -> Snapshot | None:
    """Never the key, only whether one is stored (``***``)."""
    if row is None:
        return None
    return byollm_fields(row) | {"api_key": REDACTED if row.api_key_ciphertext else None}


def budget_snapshot(row: ExtensionBudgetRow | None) -> Snapshot | None:
    if row is None:
        return None
    return {"max_calls": row.max_calls_per_invocation, "max_tokens": row.max_tokens_per_invocation, "mode": row.mode}


# -- prices and money ---------------------------------------------------------------------------------


def override_snapshot(row: PriceOverrideRow | None) -> Snapshot | None:
    """The override as ``GET /v1/admin/price-overrides`` answers it (USD per 1M tokens, as exact strings)."""
    if row is None:
        return None
    return {
        "id": row.id,
        "provider": row.provider,
        "model_pattern": row.model_pattern,
        "effective_from": moment(row.effective_from),
        "effective_to": moment(row.effective_to),
        "input_mtok": decimal_text(row.input_nanos_per_mtok) or "0",
        "output_mtok": decimal_text(row.output_nanos_per_mtok) or "0",
        "cache_read_mtok": decimal_text(row.cache_read_nanos_per_mtok),
        "cache_write_mtok": decimal_text(row.cache_write_nanos_per_mtok),
        "cache_write_1h_mtok": decimal_text(row.cache_write_1h_nanos_per_mtok),
        "web_search_per_k": decimal_text(row.web_search_nanos_per_k),
        "markup_pct": row.markup_pct,
        "note": row.note,
        "created_at": moment(row.created_at),
        "withdrawn": is_withdrawn(row),
    }


def credit_action(result: TransferResult) -> str:
    """``credit.add`` or ``adjustment.add``."""
    return f"{result.kind}.add"


def credit_snapshot(result: TransferResult) -> Snapshot:
    """The transfer a credit or adjustment posted (what ``POST /v1/admin/credits`` answers, less ``replayed``)."""
    return {
        "transfer_id": str(result.transfer_id),
        "kind": result.kind,
        "tenant_id": result.tenant_id,
        "user_id": result.user_id,
        "amount": decimal_text(result.amount_nanos) or "0",
        "amount_nanos": result.amount_nanos,
        "idempotency_key": result.idempotency_key,
        "memo": result.memo,
        "created_at": moment(result.created_at),
    }


def finalize_snapshot(period: str, issued: list[Invoice], *, forced: bool) -> Snapshot:
    """A period's finalization: how many invoices it issued and their rounded total (not each invoice)."""
    return {
        "period": period,
        "closed": True,
        "forced": forced,
        "invoices_issued": len(issued),
        "rounded_total": decimal_text(sum(inv.rounded_nanos for inv in issued)),
    }


def reprice_snapshot(result: RepriceResult) -> Snapshot:
    """What a reprice of held events priced (counts and amounts)."""
    return {
        "priced": result.priced,
        "still_unpriced": result.still_unpriced,
        "charge": decimal_text(result.charge_nanos),
        "cost": decimal_text(result.cost_nanos),
        "over_limit": result.over_limit,
        "shadow_priced": result.shadow_priced,
        "shadow_cost": decimal_text(result.shadow_nanos),
        "shadow_unpriced": result.shadow_unpriced,
        "searches_redecided": result.searches_redecided,
    }


def rerate_snapshot(result: RerateResult) -> Snapshot:
    """An applied re-rate: its run, window, scope and counts (not the per-event changes): ``relabelled`` events kept
    their charge (or shadow cost) and now name another price."""
    total = result.diff.total
    return {
        "run_id": result.run_id,
        "start": moment(result.start),
        "end": moment(result.end),
        "provider": result.provider,
        "model_pattern": result.model_pattern,
        "examined": result.diff.examined,
        "changed": total.events,
        "unpriceable": result.diff.unpriceable,
        "transfers": result.transfers,
        "relabelled": result.relabelled,
        "skipped": result.skipped,
        "late_corrections": result.late_corrections,
        "old_charge": decimal_text(total.old_charge_nanos),
        "new_charge": decimal_text(total.new_charge_nanos),
        "shadow_changed": result.diff.shadow.events,
        "old_shadow": decimal_text(result.diff.shadow.old_nanos),
        "new_shadow": decimal_text(result.diff.shadow.new_nanos),
    }


# -- API tokens ---------------------------------------------------------------------------------------


def token_snapshot(row: ApiTokenRow | None) -> Snapshot | None:
    """id, name, scopes, tenant and display prefix: never the secret, never its digest."""
    if row is None:
        return None
    return {
        "id": str(row.id),
        "name": row.name,
        "scopes": list(row.scopes),
        "tenant_id": row.tenant_id,
        "prefix": row.prefix,
        "created_at": moment(row.created_at),
        "revoked_at": moment(row.revoked_at),
    }
