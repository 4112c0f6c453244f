"""The chatty demo extension: an unbounded number of calls on purpose, but each input bounded and typed (no DB)."""

from __future__ import annotations

from typing import Any

import pytest

from metering.errors import InvalidInputError
from metering.extensions.chatty import chat as chatty
from metering.extensions.chatty.schemas import MAX_MESSAGE_CHARS
from metering.runtime import User
from tests.unit.test_rewrite_extension import simulated

USER = User("user-1", "tenant-1")


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"messages": ["x" * (MAX_MESSAGE_CHARS + 1)], "polish_rounds": 0}, "at most 4000 characters"),  # never applied
        ({"messages": ["hi"], "polish_rounds": "2"}, "valid integer"),  # was read as 2
        ({"messages": ["hi"], "polish_rounds": True}, "valid integer"),  # was read as 1
        ({"messages": ["hi"], "polish_rounds": 2.0}, "valid integer"),
        ({"messages": ["hi", 3]}, "valid string"),
    ],
)
async def test_params_are_bounded_and_strict_and_refused_without_a_call(params: dict[str, Any], reason: str) -> None:
    runtime, rec = simulated()
    with pytest.raises(InvalidInputError, match=reason):
        await runtime.invoke(chatty, "summarize_thread", params, USER)
    assert rec.events == []


async def test_the_number_of_calls_still_grows_with_the_thread() -> None:
    runtime, rec = simulated()
    messages = ["x" * MAX_MESSAGE_CHARS] * 12
    result = await runtime.invoke(chatty, "summarize_thread", {"messages": messages, "polish_rounds": 2}, USER)
    assert result.result["llm_calls"] == len(rec.events) == 12 + 2
