"""Event names that are valid one by one (at most 200 characters each) but together too wide for PostgreSQL's
indexes of the rollup keys (2,704 bytes per index entry): CJK text, 3 bytes a character in UTF-8."""

from __future__ import annotations

NAME_FIELDS = ("tenant_id", "user_id", "extension_id", "function", "purpose", "provider", "model")


def cjk(nbytes: int, seed: int) -> str:
    """``nbytes`` of UTF-8: varied CJK characters (3 bytes each, not compressible by repetition), then ASCII."""
    text = "".join(chr(0x4E00 + (seed * 977 + i * 131) % 20000) for i in range(nbytes // 3))
    return text + "a" * (nbytes % 3)


def wide_names(total_bytes: int) -> dict[str, str]:
    """The seven names of an event, taking ``total_bytes`` of UTF-8 together (spread evenly, ≤ 200 characters)."""
    per, extra = divmod(total_bytes, len(NAME_FIELDS))
    return {name: cjk(per + (i < extra), i) for i, name in enumerate(NAME_FIELDS)}
