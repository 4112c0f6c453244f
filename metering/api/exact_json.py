"""JSON bodies whose fractional numbers keep the text they were sent as (money routes).

FastAPI reads a body with ``Request.json()``, the stdlib's ``json.loads``, which makes a number with a fraction a
binary float before any validator sees it: a credit of ``123456789.123456789`` became ``123456789.12345679`` (a nano
more than sent) and ``2.00000000000000000001``, finer than a nano and refused as text, became ``2.0``. Here such a
number is a ``JsonNumber``: the same float (every other field reads it as before), carrying its text, which the money
fields (``admin_schemas``) read exactly when it is a plain decimal.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from metering.api.request_route import RequestClassRoute


class JsonNumber(float):
    """A JSON number with a fraction or an exponent: its float value, and ``text`` as it was sent."""

    text: str

    def __new__(cls, text: str) -> JsonNumber:
        number = super().__new__(cls, text)
        number.text = text
        return number


class ExactNumbersRequest(Request):
    """A request whose JSON body's fractional numbers are ``JsonNumber`` (integers stay ``int``)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_float=JsonNumber)  # json.loads' errors, as Request.json
        return self._json


class ExactNumbersRoute(RequestClassRoute):
    """Routes whose endpoints get an ``ExactNumbersRequest`` (FastAPI's custom request class pattern)."""

    request_class = ExactNumbersRequest
