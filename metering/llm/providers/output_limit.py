"""The output limit a provider states when it refuses a call's ``max_tokens``.

A model that caps its output (4,096 tokens for many OpenAI-compatible servers and older models) refuses a call asking
for more with a 400 whose message names its limit; the call can be made again at that limit (see
``MeteredLLM.create_message``). The wordings read:

- OpenAI: ``max_tokens is too large: 16384. This model supports at most 4096 completion tokens, whereas you provided
  16384.`` (``max_completion_tokens`` likewise);
- Anthropic: ``max_tokens: 16384 > 4096, which is the maximum allowed number of output tokens for <model>``;
- vLLM, whose limit is the context length, the prompt included: ``This model's maximum context length is 4216
  tokens. However, you requested 16504 tokens (120 in the messages, 16384 in the completion).`` and, in newer
  versions, ``… you requested 16384 output tokens and your prompt contains at least 120 input tokens …``: the
  context length less the prompt's tokens.
"""

from __future__ import annotations

import logging
import re

from metering.errors import ProviderError

log = logging.getLogger("metering.llm")

_STATED = (
    re.compile(r"supports at most (\d+) completion tokens"),
    re.compile(r"max_tokens: \d+ > (\d+), which is the maximum allowed number of output tokens"),
)
_CONTEXT = re.compile(r"maximum context length is (\d+) tokens")
_PROMPT = (re.compile(r"\((\d+) in the messages"), re.compile(r"prompt contains at least (\d+) input tokens"))


def stated_output_limit(message: str) -> int | None:
    """The most output tokens the provider's error ``message`` says the call could have asked for, if it says so."""
    for pattern in _STATED:
        if (stated := pattern.search(message)) is not None:
            return int(stated.group(1))
    if (context := _CONTEXT.search(message)) is not None:
        for pattern in _PROMPT:
            if (prompt := pattern.search(message)) is not None:
                return int(context.group(1)) - int(prompt.group(1))
    return None


def lower_limit(error: ProviderError, max_tokens: int) -> int | None:
    """The output limit the provider stated when it refused a call's ``max_tokens``, when it is below it (and above 0):
    the limit the call is made again at (once, on the same LLM: ``MeteredLLM.create_message``, ``stream_message``)."""
    limit = error.output_limit
    if limit is None or not 0 < limit < max_tokens:
        return None
    log.warning("max_tokens=%d refused by %s; asking for its stated limit, %d", max_tokens, error.provider, limit)
    return limit
