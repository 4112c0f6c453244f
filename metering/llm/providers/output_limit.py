"""The output limit a provider states when it refuses a call's ``max_tokens``.

A model that caps its output (4,096 tokens for many OpenAI-compatible servers and older models) refuses a call asking
for more with a 400 whose message names its limit; the call can be made again at that limit (see
``MeteredLLM.create_message``). The wordings read:

- OpenAI: ``max_tokens is too large: 16384. This model supports at most 4096 completion tokens, whereas you provided
  16384.`` (``max_completion_tokens`` likewise);
- Anthropic: ``max_tokens: 16384 > 4096, which is the maximum allowed number of output tokens for <model>``;
- vLLM (and OpenAI's older models), whose limit is the context length, the prompt included: ``This model's maximum
  context length is 4216 tokens. However, you requested 16504 tokens (120 in the messages, 16384 in the
  completion).`` (the context length less everything requested but the completion: the messages, and the functions
  when OpenAI counts them too) and, in newer vLLM versions, ``… you requested 16384 output tokens and your prompt
  contains at least 120 input tokens …``: the context length less the prompt's tokens.

Each is read as a whole sentence that also names the ``max_tokens`` refused (``StatedLimit.requested``): a limit is
the call's only when that is the call's own (``lower_limit``). A 400 for another reason may echo the prompt (a
server's validation error), and a number the user wrote there, even in one of these wordings, is no limit of the
model's.
"""

from __future__ import annotations

import logging
import re
from typing import NamedTuple

from metering.errors import ProviderError

log = logging.getLogger("metering.llm")


class StatedLimit(NamedTuple):
    requested: int  # the max_tokens the refusal names
    limit: int  # the most output tokens it says the call could have asked for (may be 0 or less: none fit)


_STATED = (
    re.compile(r"supports at most (?P<limit>\d+) completion tokens, whereas you provided (?P<requested>\d+)"),
    re.compile(
        r"max_tokens: (?P<requested>\d+) > (?P<limit>\d+), which is the maximum allowed number of output tokens"
    ),
)
_CONTEXT = r"maximum context length is (?P<context>\d+) tokens\. However, you requested "
# everything requested but the completion: (total - completion) tokens of the context are taken
_REQUESTED_TOTAL = re.compile(
    _CONTEXT + r"(?P<total>\d+) tokens \((?:\d+ in the \w+, )+(?:and )?(?P<requested>\d+) in the completion\)"
)
_PROMPT_AT_LEAST = re.compile(
    _CONTEXT + r"(?P<requested>\d+) output tokens and your prompt contains at least (?P<prompt>\d+) input tokens"
)


def stated_output_limit(message: str) -> StatedLimit | None:
    """The ``max_tokens`` the provider's error ``message`` refuses and the most output tokens it says the call could
    have asked for, if it says so in one of the wordings read."""
    for pattern in _STATED:
        if (stated := pattern.search(message)) is not None:
            return StatedLimit(int(stated["requested"]), int(stated["limit"]))
    if (total := _REQUESTED_TOTAL.search(message)) is not None:
        requested = int(total["requested"])
        return StatedLimit(requested, int(total["context"]) - (int(total["total"]) - requested))
    if (prompt := _PROMPT_AT_LEAST.search(message)) is not None:
        return StatedLimit(int(prompt["requested"]), int(prompt["context"]) - int(prompt["prompt"]))
    return None


def lower_limit(error: ProviderError, max_tokens: int) -> int | None:
    """The output limit the provider stated when it refused this call's ``max_tokens`` (the refusal names it), when
    it is below it (and above 0): the limit the call is made again at (once, on the same LLM:
    ``MeteredLLM.create_message``, ``stream_message``)."""
    if error.output_limit is None:
        return None
    requested, limit = error.output_limit
    if requested != max_tokens or not 0 < limit < max_tokens:
        return None
    log.warning("max_tokens=%d refused by %s; asking for its stated limit, %d", max_tokens, error.provider, limit)
    return limit
