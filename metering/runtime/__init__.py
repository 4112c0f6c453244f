"""A minimal extension runtime: ChatExtension, @chat.function, Context, invoke()."""

from metering.runtime.context import Context, User
from metering.runtime.extension import ChatExtension, FunctionSpec
from metering.runtime.invoke import InvocationResult, Runtime

__all__ = ["ChatExtension", "Context", "FunctionSpec", "InvocationResult", "Runtime", "User"]
