"""The byte budget of a rollup key's names (pure): what PostgreSQL can index, whatever the characters."""

from __future__ import annotations

from metering.billing.rollup import MAX_NAME_BYTES, NAME_COLUMNS, names_too_wide


def test_ascii_names_of_200_characters_always_fit() -> None:
    assert names_too_wide(["x" * 200] * len(NAME_COLUMNS)) is None


def test_the_budget_counts_utf8_bytes_not_characters() -> None:
    at_budget = ["\u4e00" * 123, *(["\u4e00" * 124] * 5), "\u4e00" * 122 + "abcde"]  # 2,600 bytes in UTF-8
    assert sum(len(n.encode()) for n in at_budget) == MAX_NAME_BYTES
    assert names_too_wide(at_budget) is None
    over = [*at_budget[:-1], at_budget[-1] + "c"]
    reason = names_too_wide(over)
    assert reason is not None and f"{MAX_NAME_BYTES + 1} bytes" in reason and "tenant_id" in reason


def test_four_byte_characters_are_counted_as_four() -> None:
    emoji = "\U0001f600"
    assert names_too_wide([emoji * 92] * len(NAME_COLUMNS)) is None  # 2,576 bytes
    assert names_too_wide([emoji * 93] * len(NAME_COLUMNS)) is not None  # 2,604 bytes
