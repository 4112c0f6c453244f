"""A deliberately misbehaving extension: it calls ``ctx.llm`` in a loop (the pattern cost reviews flag)."""

from metering.extensions.chatty.handlers import chat

__all__ = ["chat"]
