"""Every route that takes a token refuses a query parameter it does not take, and one of a single value given twice
(422 ``validation_error`` naming it), once the token is checked; the routes without a token (probes, metrics, docs)
take any. Walks the app's routes, so a new one is covered; on SQLite and PostgreSQL.

Such parameters were ignored: ``GET /v1/invoices?user_id=u`` and ``GET /v1/balances?user_id=u`` answered every user
(as if it were u's), ``GET /v1/transfers?tenant_id=t`` every tenant, and of ``tenant_id=a&tenant_id=b`` b alone."""

from __future__ import annotations

from typing import Any, get_args, get_origin

import pytest
from fastapi import params
from fastapi.dependencies.utils import get_flat_params
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts

from metering.api.app import create_app
from metering.auth import Scope
from metering.config import Settings
from tests.integration.api.conftest import assert_problem, bearer

APP = create_app(Settings(env="test"))
PATH_VALUES = {"period": "2026-10", "extension_id": "rewrite", "function": "rewrite"}  # others: "x"


def _scope_and_checks(route: RouteContext) -> tuple[Scope | None, bool]:
    """The scope the route's token needs, and whether a dependency checks more of it (e.g. not bound to a tenant)."""
    scope, checked = None, False
    pending = [route.dependant]
    while pending:
        dependant = pending.pop()
        scope = getattr(dependant.call, "required_scope", None) or scope
        checked = checked or hasattr(dependant.call, "principal_check")
        pending.extend(dependant.dependencies)
    return scope, checked


def _query(route: RouteContext) -> dict[str, bool]:
    """The route's query parameters, each with whether it takes several values (FastAPI's own view of them)."""
    fields = [f for f in get_flat_params(route.dependant) if isinstance(f.field_info, params.Query)]
    return {f.alias: _is_list(f.field_info.annotation) for f in fields}


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(get_origin(arg) is list for arg in get_args(annotation))


def _url(route: RouteContext) -> str:
    return route.path.format(**{name: PATH_VALUES.get(name, "x") for name in route.param_convertors})


ROUTES = [r for r in iter_route_contexts(APP.routes) if isinstance(r.original_route, APIRoute)]
WITH_TOKEN = [
    pytest.param(method, route, id=f"{method} {route.path}")
    for route in ROUTES
    if _scope_and_checks(route)[0] is not None
    for method in sorted(route.methods)
]
WITHOUT_TOKEN = [route.path for route in ROUTES if _scope_and_checks(route)[0] is None]


@pytest.fixture
def everything(make_token):
    return bearer(make_token(Scope.INGEST, Scope.READ, Scope.ADMIN))


def _send(client, method: str, route: RouteContext, query: list[tuple[str, str]], headers: dict[str, str]) -> Any:
    body = {"json": {}} if route.body_field is not None else {}  # a JSON body: its own errors would come after
    return client.request(method, _url(route), params=query, headers=headers, **body)


def test_the_walk_finds_every_operation():
    documented = {f"{method.upper()} {path}" for path, ops in APP.openapi()["paths"].items() for method in ops}
    assert documented == {p.id for p in WITH_TOKEN} | {"GET /healthz", "GET /readyz"}
    assert sorted(WITHOUT_TOKEN) == ["/healthz", "/metrics", "/readyz"]


@pytest.mark.parametrize(("method", "route"), WITH_TOKEN)
def test_an_unknown_parameter_is_refused_after_the_token(client, everything, make_token, method, route):
    """``user_id=`` on a route without it (``GET /v1/invoices``) was ignored: its answer covered every user."""
    takes = _query(route)
    many = [(name, value) for name, several in takes.items() if several for value in ("model", "day")]
    query = [("user_id" if "user_id" not in takes else "tenant", "u1"), *many]  # list-valued ones may repeat
    body = assert_problem(_send(client, method, route, query, everything), 422, "validation_error")
    listed = ", ".join(sorted(takes)) or "no query parameter"
    assert body["errors"] == [
        {"loc": ["query", query[0][0]], "msg": f"unknown parameter: {_url(route)} takes {listed}", "type": "unknown"}
    ]
    # the token first: none is 401, one without the scope (or bound, where the route needs it unbound) 403
    assert_problem(_send(client, method, route, query, {}), 401, "unauthenticated")
    scope, checked = _scope_and_checks(route)
    other = Scope.READ if scope is Scope.INGEST else Scope.INGEST
    assert_problem(_send(client, method, route, query, bearer(make_token(other))), 403, "forbidden")
    if checked:
        bound = bearer(make_token(scope, tenant="t1"))
        assert_problem(_send(client, method, route, query, bound), 403, "forbidden")


@pytest.mark.parametrize(
    ("method", "route"), [p for p in WITH_TOKEN if any(not several for several in _query(p.values[1]).values())]
)
def test_a_single_valued_parameter_given_twice_is_refused(client, everything, method, route):
    """``tenant_id=a&tenant_id=b`` kept b alone (FastAPI takes the last value)."""
    single = sorted(name for name, several in _query(route).items() if not several)
    query = [(name, value) for name in single for value in ("1", "2")]
    body = assert_problem(_send(client, method, route, query, everything), 422, "validation_error")
    assert body["errors"] == [
        {"loc": ["query", name], "msg": "given 2 times, it takes one value", "type": "repeated"} for name in single
    ]


@pytest.mark.parametrize("path", [*WITHOUT_TOKEN, "/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"])
def test_the_routes_without_a_token_take_any_parameter(client, path):
    """Probes, the Prometheus exposition and the docs filter nothing: a parameter a kubelet, a scrape config or an
    OAuth redirect adds cannot narrow their answer, and refusing it would fail the probe or the scrape."""
    assert client.get(path, params=[("check", "1"), ("check", "2")]).status_code == 200
