"""Money in integer nanos: exact conversions, half-even cents with a visible residue."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering.billing.money import NANO, NANOS_PER_CENT, format_usd, from_nanos, plain_decimal, round_cents, to_nanos


def test_nano_is_one_billion():
    assert Decimal(10**9) == NANO
    assert NANOS_PER_CENT == 10_000_000


@pytest.mark.parametrize(
    ("amount", "nanos"),
    [
        (Decimal("0"), 0),
        (Decimal("1"), 1_000_000_000),
        (Decimal("2.145"), 2_145_000_000),
        (Decimal("0.000000001"), 1),
        (Decimal("-3.5"), -3_500_000_000),
        (Decimal("123456789.123456789"), 123_456_789_123_456_789),
    ],
)
def test_to_nanos_exact(amount, nanos):
    assert to_nanos(amount) == nanos


@pytest.mark.parametrize(
    ("amount", "nanos"),
    [
        (Decimal("0.0000000005"), 0),  # half to even (0)
        (Decimal("0.0000000015"), 2),  # half to even (2)
        (Decimal("0.0000000025"), 2),  # half to even (2), not 3
        (Decimal("0.00000000250001"), 3),  # above half
        (Decimal("-0.0000000015"), -2),
        (Decimal("0.0000000004999"), 0),
    ],
)
def test_to_nanos_rounds_half_even_below_a_nano(amount, nanos):
    assert to_nanos(amount) == nanos


def test_to_nanos_rejects_float_and_non_finite():
    with pytest.raises(TypeError):
        to_nanos(0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        to_nanos(Decimal("NaN"))
    with pytest.raises(ValueError):
        to_nanos(Decimal("Infinity"))


def test_from_nanos_exact():
    assert from_nanos(1_500_000_000) == Decimal("1.5")
    assert str(from_nanos(1_500_000_000)) == "1.500000000"
    assert from_nanos(1) == Decimal("0.000000001")
    assert from_nanos(-7) == Decimal("-0.000000007")
    with pytest.raises(TypeError):
        from_nanos(1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("nanos", "cents_nanos", "residue"),
    [
        (0, 0, 0),
        (2_145_000_000, 2_140_000_000, 5_000_000),  # $2.145 -> $2.14 (half to even 214)
        (2_155_000_000, 2_160_000_000, -5_000_000),  # $2.155 -> $2.16 (half to even 216)
        (2_145_000_001, 2_150_000_000, -4_999_999),  # just above half rounds up
        (4_999_999, 0, 4_999_999),
        (5_000_000, 0, 5_000_000),  # half a cent -> 0 cents (even)
        (15_000_000, 20_000_000, -5_000_000),  # 1.5 cents -> 2 cents (even)
        (-15_000_000, -20_000_000, 5_000_000),
    ],
)
def test_round_cents_half_even(nanos, cents_nanos, residue):
    assert round_cents(nanos) == (cents_nanos, residue)


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "$0.00"),
        (1_500_000_000, "$1.50"),
        (1_500, "$0.0000015"),
        (1, "$0.000000001"),
        (1_234_560_000_000, "$1,234.56"),
        (-2_000_000_000, "-$2.00"),
        (2_145_000_000, "$2.145"),
    ],
)
def test_format_usd(nanos, text):
    assert format_usd(nanos) == text


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_round_cents_keeps_total_and_is_nearest(nanos):
    cents_nanos, residue = round_cents(nanos)
    assert cents_nanos + residue == nanos
    assert cents_nanos % NANOS_PER_CENT == 0
    assert abs(residue) <= NANOS_PER_CENT // 2
    if abs(residue) == NANOS_PER_CENT // 2:  # a tie goes to the even cent
        assert (cents_nanos // NANOS_PER_CENT) % 2 == 0


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_nanos_round_trip(nanos):
    assert to_nanos(from_nanos(nanos)) == nanos
    assert Decimal(format_usd(nanos).replace("$", "").replace(",", "")) == from_nanos(nanos)


@pytest.mark.parametrize("text", ["25", "25.00", "-3.5", "+7", ".5", "5.", "0.000000001"])
def test_plain_decimals_are_read_exactly(text: str) -> None:
    assert plain_decimal(text) == Decimal(text)


@pytest.mark.parametrize(
    "text", ["1_000", "\uff12\uff15", "\u0665", " 5 ", "5 ", "1e3", "Infinity", "NaN", "", "-", ".", "1,5", "0x10"]
)
def test_anything_else_is_refused_without_echoing_it(text: str) -> None:
    with pytest.raises(ValueError, match="not a plain decimal number") as caught:
        plain_decimal(text)
    assert len(text.strip()) < 3 or text.strip() not in str(caught.value)  # (short ones appear in "e.g. 25.00")
