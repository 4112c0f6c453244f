"""The audit log of admin changes (SQL; only flushes: the entry commits with the change it records).

``record`` is called by the edge in the same session as the change, after it, so the change and its entry
commit together and a change that fails leaves no entry, and so does a write that changes nothing (``before``
equals ``after``, unless the caller says a secret changed). ``before`` and ``after`` are redacted first: the
value of any key named like a secret (``api_key``, ``secret``, ``token``, ``password``, ...) becomes
``"***"``, recursively; flags (``true``/``false``) and ``null`` are kept, so an entry still says whether a
key was set. The actor is an API token (the API) or a ``LocalActor`` without one (the CLI: ``cli:<user>@<host>``,
``actor_token_id`` NULL); what an entry records of each change comes from ``metering.audit_snapshots``, so an
entry reads the same whichever edge made the change. Entries are read newest first with keyset pagination
(``(at, id)``, an opaque cursor).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any, Protocol

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from metering.db.models import AuditLogRow
from metering.errors import InvalidInputError
from metering.events import utcnow, uuid7

REDACTED = "***"
MAX_TARGET = 500
MAX_REQUEST_ID = 200
MAX_LIMIT = 500
MAX_ACTOR_NAME = 200  # the column

_SECRET_WORDS = (
    r"api_?key|apikey|secret|secret_key|client_secret|private_key|access_key|token|access_token|refresh_token"
    r"|password|passwd|passphrase|credentials?|authorization|cookie|ciphertext"
)
# Their plurals too (a list of keys is as secret as one), except a bare "tokens": "max_tokens" is a token count; the
# kinds of token whose singular is a secret name (``api_token``: "token") are listed.
_PLURAL_WORDS = (
    r"api_?key|apikey|secret|private_key|access_key|access_token|refresh_token|auth_token|api_token|bearer_token"
    r"|session_token|oauth_token|id_token|password|passwd|passphrase|credential|cookie|ciphertext"
)
_SECRET_NAME = re.compile(rf"(?:^|_)(?:{_SECRET_WORDS}|(?:{_PLURAL_WORDS})s)(?:_|$)")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


class Actor(Protocol):
    """Who made the change: an API token (``TokenPrincipal`` is one), or someone without one (``LocalActor``)."""

    @property
    def token_id(self) -> uuid.UUID | None: ...

    @property
    def name(self) -> str: ...


@dataclass(frozen=True, slots=True)
class LocalActor:
    """An actor without an API token, e.g. the CLI run by ``cli:<os user>@<host>``."""

    name: str
    token_id: uuid.UUID | None = None


def is_secret_name(key: str) -> bool:
    """``api_key``, ``apiKey``, ``X-Api-Key``, ``client_secret``, ``password``, ``api_keys``: yes. ``max_tokens``,
    ``tokens``: no."""
    normalised = _CAMEL.sub("_", key).replace("-", "_").replace(" ", "_").lower()
    return bool(_SECRET_NAME.search(normalised))


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, bytes | bytearray):
        return REDACTED  # binary in an audit payload can only be key material or ciphertext
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return REDACTED  # SecretStr and anything else of unknown shape: never str() it into the log


def secret_keys(value: Any, path: str = "") -> list[str]:
    """Where ``value`` holds a (non-null, non-flag) value under a secret-named key: ``["params.api_key"]``."""
    found: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if is_secret_name(str(key)) and item is not None and not isinstance(item, bool):
                found.append(where)
            else:
                found.extend(secret_keys(item, where))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found.extend(secret_keys(item, f"{path}[{index}]"))
    return found


def redact(value: Any) -> Any:
    """A JSON-ready copy of ``value`` with the values of secret-named keys replaced by ``"***"``."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = str(key)
            if is_secret_name(name) and item is not None and not isinstance(item, bool):
                out[name] = REDACTED
            else:
                out[name] = redact(item)
        return out
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return _jsonable(value)


def record(
    session: Session,
    *,
    actor: Actor,
    action: str,
    target: str,
    before: Any,
    after: Any,
    tenant_id: str | None = None,
    request_id: str | None = None,
    at: datetime | None = None,
    secret_changed: bool = False,
) -> AuditLogRow | None:
    """Add one audit entry to the session's transaction (flushed, not committed). None, and no entry, for a write that
    changed nothing: ``before`` equals ``after`` once redacted, unless ``secret_changed`` (a secret replaced by
    another, which both show as ``***``: the caller compared the stored secret itself)."""
    if not action or len(action) > 100:
        raise InvalidInputError("an audit action has 1 to 100 characters")
    before, after = redact(before), redact(after)
    if not secret_changed and json.dumps(before, sort_keys=True) == json.dumps(after, sort_keys=True):  # 1 is not true
        return None
    row = AuditLogRow(
        id=uuid7(),
        at=at or utcnow(),
        actor_token_id=actor.token_id,
        actor_name=actor.name[:MAX_ACTOR_NAME],
        tenant_id=tenant_id,
        action=action,
        target=target[:MAX_TARGET],
        before=before,
        after=after,
        request_id=request_id[:MAX_REQUEST_ID] if request_id else None,
    )
    session.add(row)
    session.flush()
    return row


# -- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cursor:
    """The position after the last entry of a page (entries are ordered newest first)."""

    at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = json.dumps({"at": self.at.isoformat(), "id": str(self.id)}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            data = json.loads(raw)
            at = datetime.fromisoformat(data["at"])
            if at.tzinfo is None:
                raise ValueError("naive")
            at = at.astimezone(UTC)  # OverflowError past the years 1 to 9999 in UTC (it would fail binding it)
            if not isinstance(data["id"], str):
                raise TypeError("an id is text")
            return cls(at=at, id=uuid.UUID(data["id"]))
        except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError, OverflowError, AttributeError):
            raise InvalidInputError("cursor is not one this API returned (pass next_cursor as is)") from None


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[AuditLogRow]
    next_cursor: str | None


def list_entries(
    session: Session,
    *,
    limit: int = 50,
    cursor: Cursor | None = None,
    action: str | None = None,
    tenant_id: str | None = None,
) -> Page:
    """A page of entries, newest first; ``tenant_id`` keeps only that tenant's entries."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInputError(f"limit must be between 1 and {MAX_LIMIT}")
    stmt = select(AuditLogRow)
    if action is not None:
        stmt = stmt.where(AuditLogRow.action == action)
    if tenant_id is not None:
        stmt = stmt.where(AuditLogRow.tenant_id == tenant_id)
    if cursor is not None:
        stmt = stmt.where(
            or_(AuditLogRow.at < cursor.at, and_(AuditLogRow.at == cursor.at, AuditLogRow.id < cursor.id))
        )
    stmt = stmt.order_by(AuditLogRow.at.desc(), AuditLogRow.id.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = Cursor(rows[-1].at, rows[-1].id).encode() if more and rows else None
    return Page(entries=rows, next_cursor=next_cursor)
