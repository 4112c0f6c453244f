"""Bundled extensions. They use ``ctx.llm`` only: no provider SDK is imported here (a test checks)."""

from metering.extensions.chatty import chat as chatty_extension
from metering.extensions.rewrite import chat as rewrite_extension
from metering.runtime import ChatExtension

BUNDLED: dict[str, ChatExtension] = {ext.id: ext for ext in (rewrite_extension, chatty_extension)}


def get_extension(extension_id: str) -> ChatExtension | None:
    return BUNDLED.get(extension_id)
