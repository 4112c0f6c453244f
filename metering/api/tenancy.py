"""Ingest on behalf of a token: a tenant-bound token may only ingest its own tenant's events.

Events of another tenant are rejected one by one (``tenant mismatch``), never the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from metering.auth import TokenPrincipal
from metering.auth.tokens import TENANT_MISMATCH
from metering.billing.ingest import IngestResult, Rejection, ingest
from metering.events import shown


def split_foreign(items: Sequence[Any], tenant_id: str | None) -> tuple[list[Any], list[int], list[Rejection]]:
    """(items to ingest, their positions in ``items``, rejections of other tenants' events)."""
    if tenant_id is None:
        return list(items), list(range(len(items))), []
    kept: list[Any] = []
    positions: list[int] = []
    foreign: list[Rejection] = []
    for index, item in enumerate(items):
        # An item without a tenant_id (or not an object) is left to ingest, which says precisely what is wrong.
        if isinstance(item, Mapping) and "tenant_id" in item and item["tenant_id"] != tenant_id:
            event_id = item.get("event_id")
            foreign.append(Rejection(index, None if event_id is None else shown(event_id), TENANT_MISMATCH))
        else:
            kept.append(item)
            positions.append(index)
    return kept, positions, foreign


def ingest_as(
    session: Session, principal: TokenPrincipal, items: Sequence[Any], *, markup_pct: Decimal
) -> IngestResult:
    """``billing.ingest`` for the events this principal may send; rejection indexes refer to ``items``."""
    kept, positions, foreign = split_foreign(items, principal.tenant_id)
    result = ingest(session, kept, markup_pct=markup_pct, indexes=positions)  # reasons name items as sent
    rejected = sorted(foreign + result.rejected, key=lambda r: r.index)
    return IngestResult(inserted=result.inserted, duplicates=result.duplicates, rejected=rejected)
