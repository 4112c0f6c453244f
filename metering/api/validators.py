"""Input rules shared by every endpoint, found by fuzzing the API (tests/integration/api/test_schemathesis.py).

- No NUL (0x00) in any text: PostgreSQL cannot store it, and no id, name or prompt needs it. Path and query
  parameters are checked for every route by ``reject_nul``; request bodies by their models (``no_nul``).
- Times are converted to UTC at the edge (``UtcDatetime``; without an offset a time is UTC): a time whose UTC
  value falls outside the years 1 to 9999 (e.g. ``9999-12-31T23:00:00-05:00``) is a 422, not an overflow. A time is
  ISO 8601: a number (``1764270000``, which pydantic reads as Unix seconds, or milliseconds past 2e10) is a 422.
- In a query, a time whose offset's ``+`` was sent unencoded (read as a space) is a 422 saying to send ``%2B``.
- Integers stored in the database stay within their column (``MAX_INT32``, ``MAX_INT64``).
- A read's text filter (``FilterText``) is never empty: no id or name is.
- A query parameter the route does not take, or one of a single value given twice, is a 422 on every route that
  takes a token (``reject_ignored_query``, called by ``deps.require`` once the token is checked): a misspelt or
  missing filter (``tenant=`` for ``tenant_id=``, ``user_id=`` where there is none) was ignored, and the answer
  covered everyone; of ``tenant_id=a&tenant_id=b`` only b was kept. The routes without a token (probes, /metrics,
  the docs) filter nothing and take any.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi import Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, AwareDatetime, BeforeValidator

from metering.events import MAX_INT32 as MAX_INT32  # INTEGER, re-exported
from metering.events import MAX_INT64 as MAX_INT64  # BIGINT, re-exported
from metering.events import is_a_number, to_utc

NUL_MESSAGE = "text must not contain NUL (0x00) characters"


MAX_JSON_DEPTH = 64  # how deep a JSON value in a body may nest: settings never need more
DEPTH_MESSAGE = f"a value nested deeper than {MAX_JSON_DEPTH} levels is refused"


def has_nul(value: Any) -> bool:
    """Whether a JSON-like value (str, list, dict keys and values) holds a NUL character anywhere. Iterative, so
    any depth is walked; a value nested deeper than ``MAX_JSON_DEPTH`` raises ValueError (it would fail later,
    in code that recurses: a 500)."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, Mapping | list | tuple):
            if depth >= MAX_JSON_DEPTH:
                raise ValueError(DEPTH_MESSAGE)
            children = [*item.keys(), *item.values()] if isinstance(item, Mapping) else item
            pending.extend((child, depth + 1) for child in children)
    return False


def no_nul(value: Any) -> Any:
    """A before-validator for body fields: refuses a NUL anywhere in the value, and values nested too deep."""
    if has_nul(value):
        raise ValueError(NUL_MESSAGE)
    return value


def reject_nul(request: Request) -> None:
    """A dependency of every route: 422 ``validation_error`` when a path or query parameter holds a NUL."""
    errors = [
        {"loc": ("path", name), "msg": NUL_MESSAGE, "type": "string_nul"}
        for name, value in request.path_params.items()
        if isinstance(value, str) and "\x00" in value
    ]
    errors += [
        {"loc": ("query", name), "msg": NUL_MESSAGE, "type": "string_nul"}
        for name, value in request.query_params.multi_items()
        if "\x00" in name or "\x00" in value
    ]
    if errors:
        raise RequestValidationError(errors)


def _takes_many(annotation: Any) -> bool:
    """Whether a parameter of this type takes repeated values (``list[str]``, optional or not)."""
    origin = get_origin(annotation)
    if origin is Union or origin is UnionType:
        return any(_takes_many(arg) for arg in get_args(annotation))
    return (origin or annotation) in (list, tuple, set, frozenset)


def _query_names(dependant: Dependant) -> dict[str, bool]:
    """The query parameters (their names in the URL) of a route's dependant and of all its dependencies, each
    with whether it takes several values."""
    names = {field.alias: _takes_many(field.field_info.annotation) for field in dependant.query_params}
    for dependency in dependant.dependencies:
        names |= _query_names(dependency)
    return names


def reject_ignored_query(request: Request) -> None:
    """422 ``validation_error`` naming each query parameter the request's route does not take, and each one of a
    single value given more than once (FastAPI kept the last). Called by the token's dependency (``deps.require``),
    so a missing or refused token is answered first (401/403), as for the schema's own errors."""
    if not request.scope.get("query_string"):
        return  # the usual request (every POST /v1/events of the sink): nothing to check, no walk of the route
    known = _query_names(request.scope["route"].dependant)
    errors = []
    for name in request.query_params:
        if name not in known:
            takes = f"unknown parameter: {request.url.path} takes {', '.join(sorted(known)) or 'no query parameter'}"
            errors.append({"loc": ("query", name), "msg": takes, "type": "unknown"})
        elif not known[name] and (count := len(request.query_params.getlist(name))) > 1:
            errors.append(
                {"loc": ("query", name), "msg": f"given {count} times, it takes one value", "type": "repeated"}
            )
    if errors:
        raise RequestValidationError(errors)


def not_a_number(value: Any) -> Any:
    """A before-validator of times: a number, or text that is one, is refused (pydantic would read it as a Unix time,
    in seconds or, past 2e10, milliseconds: ``from=1764270000`` was 2025-11-27T19:00Z, ``at=0`` 1970)."""
    if is_a_number(value):
        raise ValueError("a time is an ISO 8601 date-time (e.g. 2026-11-01T00:00:00Z), not a number")
    return value


# a time followed by a space and an offset's digits: the offset's "+", which a query string reads as a space
_DECODED_PLUS = re.compile(r"\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)? (\d{2}:?\d{2})")


def plus_sent_unencoded(value: Any) -> Any:
    """A before-validator of query times: ``from=2026-09-30T05:30:00+05:30`` sent as is arrives as ``05:30:00 05:30``
    (a query string reads ``+`` as a space), which pydantic refused as "unexpected extra characters"."""
    if isinstance(value, str) and (found := _DECODED_PLUS.search(value)) and found.end() == len(value):
        raise ValueError(
            f"a '+' in a query string reads as a space: send the offset as %2B{found.group(1)} (or the time in UTC, "
            "with Z)"
        )
    return value


# query parameters: without an offset, UTC
UtcDatetime = Annotated[
    datetime, BeforeValidator(not_a_number), BeforeValidator(plus_sent_unencoded), AfterValidator(to_utc)
]
# bodies: the offset is required
AwareUtcDatetime = Annotated[AwareDatetime, BeforeValidator(not_a_number), AfterValidator(to_utc)]

# An equality filter of a read (a tenant, user, account id or a name): none is ever empty, so an empty one matched
# nothing, a 200 with no rows as if there were no usage (a 403 for a tenant-bound token's ``tenant_id=``): a 422.
FilterText = Annotated[str | None, Query(min_length=1)]
