"""``metering serve``: the HTTP service (uvicorn running the app factory)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from metering.cli.common import fail
from metering.config import Settings
from metering.db import migrate as db_migrate
from metering.errors import MeteringError

APP_FACTORY = "metering.api.app:create_app"  # by name: the CLI never imports the API layer


class LogLevel(StrEnum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"


def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    migrate: Annotated[
        bool, typer.Option(help="Migrate the database to head first (use --no-migrate when a release step does).")
    ] = True,
    log_level: Annotated[LogLevel, typer.Option(help="uvicorn log level.")] = LogLevel.INFO,
) -> None:
    """Serve the HTTP API (POST /v1/events, /healthz, /readyz, /docs) with uvicorn."""
    import uvicorn  # only this command needs it

    if migrate:
        try:
            db_migrate.upgrade(Settings().resolved_database_url)
        except MeteringError as exc:
            raise fail(exc.message) from None
    uvicorn.run(APP_FACTORY, factory=True, host=host, port=port, workers=workers, log_level=log_level.value)
