"""Provider text is cleaned where it enters metering: no lone UTF-16 surrogate reaches a caller (pure)."""

from __future__ import annotations

import pytest

from metering.llm.text import ChunkCleaner, clean_text


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("Hello \ud83d there", "Hello \ufffd there"),  # half an emoji: the JSON escape "\ud83d" alone
        ("\ude00 low first", "\ufffd low first"),
        ("a pair \ud83d\ude00 as two code points", "a pair \U0001f600 as two code points"),
        ("r\u00e9sum\u00e9 \U0001f600", "r\u00e9sum\u00e9 \U0001f600"),
        ("plain ascii", "plain ascii"),
    ],
)
def test_lone_surrogates_are_replaced_and_pairs_kept(sent: str, kept: str) -> None:
    assert clean_text(sent) == kept
    kept.encode("utf-8")  # what failed the HTTP response after the call was billed


def test_valid_text_is_returned_as_is() -> None:
    text = "d\u00e9j\u00e0 vu \U0001f600"
    assert clean_text(text) is text


def test_a_pair_split_between_two_chunks_is_kept_and_an_unfinished_one_replaced() -> None:
    cleaner = ChunkCleaner()
    chunks = [cleaner.feed(c) for c in ("Hi \ud83d", "\ude00 there \ud83d", " and \ud83d")] + [cleaner.flush()]
    assert chunks == ["Hi ", "\U0001f600 there ", "\ufffd and ", "\ufffd"]
    assert cleaner.flush() == ""
