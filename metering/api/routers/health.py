"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Request
from sqlalchemy.exc import SQLAlchemyError

from metering.api.deps import AppEngine
from metering.api.problems import problem_responses
from metering.api.schemas import Health, Readiness
from metering.db import migrate
from metering.errors import NotReadyError

router = APIRouter(tags=["health"])
log = logging.getLogger("metering.api")


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    summary="Readiness: the database is reachable and migrated to head",
    responses=problem_responses(503),
)
def readyz(request: Request, engine: AppEngine) -> Readiness:
    head: str | None = request.app.state.head_revision
    try:
        current = migrate.current_revision(engine)
    except SQLAlchemyError:
        log.warning("readiness: database unreachable", exc_info=True)
        raise NotReadyError("the database is unreachable") from None
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:" and not Path(database).exists():
        # (Checked after connecting, which creates a file that never existed.) Open connections still write to the
        # deleted file, which nothing will ever read again.
        raise NotReadyError(f"the SQLite database file {database} is gone (deleted or moved while serving)")
    if current != head:
        raise NotReadyError(
            f"the database is at revision {current or 'none (not migrated)'}, not at head {head}: "
            "run `metering migrate`"
        )
    return Readiness(revision=current)
