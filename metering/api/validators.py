"""Input rules shared by every endpoint, found by fuzzing the API (tests/integration/api/test_schemathesis.py).

- No NUL (0x00) in any text: PostgreSQL cannot store it, and no id, name or prompt needs it. Path and query
  parameters are checked for every route by ``reject_nul``; request bodies by their models (``no_nul``).
- Times are converted to UTC at the edge (``UtcDatetime``; without an offset a time is UTC): a time whose UTC
  value falls outside the years 1 to 9999 (e.g. ``9999-12-31T23:00:00-05:00``) is a 422, not an overflow.
- Integers stored in the database stay within their column (``MAX_INT32``, ``MAX_INT64``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, AwareDatetime

from metering.events import MAX_INT32 as MAX_INT32  # INTEGER, re-exported

MAX_INT64 = 2**63 - 1  # BIGINT
NUL_MESSAGE = "text must not contain NUL (0x00) characters"


def has_nul(value: Any) -> bool:
    """Whether a JSON-like value (str, list, dict keys and values) holds a NUL character anywhere."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_nul(v) for v in value)
    return False


def no_nul(value: Any) -> Any:
    """A before-validator for body fields: refuses a NUL anywhere in the value."""
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


def _to_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time in UTC is out of range (years 1 to 9999)") from None


UtcDatetime = Annotated[datetime, AfterValidator(_to_utc)]  # query parameters: without an offset, UTC
AwareUtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]  # bodies: the offset is required
