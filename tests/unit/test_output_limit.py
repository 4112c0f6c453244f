"""The output limit a provider's refusal of max_tokens states, in each wording read (pure)."""

from __future__ import annotations

import pytest

from metering.llm.providers.output_limit import stated_output_limit


@pytest.mark.parametrize(
    ("message", "limit"),
    [
        (
            "max_tokens is too large: 10000. This model supports at most 4096 completion tokens, whereas you "
            "provided 10000.",
            4096,
        ),
        (
            "max_completion_tokens is too large: 65536. This model supports at most 16384 completion tokens, "
            "whereas you provided 65536.",
            16384,
        ),
        (
            "max_tokens: 8000 > 4096, which is the maximum allowed number of output tokens for claude-3-haiku-20240307",
            4096,
        ),
        (
            "This model's maximum context length is 6048 tokens. However, you requested 6616 tokens (568 in the "
            "messages, 6048 in the completion). Please reduce the length of the messages or completion.",
            5480,
        ),
        (
            "This model's maximum context length is 128000 tokens. However, you requested 65535 output tokens and "
            "your prompt contains at least 62466 input tokens, for a total of at least 128001 tokens.",
            65534,
        ),
        # the prompt alone is past the context: no output fits (the caller retries only below what it asked)
        (
            "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens (6952 in the "
            "messages, 2048 in the completion).",
            -2856,
        ),
        ("This model's maximum context length is 4096 tokens.", None),  # without the prompt's tokens: no limit
        ("max_tokens must be a positive integer", None),
        ("Invalid value for 'temperature'", None),
    ],
)
def test_the_stated_output_limit(message: str, limit: int | None) -> None:
    assert stated_output_limit(message) == limit
