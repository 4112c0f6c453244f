"""Every error response is RFC 9457 ``application/problem+json``, rendered here and only here.

Domain code raises ``MeteringError`` subclasses (a stable ``code`` and an HTTP ``status``); FastAPI's request
validation errors, Starlette's 404/405, database outages and unexpected exceptions get the same shape.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

import psycopg
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from metering.api.deps import refusal_before_body
from metering.api.validators import DEPTH_MESSAGE
from metering.db import migrate
from metering.db.limits import exceeds_program_limit, read_only, schema_behind
from metering.errors import AuthenticationError, DatabaseUnavailableError, MeteringError, NotReadyError

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://metering.dev/problems/"
MAX_LISTED_ERRORS = 100

log = logging.getLogger("metering.api")


class Problem(BaseModel):
    """An RFC 9457 problem detail. ``code`` is stable (clients branch on it); ``detail`` is for people."""

    type: str = Field(description="A URI naming the problem type: https://metering.dev/problems/<code>.")
    title: str = Field(description="A short summary of the problem type.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong with this request, for a person.")
    code: str = Field(description="The stable, machine-readable problem code.")
    instance: str | None = Field(None, description="The request path.")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: e.g. ['body', 'events'].")
    msg: str
    type: str


class ValidationProblem(Problem):
    """A 422: a request that does not match the documented schema (``validation_error``, with ``errors``), or
    whose values the service refuses (``invalid_input``: a rule across fields, an unknown name, a bad cursor)."""

    errors: list[FieldError] = Field(
        default_factory=list,
        description="Where and why, for `validation_error` (absent for `invalid_input`: see `detail`).",
    )


def title_of(code: str) -> str:
    return code.replace("_", " ").capitalize()


def _encodable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate (from a provider's error message) becomes ``?``, not a 500."""
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


