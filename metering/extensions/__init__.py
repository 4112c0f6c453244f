"""Bundled extensions. They use ``ctx.llm`` only: no provider SDK is imported here (a test checks)."""

from metering.extensions.rewrite import chat as rewrite_extension
from metering.runtime import ChatExtension

BUNDLED: dict[str, ChatExtension] = {rewrite_extension.id: rewrite_extension}


def get_extension(extension_id: str) -> ChatExtension | None:
    return BUNDLED.get(extension_id)
