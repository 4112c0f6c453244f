"""Dependencies of the routers, as ``Annotated`` aliases. The request's session is the edge that commits."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from metering.api.validators import reject_ignored_query
from metering.auth import Scope, TokenPrincipal, authenticate
from metering.config import Settings
from metering.db.limits import read_only
from metering.errors import AuthenticationError, MeteringError, PermissionDeniedError

log = logging.getLogger("metering.api")
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiToken",
    description="An API token (`mtr_…`) from `metering tokens create`, sent as `Authorization: Bearer <token>`.",
)


def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def app_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def db_session(request: Request) -> Iterator[Session]:
    """One session per request: committed when the endpoint succeeds, rolled back when it raises.

    Used with ``scope="function"``: the commit happens before the response is sent, so a failed commit is
    answered with an error, never with a 200.
    """
    with request.app.state.sessions() as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()


def _principal(request: Request, secret: str) -> TokenPrincipal | None:
    # Its own short transaction: touching last_used_at must not hold the token row for the whole request.
    settings = app_settings(request)
    touch_after = timedelta(seconds=settings.api.token_touch_interval_s)
    with request.app.state.sessions() as session:
        try:
            principal = authenticate(session, secret, touch_after=touch_after)
            session.commit()
        except Exception as exc:
            # A database refusing writes (a failover's demoted primary, maintenance) still answers reads: the touch
            # is skipped, not the request (a write endpoint gets its 503 from its own write). It was a 503 for every
            # read whose touch was due.
            if not read_only(exc):
                raise
            session.rollback()
            _touch_skipped(request, exc)
            principal = authenticate(session, secret, touch_after=None)
    return principal


def _touch_skipped(request: Request, exc: Exception) -> None:
    """Said once per app (every request of a token would say it again), with the database's own reason."""
    if getattr(request.app.state, "touch_skipped_logged", False):
        return
    request.app.state.touch_skipped_logged = True
    reason = getattr(exc, "orig", None) or exc
    log.warning("the database refuses writes (%s): tokens' last_used_at is not written while it does", reason)


def authorize(request: Request, credentials: HTTPAuthorizationCredentials | None, scope: Scope) -> TokenPrincipal:
    if credentials is None:
        raise AuthenticationError("an API token is required: send 'Authorization: Bearer <token>'")
    principal = _principal(request, credentials.credentials)
    if principal is None:
        raise AuthenticationError("the API token is invalid or revoked")
    if not principal.allows(scope):
        raise PermissionDeniedError(f"the API token lacks the '{scope.value}' scope")
    return principal


def require(scope: Scope) -> Callable[..., TokenPrincipal]:
    """A dependency returning the request's principal: 401 without a live token, 403 without ``scope`` or when the
    checks the route's other dependencies make of it refuse it (e.g. bound to a tenant); then 422 for a query
    parameter the route does not take, or one of a single value given twice (``reject_ignored_query``). Every route
    that takes a token depends on this one: the query is checked there, once, after the token."""

    def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> TokenPrincipal:
        principal = authorize(request, credentials, scope)
        try:
            reject_ignored_query(request)
        except RequestValidationError:
            for check in _access_checks(request.scope["route"].dependant)[1]:
                check(principal)  # their 403 first (else they run in their own dependency, after this one)
            raise
        return principal

    dependency.__name__ = f"require_{scope.value}"
    dependency.required_scope = scope  # type: ignore[attr-defined]  # read by refusal_before_body
    return dependency


def _access_checks(dependant: Dependant | None) -> tuple[Scope | None, list[Callable[[TokenPrincipal], None]]]:
    """The scope a route's dependencies require, and the checks of the principal they add (e.g. not bound)."""
    scope: Scope | None = None
    checks: list[Callable[[TokenPrincipal], None]] = []
    pending = [dependant] if dependant is not None else []
    while pending:
        current = pending.pop()
        scope = getattr(current.call, "required_scope", None) or scope
        check = getattr(current.call, "principal_check", None)
        if check is not None:
            checks.append(check)
        pending.extend(current.dependencies)
    return scope, checks


async def refusal_before_body(request: Request) -> MeteringError | None:
    """The 401 or 403 a request gets before its body is looked at, or None.

    FastAPI parses a JSON body before it runs any dependency, so a body that is not JSON (or not UTF-8) was answered
    with a 422 before the token was checked: a request without a token, or with one lacking the scope, learnt how
    its body was wrong instead of getting its 401/403. The problem handlers of such bodies ask this first."""
    scope, checks = _access_checks(getattr(request.scope.get("route"), "dependant", None))
    if scope is None:
        return None
    credentials = await _bearer(request)
    try:
        principal = await run_in_threadpool(authorize, request, credentials, scope)
        for check in checks:
            check(principal)
    except (AuthenticationError, PermissionDeniedError) as refused:
        return refused
    return None


AppSettings = Annotated[Settings, Depends(app_settings)]
AppEngine = Annotated[Engine, Depends(app_engine)]
DbSession = Annotated[Session, Depends(db_session, scope="function")]
Ingester = Annotated[TokenPrincipal, Depends(require(Scope.INGEST))]
Reader = Annotated[TokenPrincipal, Depends(require(Scope.READ))]
Admin = Annotated[TokenPrincipal, Depends(require(Scope.ADMIN))]
