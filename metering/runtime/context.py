"""What a handler sees: the user, the tenant, the extension, and the metered ``llm``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from metering.llm.client import MeteredLLM


@dataclass(frozen=True, slots=True)
class User:
    id: str
    tenant_id: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Context:
    user: User
    extension_id: str
    function: str
    invocation_id: uuid.UUID
    llm: MeteredLLM

    @property
    def tenant_id(self) -> str:
        return self.user.tenant_id