def problem_body(status: int, code: str, detail: str, *, instance: str | None = None) -> dict[str, Any]:
    return {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title_of(code),
        "status": status,
        "detail": _encodable(detail),
        "code": code,
        "instance": instance,
    }


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = problem_body(status, code, detail, instance=instance) | extra
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _http_code(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return f"http_{status}"
    return phrase.lower().replace(" ", "_").replace("-", "_").replace("'", "")


def _http_detail(request: Request, exc: StarletteHTTPException) -> str:
    if exc.status_code == 404:
        return f"nothing at {request.url.path}"
    if exc.status_code == 405:
        return f"{request.method} is not allowed on {request.url.path}"
    return str(exc.detail)


async def metering_error(request: Request, exc: MeteringError) -> JSONResponse:
    if exc.status >= 500:  # warning, not error: a 503 from /readyz repeats on every probe until it clears
        log.warning("%s %s failed: %s [%s]", request.method, request.url.path, exc.message, exc.code)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else None
    return JSONResponse(
        error_body(exc, instance=request.url.path),
        status_code=exc.status,
        headers=headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def error_body(exc: MeteringError, *, instance: str | None) -> dict[str, Any]:
    """The problem body of a domain error, with its extra members (they never replace a standard one)."""
    body = problem_body(exc.status, exc.code, exc.message, instance=instance)
    return {k: v for k, v in exc.members.items() if k not in body} | body


# FastAPI's 400 for a body it cannot decode at all (e.g. JSON that is not UTF-8): "not JSON" is a 422 like the rest.
_BODY_PARSE_ERROR = "There was an error parsing the body"


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def _unreadable(cause: BaseException | None) -> str:
    """Why ``json.loads`` could not read a body. Valid JSON it refuses was called "not valid JSON" too."""
    if isinstance(cause, RecursionError):  # nested thousands of levels deep
        return DEPTH_MESSAGE
    if type(cause) is ValueError:  # not JSONDecodeError nor UnicodeDecodeError: Python's limit on integer digits
        return f"an integer of more than {sys.get_int_max_str_digits()} digits is refused"
    return "the body is not valid JSON (UTF-8)"


def allowed_methods(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """Every method some route takes at this path: Starlette's 405 names only the first route's (PUT
    ``/v1/admin/price-overrides`` answered ``Allow: POST``, though GET is served there too)."""
    allowed = {
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in routes)
    }
    if "GET" in allowed:
        allowed.add("HEAD")  # served by the GET (``head.HeadMiddleware``)
    return ", ".join(sorted(allowed))


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
        if (refused := await _refused_before_body(request)) is not None:
            return refused
        msg = _unreadable(exc.__cause__)
        errors = [{"loc": ["body"], "msg": msg, "type": "json_invalid"}]
        detail = f"the request does not match the schema: body: {msg}"
        return problem_response(422, "validation_error", detail, instance=request.url.path, errors=errors)
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 405 and headers is not None and "Allow" in headers:
        headers["Allow"] = allowed_methods(request.app.routes, request.scope) or headers["Allow"]
    return problem_response(
        exc.status_code,
        _http_code(exc.status_code),
        _http_detail(request, exc),
        instance=request.url.path,
        headers=headers,
    )


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or any ``application/*+json``, parameters (``; charset=utf-8``) ignored."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _not_declared_json(request: Request, exc: RequestValidationError) -> bool:
    """Whether a route that takes a JSON body got one not declared as JSON: FastAPI then validates the raw bytes
    and fails on the body as a whole (e.g. ``curl -d @events.json`` sends ``application/x-www-form-urlencoded``)."""
    if getattr(request.scope.get("route"), "body_field", None) is None:
        return False
    if is_json_media_type(request.headers.get("content-type")):
        return False
    return any(tuple(e.get("loc", ())) == ("body",) and e.get("type") != "missing" for e in exc.errors())


async def _refused_before_body(request: Request) -> JSONResponse | None:
    """The 401/403 (or 503: the token could not be looked up) of a request whose body FastAPI could not parse."""
    try:
        refused = await refusal_before_body(request)
    except Exception as exc:
        if not is_outage(exc):
            raise
        return await database_error(request, exc)
    return None if refused is None else await metering_error(request, refused)


def _body_not_parsed(exc: RequestValidationError) -> bool:
    """FastAPI's error for a body that is not JSON, raised as it reads the body: before any dependency ran."""
    return any(e.get("type") == "json_invalid" and tuple(e.get("loc", ()))[:1] == ("body",) for e in exc.errors())


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    if _body_not_parsed(exc) and (refused := await _refused_before_body(request)) is not None:
        return refused  # the token first, as for any other body
    if _not_declared_json(request, exc):
        content_type = request.headers.get("content-type")
        got = f"got {content_type!r}" if content_type else "none was sent"
        detail = f"the request body must be JSON: send Content-Type: application/json ({got})"
        return problem_response(415, "unsupported_media_type", detail, instance=request.url.path)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()[:MAX_LISTED_ERRORS]  # never echo the input: it may be megabytes of events
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid"}
    where = ".".join(str(p) for p in first["loc"]) or "request"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    detail = f"the request does not match the schema: {where}: {first['msg']}{more}"
    return problem_response(422, "validation_error", detail, instance=request.url.path, errors=errors)


# An outage of the database, however it surfaces: SQLAlchemy's wrapped errors, or the driver's own from the raw
# connection ingest writes through (a dropped connection, a deadlock, a serialization failure), or no pooled
# connection free in time. Retrying later helps: 503, never a 500 (a spool's HTTP sink treats a 500 as a batch
# the service refuses, and isolates the event at fault).
DATABASE_OUTAGES: tuple[type[Exception], ...] = (
    OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    sqlite3.OperationalError,
)


def is_outage(exc: BaseException) -> bool:
    """Whether retrying later can help (503): an outage above, or a database that refuses writes as read-only (an
    InternalError to psycopg); not a program limit (a refusal of the data)."""
    return (isinstance(exc, DATABASE_OUTAGES) or read_only(exc)) and not exceeds_program_limit(exc)


def database_unavailable() -> DatabaseUnavailableError:
    return DatabaseUnavailableError("the database is unavailable; retry later")


def schema_not_migrated() -> NotReadyError:
    return NotReadyError("the database schema is behind this version of metering: run `metering migrate`")


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    if schema_behind(exc):
        return await _schema_behind(request, exc)
    if exceeds_program_limit(exc):  # psycopg's OperationalError, but a refusal of the data: retrying cannot help
        log.error("%s %s: the database refuses a value", request.method, request.url.path, exc_info=exc)
        return await internal_error(request, exc)
    log.warning("%s %s: database unavailable", request.method, request.url.path, exc_info=exc)
    error = database_unavailable()
    return problem_response(error.status, error.code, error.message, instance=request.url.path)


async def _schema_behind(request: Request, exc: Exception) -> JSONResponse:
    if await run_in_threadpool(
        _at_head, request
    ):  # `metering migrate` would change nothing: a bug, or a drifted schema
        log.error("%s %s: a table or column is missing at head", request.method, request.url.path, exc_info=exc)
        return await internal_error(request, exc)
    error = schema_not_migrated()
    log.error("%s %s: %s", request.method, request.url.path, error.message, exc_info=exc)
    return problem_response(error.status, error.code, error.message, instance=request.url.path)


def _at_head(request: Request) -> bool:
    state = request.app.state
    try:
        return migrate.current_revision(state.engine) == state.head_revision
    except Exception:  # unreachable now, or no engine: say what the error says
        return False


async def programming_error(request: Request, exc: Exception) -> JSONResponse:
    """A statement the database cannot run: a schema behind the code (503, as /readyz says), else a bug (500, logged
    here: this handler answers it, so the server does not log it)."""
    if schema_behind(exc):
        return await _schema_behind(request, exc)
    log.error("%s %s: an unexpected database error", request.method, request.url.path, exc_info=exc)
    return await internal_error(request, exc)


async def internal_database_error(request: Request, exc: Exception) -> JSONResponse:
    """An InternalError of the database: a read-only one refuses writes (a failover, maintenance) and is an outage
    (503, retried later); any other is a bug (500, logged here)."""
    if read_only(exc):
        return await database_error(request, exc)
    log.error("%s %s: an unexpected database error", request.method, request.url.path, exc_info=exc)
    return await internal_error(request, exc)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's ServerErrorMiddleware calls this, then re-raises so the server logs the traceback.
    return problem_response(500, "internal_error", "an unexpected error occurred", instance=request.url.path)


def install(app: FastAPI) -> None:
    """Register the handlers and make the OpenAPI document announce problem+json for every error response."""
    # Starlette types handlers as taking any Exception; each of these is registered for its own class.
    app.add_exception_handler(MeteringError, metering_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    for outage in DATABASE_OUTAGES:
        app.add_exception_handler(outage, database_error)
    for programming in (sqlalchemy.exc.ProgrammingError, psycopg.ProgrammingError):
        app.add_exception_handler(programming, programming_error)
    for internal in (sqlalchemy.exc.InternalError, psycopg.InternalError):
        app.add_exception_handler(internal, internal_database_error)
    app.add_exception_handler(Exception, internal_error)
    app.openapi = _problem_openapi(app, app.openapi)  # type: ignore[method-assign]


_DESCRIPTIONS = {
    401: "No API token, or an invalid or revoked one (`unauthenticated`).",
    403: "The API token lacks the scope this operation needs (`forbidden`).",
    404: "Not found (`not_found`).",
    413: "The body exceeds the byte limit (`payload_too_large`) or the batch has too many events (`too_many_events`).",
    422: (
        "The request does not match the schema (`validation_error`; `errors` lists where and why), or the service "
        "refuses its values (`invalid_input`)."
    ),
    503: "The database is unreachable, locked or not migrated (`not_ready`, `database_unavailable`).",
}


def problem_responses(*statuses: int, described: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the problems an operation can answer with; ``described``: an operation's
    own description of a status (e.g. a 503 code of its own)."""
    own = described or {}
    return {
        status: {
            "model": ValidationProblem if status == 422 else Problem,
            "description": own.get(status) or _DESCRIPTIONS.get(status, HTTPStatus(status).phrase),
        }
        for status in statuses
    }


def _unsupported_media_type() -> dict[str, Any]:
    return {
        "description": "The body is not declared as JSON (`unsupported_media_type`): send "
        "`Content-Type: application/json`.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _problem_openapi(app: FastAPI, build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    if "requestBody" in operation:  # validators.require_json_body
                        operation["responses"].setdefault("415", _unsupported_media_type())
                    for status, response in operation.get("responses", {}).items():
                        content = response.get("content", {})
                        if status[:1] in "45" and "application/json" in content:
                            content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
