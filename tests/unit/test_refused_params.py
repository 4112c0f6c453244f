"""Which errors say an OpenAI-compatible endpoint does not take an optional parameter (pure: the SDK's error objects):
``stream_options`` (Azure before 2024-09-01-preview, gateways), a json_object ``response_format`` (LM Studio)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from metering.llm.providers.openai import refused_param

SENT = {"model": "m", "messages": [], "stream_options": {"include_usage": True}, "response_format": {"type": "x"}}


def status_error(status: int, body: Any) -> openai.APIStatusError:
    response = httpx.Response(status, request=httpx.Request("POST", "http://127.0.0.1/v1/chat/completions"))
    return openai.APIStatusError("refused", response=response, body=body)


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("Unrecognized request argument supplied: stream_options", "stream_options"),  # Azure
        ("Unknown parameter: 'stream_options'.", "stream_options"),  # a gateway
        ("stream_options: Extra inputs are not permitted", "stream_options"),  # a pydantic server
        ("'response_format.type' must be 'json_schema' or 'text'", "response_format"),  # LM Studio
        ("response_format is not supported by this model", "response_format"),
        (
            "Invalid parameter: 'response_format' of type 'json_object' is not supported with this model.",
            "response_format",
        ),
    ],
)
def test_a_refusal_of_an_optional_parameter_names_it(message: str, param: str) -> None:
    assert refused_param(status_error(400, {"error": {"message": message}}), SENT) == param
    assert refused_param(status_error(422, {"message": message}), SENT) == param
    assert refused_param(status_error(400, {"error": {"message": message}}), {"model": "m"}) is None  # not sent


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"error": {"message": "max_tokens is too large: the prompt says stream_options and unknown words"}}),
        (400, {"error": {"message": "Invalid value for stream_options.include_usage."}}),
        (400, {"detail": [{"input": {"stream_options": {"include_usage": True}}, "msg": "unknown model"}]}),
        (500, {"error": {"message": "Unrecognized request argument supplied: stream_options"}}),
        (400, {"error": {"message": "Unknown parameter: 'temperature'."}}),  # not one the call can go without
        (400, None),
    ],
)
def test_other_errors_name_none(status: int, body: Any) -> None:
    assert refused_param(status_error(status, body), SENT) is None
