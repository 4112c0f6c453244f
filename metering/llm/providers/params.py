"""Which of a purpose's params each provider's adapter sends (no SDK import: the settings store checks params with it).

The adapters pass on these names and ignore any other (logged at debug level); ``temperature`` is taken by the
metered client for every provider. ``simulated`` answers without any, so it takes every name (it stands in for the
others: offline, in tests). ``dropped_params_problem``: one message naming each param a provider would drop, and
what to do instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ANTHROPIC_BODY_PARAMS = ("top_p", "top_k")  # sent in the body (not every SDK version names them)
ANTHROPIC_PARAMS = ("stop_sequences", *ANTHROPIC_BODY_PARAMS)
OPENAI_PARAMS = ("top_p", "stop", "seed", "presence_penalty", "frequency_penalty")  # openai and openai_compatible
CLIENT_PARAMS = ("temperature",)  # the call's temperature unless the call gives one (metering.llm.client)
PASSED_PARAMS: Mapping[str, tuple[str, ...]] = {
    "anthropic": (*CLIENT_PARAMS, *ANTHROPIC_PARAMS),
    "openai": (*CLIENT_PARAMS, *OPENAI_PARAMS),
    "openai_compatible": (*CLIENT_PARAMS, *OPENAI_PARAMS),
}
# the other provider's name for the same param
_SPELLINGS: Mapping[str, Mapping[str, str]] = {
    "anthropic": {"stop": "stop_sequences"},
    "openai": {"stop_sequences": "stop"},
    "openai_compatible": {"stop_sequences": "stop"},
}
# output caps: never taken from params (each call sends its own max_tokens)
_OUTPUT_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_tokens_to_sample")


def dropped_params_problem(provider: str, params: Mapping[str, Any]) -> str | None:
    """Why ``params`` would not all reach ``provider`` (a stored provider name), or None when they would. A null value
    is no param: it is never sent, so it is never dropped either."""
    passed = PASSED_PARAMS.get(provider)
    if passed is None:  # simulated
        return None
    dropped = [name for name, value in params.items() if value is not None and name not in passed]
    if not dropped:
        return None
    problems = []
    for name in dropped:
        if name in _OUTPUT_CAPS:
            problems.append(
                f"params.{name}: a purpose cannot cap a call's output, each call sends its own max_tokens (the "
                "max_tokens of ctx.llm.create_message); to cap spend, set an enforced call budget with max_tokens "
                "(PUT /v1/admin/budgets/{extension_id}, metering budget set EXT --max-tokens N --mode enforce)"
            )
        elif (spelling := _SPELLINGS[provider].get(name)) is not None:
            problems.append(f"params.{name}: {provider} takes it as {spelling!r}: set params.{spelling} instead")
        else:
            problems.append(f"params.{name}: not sent to {provider}")
    return (
        f"{'; '.join(problems)}. The calls of a purpose of provider {provider!r} are sent only {', '.join(passed)} "
        "of its params; any other would be dropped at every call"
    )
