"""Which errors say an OpenAI-compatible endpoint does not take ``stream_options`` (pure: the SDK's error objects)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from metering.llm.providers.openai import refuses_stream_options


def status_error(status: int, body: Any) -> openai.APIStatusError:
    response = httpx.Response(status, request=httpx.Request("POST", "http://127.0.0.1/v1/chat/completions"))
    return openai.APIStatusError("refused", response=response, body=body)


@pytest.mark.parametrize(
    "message",
    [
        "Unrecognized request argument supplied: stream_options",  # Azure OpenAI before 2024-09-01-preview
        "Unknown parameter: 'stream_options'.",  # a gateway
        "stream_options: Extra inputs are not permitted",  # a pydantic server
    ],
)
def test_a_refusal_of_the_option_is_recognised(message: str) -> None:
    assert refuses_stream_options(status_error(400, {"error": {"message": message}}))
    assert refuses_stream_options(status_error(422, {"message": message}))


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"error": {"message": "max_tokens is too large: the prompt says stream_options and unknown words"}}),
        (400, {"error": {"message": "Invalid value for stream_options.include_usage."}}),  # not a refusal of it
        (400, {"detail": [{"input": {"stream_options": {"include_usage": True}}, "msg": "unknown model"}]}),
        (500, {"error": {"message": "Unrecognized request argument supplied: stream_options"}}),
        (400, None),
    ],
)
def test_other_errors_are_not(status: int, body: Any) -> None:
    assert not refuses_stream_options(status_error(status, body))
