"""Provider text made safe for whatever the caller does with it next (pure, on the metered hot path).

A provider's JSON may hold a lone UTF-16 surrogate (the escape ``"\\ud83d"`` alone: half an emoji), which Python
decodes into a ``str`` that cannot be encoded as UTF-8: a handler returning it failed the HTTP invoke with a 500
while writing the response, after the call was billed. Text enters metering through ``clean_text`` (a reply) or a
``ChunkCleaner`` (a stream): lone surrogates become U+FFFD, a valid pair (two code points) becomes its character.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


def _is_high_surrogate(char: str) -> bool:
    return "\ud800" <= char <= "\udbff"


def clean_text(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD and surrogate pairs joined; ``text`` itself when valid."""
    if text.isascii():  # the common case: one C pass, no copy
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def clean_json_value(value: Any) -> Any:
    """``value`` (parsed JSON) with ``clean_text`` applied to every string in it, keys included."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_json_value(item) for item in value]
    if isinstance(value, dict):
        return {clean_text(key): clean_json_value(item) for key, item in value.items()}
    return value


class ChunkCleaner:
    """``clean_text`` for a stream's chunks: a high surrogate ending one chunk is held for the next, so a pair
    split between two chunks is kept; one never completed becomes U+FFFD (``flush``)."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        if self._held:
            text, self._held = self._held + text, ""
        elif text.isascii():
            return text
        if text and _is_high_surrogate(text[-1]):
            text, self._held = text[:-1], text[-1]
        return clean_text(text)

    def flush(self) -> str:
        """What is still held at the end of the stream: U+FFFD for half a pair, else nothing."""
        held, self._held = self._held, ""
        return REPLACEMENT if held else ""
