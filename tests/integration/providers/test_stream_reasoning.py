"""Reasoning text an OpenAI-compatible server streams beside the reply (DeepSeek's ``reasoning_content``; vLLM's,
OpenRouter's, Ollama's ``reasoning``; Mistral's ``thinking`` content parts): never handed to the consumer, but output
the provider charges, so a stream the provider did not report usage for (abandoned, broken, or a server that ignores
``include_usage``) estimates it too."""

from __future__ import annotations

import json

import pytest

from metering.errors import ProviderError
from metering.llm.usage import estimate_input_tokens, estimate_tokens
from tests.fakes import FakeOpenAIServer, Reply
from tests.integration.providers.test_metered_calls import MakeLLM, metered, the_event
from tests.unit.test_metered_llm import MESSAGES

__all__ = ["metered"]  # the fixture, used by name

REASONING = "Let me think about this step by step, weighing each option in turn. " * 20  # ≈ 345 tokens


DELTAS = {
    "reasoning_content": {"reasoning_content": REASONING},  # DeepSeek, SGLang
    "reasoning": {"reasoning": REASONING},  # vLLM, OpenRouter, Ollama
    "thinking-part": {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": REASONING}]}]},  # Mistral
}


def reasoning_frame(kind: str) -> bytes:
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "m-test",
        "choices": [{"index": 0, "delta": DELTAS[kind], "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@pytest.mark.parametrize("kind", list(DELTAS))
async def test_a_stream_broken_while_reasoning_is_metered(
    openai_server: FakeOpenAIServer, metered: MakeLLM, kind: str
) -> None:
    """A stream that broke (or was abandoned) after the model reasoned and before its first text was recorded with
    its usage `missing`: nothing used, billed $0, while the provider charged the prompt and the reasoning."""
    openai_server.script(Reply(text="The answer.", frame_before=(0, reasoning_frame(kind)), break_after=0))
    llm, rec = metered("openai", openai_server)
    with pytest.raises(ProviderError, match="stream"):
        async with llm.stream_message(messages=MESSAGES) as stream:
            assert [chunk async for chunk in stream] == []
    event = the_event(rec)
    assert (event.status, event.usage_completeness) == ("error", "estimated")
    assert (event.input_tokens, event.output_tokens) == (
        estimate_input_tokens(None, MESSAGES),
        estimate_tokens(REASONING),
    )


async def test_a_stream_without_usage_estimates_its_reasoning_too(
    openai_server: FakeOpenAIServer, metered: MakeLLM
) -> None:
    """A server that ignores `include_usage`: the output was estimated from the reply's text alone, the reasoning
    (here most of the output) unbilled."""
    text = "The answer is 42."
    openai_server.script(Reply(text=text, usage=None, frame_before=(0, reasoning_frame("reasoning_content"))))
    llm, rec = metered("openai", openai_server)
    async with llm.stream_message(messages=MESSAGES) as stream:
        assert "".join([chunk async for chunk in stream]) == text  # the reasoning is not handed on
    event = the_event(rec)
    assert (event.status, event.usage_completeness) == ("ok", "estimated")
    assert event.output_tokens == estimate_tokens(text + REASONING)
