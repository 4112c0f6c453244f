"""API tokens: scoped bearer secrets for the HTTP service, stored only as SHA-256 digests.

``tokens`` is pure (formats, digests, scopes, the principal); ``store`` is the repository (it only flushes).
"""

from metering.auth.store import authenticate, create_token, get_token, list_tokens, revoke, revoke_token
from metering.auth.tokens import Scope, TokenPrincipal

__all__ = [
    "Scope",
    "TokenPrincipal",
    "authenticate",
    "create_token",
    "get_token",
    "list_tokens",
    "revoke",
    "revoke_token",
]
