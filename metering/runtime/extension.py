"""ChatExtension and its ``@chat.function`` decorator."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

from pydantic import BaseModel

Handler = Callable[..., Awaitable[Any]]
_NAME = re.compile(r"^[a-z][a-z0-9_\-]{0,99}$")
ACTION_TYPES = ("read", "write", "destructive")


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    name: str
    handler: Handler
    description: str
    action_type: str
    effects: tuple[str, ...]
    params_model: type[BaseModel]


class ChatExtension:
    """A named set of chat functions. ``chat = ChatExtension("rewrite")`` then ``@chat.function(...)``."""

    def __init__(self, extension_id: str, *, description: str = "") -> None:
        if not _NAME.match(extension_id):
            raise ValueError(f"extension id {extension_id!r}: lowercase letters, digits, '_' or '-'")
        self.id = extension_id
        self.description = description
        self.functions: dict[str, FunctionSpec] = {}

    def __repr__(self) -> str:
        return f"ChatExtension({self.id!r}, functions={sorted(self.functions)})"

    def function(
        self,
        *,
        description: str,
        action_type: str = "read",
        effects: list[str] | tuple[str, ...] = (),
        name: str | None = None,
    ) -> Callable[[Handler], Handler]:
        if action_type not in ACTION_TYPES:
            raise ValueError(f"action_type must be one of {ACTION_TYPES}")

        def register(handler: Handler) -> Handler:
            if not inspect.iscoroutinefunction(handler):
                raise TypeError(f"{handler.__name__}: a chat function must be `async def handler(ctx, params)`")
            fn_name = name or handler.__name__
            if fn_name in self.functions:
                raise ValueError(f"function {fn_name!r} is already registered on {self.id!r}")
            params_model = _params_model(handler)
            self.functions[fn_name] = FunctionSpec(
                name=fn_name,
                handler=handler,
                description=description,
                action_type=action_type,
                effects=tuple(effects),
                params_model=params_model,
            )
            return handler

        return register


def _params_model(handler: Handler) -> type[BaseModel]:
    parameters = list(inspect.signature(handler).parameters)
    if len(parameters) != 2:
        raise TypeError(f"{handler.__name__}: a chat function takes exactly (ctx, params)")
    hint = get_type_hints(handler).get(parameters[1])
    if not (isinstance(hint, type) and issubclass(hint, BaseModel)):
        raise TypeError(f"{handler.__name__}: annotate params with a pydantic model")
    return hint
