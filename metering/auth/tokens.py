"""Token formats, digests, scopes and the authenticated principal. Pure: no I/O, no SQLAlchemy, no settings."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from metering.errors import InvalidInputError

TOKEN_PREFIX = "mtr_"
PREFIX_LENGTH = 8  # "mtr_" + 4 characters of the random part: enough to tell tokens apart in a list
MAX_TOKEN_LENGTH = 200  # anything longer is not one of ours; refused before hashing
MAX_NAME_LENGTH = 200
# The reason POST /v1/events gives an event of another tenant than its token's; a spool's HTTP sink keeps such events
# for retry (the token is the operator's to fix), so both sides name it here.
TENANT_MISMATCH = "tenant mismatch"


class Scope(StrEnum):
    """What a token may do. Scopes are independent: ``admin`` does not imply ``ingest`` or ``read``."""

    INGEST = "ingest"  # POST usage events
    READ = "read"  # read usage, ledger, invoices
    ADMIN = "admin"  # settings, overrides, credits, tokens


@dataclass(frozen=True, slots=True)
class TokenPrincipal:
    """Who an authenticated request acts as."""

    token_id: uuid.UUID
    name: str
    scopes: frozenset[Scope]
    tenant_id: str | None = None  # None: any tenant

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes

    def may_act_for(self, tenant_id: str) -> bool:
        return self.tenant_id is None or self.tenant_id == tenant_id


def new_secret() -> str:
    """A new token secret: ``mtr_`` and 32 random bytes, URL-safe base64 (47 characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """The stored form of a secret: its SHA-256, hex. Secrets are random, so no salt or slow hash is needed."""
    return hashlib.sha256(secret.encode()).hexdigest()


def prefix_of(secret: str) -> str:
    return secret[:PREFIX_LENGTH]


def display_prefix(prefix: str) -> str:
    return f"{prefix}…"


def well_formed(secret: str) -> bool:
    """Could this be one of our tokens? (Refuses garbage before any lookup; the format is not secret.)"""
    return secret.startswith(TOKEN_PREFIX) and PREFIX_LENGTH < len(secret) <= MAX_TOKEN_LENGTH


def digests_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return hmac.compare_digest(a.encode(), b.encode())


def parse_scopes(values: Iterable[str | Scope]) -> tuple[Scope, ...]:
    """Known scopes, deduplicated and sorted; at least one."""
    scopes: set[Scope] = set()
    for value in values:
        try:
            scopes.add(Scope(value))
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise InvalidInputError(f"unknown scope {value!r} (known: {known})") from None
    if not scopes:
        raise InvalidInputError("a token needs at least one scope")
    return tuple(sorted(scopes))


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidInputError(f"a token name has 1 to {MAX_NAME_LENGTH} characters")
    return name


def check_tenant(tenant_id: str | None) -> str | None:
    if tenant_id is None:
        return None
    if not tenant_id or len(tenant_id) > 200:
        raise InvalidInputError("a tenant id has 1 to 200 characters")
    return tenant_id
