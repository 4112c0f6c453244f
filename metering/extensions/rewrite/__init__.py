"""The reference workload: a "rewrite my message" tool built on ``ctx.llm`` only."""

from metering.extensions.rewrite.handlers import chat

__all__ = ["chat"]
