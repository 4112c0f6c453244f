"""parse_json_text: a model's JSON answer, with or without a Markdown code fence around it (pure)."""

from __future__ import annotations

import pytest

from metering.errors import InvalidJSONResponseError
from metering.llm.responses import parse_json_text


@pytest.mark.parametrize(
    "reply",
    [
        '{"items": []}',
        '```json\n{"items": []}\n```',
        '```\n{"items": []}\n```',
        '  ```JSON\n{"items": []}\n```  ',
        '```json\n{"items": []}',  # no closing fence
        # On one line: these were refused ("Expecting value") though the docstring promised a fence is tolerated.
        '```json {"items": []}```',
        '```json {"items": []} ```',
        '```{"items": []}```',
        '``` {"items": []} ```',
        '```{"items": []}\n```',
        # A fence line with more than a one-word info string (CommonMark allows it): its whole line goes.
        '```json title="x"\n{"items": []}\n```',
        '```json:output\n{"items": []}\n```',
        # The JSON starting on the fence's line and going on below it.
        '```json {\n"items": []\n}\n```',
        '```{\n"items": []}```',
    ],
)
def test_a_fenced_json_answer_is_parsed(reply: str) -> None:
    assert parse_json_text(reply) == {"items": []}


@pytest.mark.parametrize(("reply", "value"), [("```true```", True), ("```null```", None), ("```json\n[1]\n```", [1])])
def test_a_json_literal_in_a_fence_is_the_answer_not_an_info_string(reply: str, value: object) -> None:
    assert parse_json_text(reply) == value


def test_an_invalid_answer_is_a_typed_error_and_a_cut_off_one_says_so() -> None:
    with pytest.raises(InvalidJSONResponseError, match="not valid JSON") as info:
        parse_json_text("```json sure! here you go```")
    assert "cut off" not in info.value.message
    with pytest.raises(InvalidJSONResponseError, match=r"cut off at max_tokens=1500") as info:
        parse_json_text('{"items": [{"task": "Call', cut_off_at=1500)
    assert info.value.text == '{"items": [{"task": "Call'


def test_a_lone_surrogate_escaped_in_the_json_is_replaced() -> None:
    """A model writing its JSON with \\u escapes sent half an emoji: the parsed string could not be encoded."""
    assert parse_json_text('{"t\\ud800": ["Call \\ud83d", "ok \\ud83d\\ude00"]}') == {
        "t\ufffd": ["Call \ufffd", "ok 😀"]
    }


@pytest.mark.parametrize(
    "reply",
    [
        'Here are the action items:\n\n```json\n{"items": []}\n```',
        '```json\n{"items": []}\n```\nLet me know if you need anything else.',
        'Sure! ```json {"items": []}``` Hope this helps.',
        'Here you go:\n```\n{"items": []}\n```\n',
    ],
)
def test_the_one_fenced_block_of_a_reply_with_prose_around_it_is_parsed(reply: str) -> None:
    """Models often write a sentence before or after the fenced JSON: it was a 502 ("Expecting value")."""
    assert parse_json_text(reply) == {"items": []}


@pytest.mark.parametrize(
    "reply",
    [
        'Here are the items: {"items": []}',  # no fence: which part is the JSON is a guess
        'One:\n```json\n{"items": []}\n```\nOr:\n```json\n{"items": [1]}\n```',  # two blocks: which one?
        'Here:\n```json\n{"items": [{"task": "Call',  # a block never closed
        "Here:\n```json\nnot json\n```",
    ],
)
def test_a_reply_with_prose_and_no_one_fenced_json_block_is_still_refused(reply: str) -> None:
    with pytest.raises(InvalidJSONResponseError, match="not valid JSON") as info:
        parse_json_text(reply)
    assert info.value.text == reply


@pytest.mark.parametrize("reply", ["", "  \n ", "```json\n```"])
def test_an_empty_reply_says_it_is_empty(reply: str) -> None:
    """It said "not valid JSON (Expecting value)", as if the model had written something unreadable."""
    with pytest.raises(InvalidJSONResponseError, match=r"not valid JSON \(the reply is empty\)"):
        parse_json_text(reply)
    with pytest.raises(InvalidJSONResponseError, match=r"\(the reply is empty: the reply was cut off at max_tokens=9"):
        parse_json_text(reply, cut_off_at=9)


@pytest.mark.parametrize("stop_reason", ["content_filter", "refusal", "tool_use"])
def test_a_reply_stopped_for_another_reason_names_it(stop_reason: str) -> None:
    """A reply the content filter cut or the model refused said only "not valid JSON (Expecting value)"."""
    with pytest.raises(
        InvalidJSONResponseError, match=f"the provider stopped the reply, its stop reason '{stop_reason}'"
    ):
        parse_json_text("I can't help with that.", stop_reason=stop_reason)
    assert parse_json_text("[]", stop_reason=stop_reason) == []  # what parses is for the caller to judge


def test_a_reply_cut_off_by_the_context_window_says_it_was_cut_off() -> None:
    """It said "the provider stopped the reply", as of a content filter, where the model's context window ran out."""
    with pytest.raises(
        InvalidJSONResponseError, match="the reply was cut off where the model's context window ran out"
    ):
        parse_json_text('{"items": [{"ta', stop_reason="model_context_window_exceeded")


@pytest.mark.parametrize("stop_reason", [None, "end_turn", "stop_sequence", "max_tokens"])
def test_a_reply_that_finished_normally_names_no_stop_reason(stop_reason: str | None) -> None:
    with pytest.raises(InvalidJSONResponseError) as info:
        parse_json_text("not json", stop_reason=stop_reason)
    assert "stop reason" not in info.value.message
