"""The output limit a provider's refusal of max_tokens states, in each wording read (pure)."""

from __future__ import annotations

import httpx
import openai
import pytest

from metering.errors import ProviderError
from metering.llm.providers._errors import from_sdk_error
from metering.llm.providers.output_limit import lower_limit, stated_output_limit


@pytest.mark.parametrize(
    ("message", "limit"),
    [
        (
            "max_tokens is too large: 10000. This model supports at most 4096 completion tokens, whereas you "
            "provided 10000.",
            (10000, 4096),
        ),
        (
            "max_completion_tokens is too large: 65536. This model supports at most 16384 completion tokens, "
            "whereas you provided 65536.",
            (65536, 16384),
        ),
        (
            "max_tokens: 8000 > 4096, which is the maximum allowed number of output tokens for claude-3-haiku-20240307",
            (8000, 4096),
        ),
        (
            "This model's maximum context length is 6048 tokens. However, you requested 6616 tokens (568 in the "
            "messages, 6048 in the completion). Please reduce the length of the messages or completion.",
            (6048, 5480),
        ),
        (
            "This model's maximum context length is 128000 tokens. However, you requested 65535 output tokens and "
            "your prompt contains at least 62466 input tokens, for a total of at least 128001 tokens.",
            (65535, 65534),
        ),
        # the prompt alone is past the context: no output fits (the caller retries only below what it asked)
        (
            "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens (6952 in the "
            "messages, 2048 in the completion).",
            (2048, -2856),
        ),
        ("This model's maximum context length is 4096 tokens.", None),  # without the prompt's tokens: no limit
        ("max_tokens must be a positive integer", None),
        ("Invalid value for 'temperature'", None),
    ],
)
def test_the_stated_output_limit(message: str, limit: tuple[int, int] | None) -> None:
    assert stated_output_limit(message) == limit


def _refusal(message: str) -> ProviderError:
    """The ProviderError the OpenAI adapters make of a 400 saying ``message`` (the SDK's own exception)."""
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    body = {"error": {"message": message, "type": "BadRequestError"}}
    exc = openai.BadRequestError(message, response=httpx.Response(400, request=request), body=body)
    return from_sdk_error(exc, openai, provider="openai_compatible", api_key=None)


@pytest.mark.parametrize(
    ("message", "asked", "limit"),
    [
        # the wordings read, each naming the max_tokens the call asked for
        (
            "max_tokens is too large: 9000. This model supports at most 4096 completion tokens, whereas you provided "
            "9000.",
            9000,
            4096,
        ),
        ("max_tokens: 9000 > 4096, which is the maximum allowed number of output tokens for m", 9000, 4096),
        # the functions take room in the context too: 4097 - 1000 - 500, not 4097 - 1000 (refused again)
        (
            "This model's maximum context length is 4097 tokens. However, you requested 4500 tokens (1000 in the "
            "messages, 500 in the functions, and 3000 in the completion). Please reduce the length of the messages, "
            "functions, or completion.",
            3000,
            2597,
        ),
        # a 400 for another reason that echoes the prompt, in which the user wrote a limit: not the model's
        (
            "1 validation error for ChatCompletionRequest\nmessages.1.content\n  Input should be a valid string "
            "[type=string_type, input_value=[{'type': 'txt', 'text': 'Our bot supports at most 16 completion tokens "
            "only'}], input_type=list]",
            2048,
            None,
        ),
        (
            "1 validation error: input_value='max_tokens: 99999 > 16, which is the maximum allowed number of output "
            "tokens for you', input_type=str",
            2048,
            None,
        ),
        # a refusal of another max_tokens than the call's (a proxy's, or echoed): no limit of this call
        (
            "max_tokens is too large: 9000. This model supports at most 4096 completion tokens, whereas you provided "
            "9000.",
            8000,
            None,
        ),
    ],
)
def test_the_limit_a_refused_call_is_made_again_at(message: str, asked: int, limit: int | None) -> None:
    assert lower_limit(_refusal(message), asked) == limit
