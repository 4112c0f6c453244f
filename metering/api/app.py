"""The app factory. Nothing is built at import time: the engine lives in the lifespan, on ``app.state``.

Run it with ``metering serve`` (uvicorn, ``factory=True``) or ``create_app(Settings(...))`` in tests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute

from metering import __version__
from metering.api import docs_ui, problems
from metering.api.body_limit import BodyLimitMiddleware
from metering.api.content_coding import ContentCodingMiddleware
from metering.api.head import HeadMiddleware
from metering.api.routers import ROUTES
from metering.api.routers.ledger import MAX_LEDGER_STREAMS
from metering.api.runtime import LazyRuntime
from metering.api.validators import reject_nul
from metering.config import Settings
from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory

log = logging.getLogger("metering.api")

DESCRIPTION = """Usage metering and billing for LLM calls made by chat extensions.

Authenticate with an API token: `Authorization: Bearer mtr_…` (create one with `metering tokens create`).
Every error is `application/problem+json` (RFC 9457) with a stable `code`. An operation that takes a token refuses
a query parameter it does not list, and one of a single value given twice, with `422` (`validation_error`).
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    url = settings.resolved_database_url
    engine = make_engine(url)
    app.state.engine = engine
    app.state.sessions = make_session_factory(engine)
    app.state.head_revision = migrate.head_revision(url)
    app.state.runtime = LazyRuntime(settings, app.state.sessions)  # built on first invoke; drained at shutdown
    try:
        app.state.runtime.resume_pending()  # an earlier run's undelivered events go out now, not at the first invoke
    except Exception:  # never keep the API from starting: the events stay on disk for `metering spool drain`
        log.exception("could not resume delivering the spool left by an earlier run")
    try:
        yield
    finally:
        await app.state.runtime.aclose(drain=True)
        engine.dispose()


def _operation_id(route: APIRoute) -> str:
    return route.name  # the endpoint's function name: post_events, readyz, ...


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="metering",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # docs_ui: /docs and /redoc with their assets served by the app (offline), not from a CDN
        redoc_url=None,
        generate_unique_id_function=_operation_id,
        dependencies=[Depends(reject_nul)],  # no NUL in any path or query parameter (422)
        openapi_tags=[
            {"name": "events", "description": "Usage events in (scope `ingest`)."},
            {"name": "health", "description": "Probes for orchestrators (no authentication)."},
        ],
    )
    app.state.settings = settings
    app.state.ledger_streams = threading.BoundedSemaphore(MAX_LEDGER_STREAMS)
    problems.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.api.max_body_bytes)
    app.add_middleware(ContentCodingMiddleware)  # a compressed body is refused before it is read
    app.add_middleware(HeadMiddleware)  # outermost: HEAD runs the GET of its path, and no body goes out
    for router, prefix in ROUTES:
        app.include_router(router, prefix=prefix)
    docs_ui.install(app)
    return app
