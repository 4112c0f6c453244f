"""Money as integer nano-units (1e-9 USD), ``Decimal`` in code, never float.

Amounts are computed in ``Decimal`` and converted to nanos once, at the end; invoice totals are
rounded once, half-even, to cents, and the rounding residue is kept visible.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext

NANO = Decimal(10**9)
NANOS_PER_USD = 10**9
NANOS_PER_CENT = 10**7
_CENTS_EXPONENT = 7  # a cent is 10**7 nanos
_EXACT = Context(prec=60, rounding=ROUND_HALF_EVEN)


# An amount as text: ASCII digits, an optional sign and decimal point. Decimal() also takes "1_000", " 5 ", "1e3",
# "Infinity" and digits of other scripts (full-width, Arabic-Indic...): for money, each is more likely a mistake.
_PLAIN_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def is_plain_decimal(text: str) -> bool:
    """Digits 0-9 with an optional sign and point (no exponent, no separators, no spaces)."""
    return _PLAIN_DECIMAL.fullmatch(text) is not None


def plain_decimal(text: str) -> Decimal:
    """``text`` as a Decimal if it is a plain decimal number (e.g. ``25``, ``-3.50``); ``ValueError`` otherwise."""
    if not is_plain_decimal(text):
        raise ValueError("not a plain decimal number (digits 0-9, an optional sign and point, e.g. 25.00)")
    return Decimal(text)


def to_nanos(amount: Decimal) -> int:
    """USD ``amount`` as integer nanos: exact when ``amount`` has at most 9 decimals, else half-even."""
    if not isinstance(amount, Decimal):
        raise TypeError(f"to_nanos expects a Decimal, got {type(amount).__name__}")
    if not amount.is_finite():
        raise ValueError(f"cannot convert a non-finite amount to nanos: {amount}")
    with localcontext(_EXACT):
        return int((amount * NANO).to_integral_value(rounding=ROUND_HALF_EVEN))


def from_nanos(nanos: int) -> Decimal:
    """Integer nanos as an exact USD ``Decimal`` with 9 decimals (``1_500_000_000`` -> ``Decimal("1.500000000")``)."""
    if not isinstance(nanos, int) or isinstance(nanos, bool):
        raise TypeError(f"from_nanos expects an int, got {type(nanos).__name__}")
    with localcontext(_EXACT):
        return Decimal(nanos).scaleb(-9)


def decimal_text(nanos: int | None) -> str | None:
    """Integer nanos as an exact decimal string with 9 decimals, never an exponent (``None`` stays ``None``)."""
    return None if nanos is None else format(from_nanos(nanos), "f")


def round_cents(nanos: int) -> tuple[int, int]:
    """Round ``nanos`` half-even to whole cents: ``(cents_nanos, residue_nanos)``.

    ``cents_nanos`` is a multiple of 10**7 and ``cents_nanos + residue_nanos == nanos`` always.
    """
    if not isinstance(nanos, int) or isinstance(nanos, bool):
        raise TypeError(f"round_cents expects an int, got {type(nanos).__name__}")
    with localcontext(_EXACT):
        cents = int(Decimal(nanos).scaleb(-_CENTS_EXPONENT).to_integral_value(rounding=ROUND_HALF_EVEN))
    cents_nanos = cents * NANOS_PER_CENT
    return cents_nanos, nanos - cents_nanos


def format_usd(nanos: int) -> str:
    """Human-readable USD with at least 2 and at most 9 decimals, exact (no rounding).

    ``1_500_000_000`` -> ``"$1.50"``, ``1_500`` -> ``"$0.0000015"``, ``-1_234_560_000_000`` -> ``"-$1,234.56"``.
    """
    if not isinstance(nanos, int) or isinstance(nanos, bool):
        raise TypeError(f"format_usd expects an int, got {type(nanos).__name__}")
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), 10**9)
    decimals = f"{frac:09d}".rstrip("0").ljust(2, "0")
    return f"{sign}${whole:,}.{decimals}"
