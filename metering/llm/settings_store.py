"""Repository for the cascade's stored inputs: BYOLLM settings, per-purpose settings, call budgets.

Functions only flush; the caller (CLI command, API dependency) owns the transaction. BYOLLM api keys
are encrypted with the SecretBox before they reach a row and decrypted only when a call is resolved.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlparse

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from metering.audit import is_secret_name, secret_keys
from metering.audit_snapshots import byollm_fields
from metering.crypto import SecretBox
from metering.db.models import ByollmSettingsRow, ExtensionBudgetRow, PurposeSettingsRow
from metering.db.row_lock import for_update, get_for_update
from metering.db.unique import flush_or_conflict
from metering.errors import ConflictError, InvalidInputError, SecretError
from metering.events import MAX_INT32, MAX_INT64, MAX_NAME, utcnow
from metering.llm.budgets import BudgetMode, CallBudget
from metering.llm.providers import KNOWN_PROVIDERS
from metering.llm.providers.params import dropped_params_problem
from metering.llm.providers.urls import api_key_problem, base_url_problem
from metering.llm.resolution import ByollmSettings, FallbackPolicy, PurposeSettings

log = logging.getLogger("metering.llm.settings")

MAX_BASE_URL = 500  # VARCHAR(500)
MAX_API_KEY = 1000  # characters of a BYOLLM api key (stored encrypted)


def url_has_credentials(url: str) -> bool:
    """True when ``url`` carries ``user:password@``, or a parameter named like a secret (``?api_key=``,
    ``?token=``, ``?key=``) in its query, its fragment (``#api_key=``) or its path parameters (``;token=``), or a
    value or a path segment that is a key (``sk-…``, ``Bearer …``, as purpose params refuse one): a key belongs in
    the encrypted api_key, never in a URL that is stored, shown and audited in clear."""
    parsed = urlparse(url)
    if "@" in (parsed.netloc or ""):
        return True
    segments = f"{parsed.path};{parsed.params}".split("/")
    parts = (parsed.query, parsed.fragment, *(segment.partition(";")[2] for segment in segments))
    pairs = [pair for part in parts for pair in parse_qsl(part.replace(";", "&"), keep_blank_values=True)]
    if any(is_secret_name(name) or name.strip().lower() == "key" for name, _value in pairs):
        return True
    # a key under any name, or as a path segment (a gateway taking it in the path), as purpose params refuse it
    texts = [value for _name, value in pairs] + [unquote(segment.partition(";")[0]) for segment in segments]
    return any(_KEY_VALUE.fullmatch(text.strip()) for text in texts)


def provider_name(provider: str) -> str:
    """A provider as stored: lowercase. Provider names are case-insensitive (events, prices, the platform's
    METERING_PLATFORM__PROVIDER): ``OpenAI`` was refused here, an unknown provider, and accepted there."""
    return provider.lower()


def _check_provider(provider: str, base_url: str | None) -> str:
    """``provider`` as stored (``provider_name``) once it and ``base_url`` are checked."""
    if provider_name(provider) not in KNOWN_PROVIDERS:
        raise InvalidInputError(f"unknown provider {provider!r}; known: {', '.join(KNOWN_PROVIDERS)}")
    provider = provider_name(provider)
    if provider == "openai_compatible" and not base_url:
        raise InvalidInputError("provider 'openai_compatible' needs a base_url (e.g. http://localhost:11434/v1)")
    if base_url is not None:
        if len(base_url) > MAX_BASE_URL:
            raise InvalidInputError(f"base_url has at most {MAX_BASE_URL} characters")
        if problem := base_url_problem(base_url):  # the SDK would refuse it at every call
            raise InvalidInputError(problem)
        parsed = urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidInputError(f"base_url must be an http(s) URL, got {base_url!r}")
        if url_has_credentials(base_url):
            raise InvalidInputError(
                "base_url must not carry credentials (user:password@, or a key anywhere in it): give the key as the "
                "api key"
            )
    return provider


def _name(name: str, value: str, *, strip: bool = False) -> str:
    """An id or name as stored: not blank, at most MAX_NAME characters (its column's size). Ids are exact, as in
    usage events (never stripped: the edges audit and check the id they were given); a model name is stripped."""
    if strip:
        value = value.strip()
    if not value.strip():
        raise InvalidInputError(f"{name} must not be empty")
    if len(value) > MAX_NAME:
        raise InvalidInputError(f"{name} has at most {MAX_NAME} characters")
    return value


def _replace(row: Any, values: Mapping[str, Any], now: datetime) -> None:
    """Give ``row`` these values; ``updated_at`` moves only when one differs: a replacement with what is stored changes
    nothing (the same row, the same answer, no audit entry)."""
    changed = {name: value for name, value in values.items() if _differs(getattr(row, name), value)}
    for name, value in changed.items():
        setattr(row, name, value)
    if changed or row.updated_at is None:
        row.updated_at = now


def _differs(old: Any, new: Any) -> bool:
    """JSON compared as JSON: ``{"n": true}`` replaces ``{"n": 1}`` (equal to Python, not to a provider)."""
    if isinstance(new, Mapping):
        return old is None or json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True)
    return bool(old != new)


# -- BYOLLM -----------------------------------------------------------------------------------


def put_byollm(
    session: Session,
    box: SecretBox,
    *,
    user_id: str,
    tenant_id: str,
    provider: str,
    model: str,
    api_key: str | None,
    base_url: str | None = None,
    fallback_policy: str = FallbackPolicy.PLATFORM.value,
) -> ByollmSettingsRow:
    provider = _check_provider(provider, base_url)
    if fallback_policy not in {p.value for p in FallbackPolicy}:
        raise InvalidInputError("fallback_policy must be 'platform' or 'error'")
    if provider in ("anthropic", "openai") and not api_key:
        raise InvalidInputError(f"provider {provider!r} needs an api_key for BYOLLM")
    if api_key is not None and len(api_key) > MAX_API_KEY:
        raise InvalidInputError(f"an api_key has at most {MAX_API_KEY} characters")
    if api_key is not None and (problem := api_key_problem(api_key)):  # never echo the key
        raise InvalidInputError(problem)
    user_id, tenant_id = _name("user_id", user_id), _name("tenant_id", tenant_id)
    model = _name("model", model, strip=True)
    now = utcnow()
    row = byollm_row_to_replace(session, user_id, tenant_id)
    if row is None:
        row = ByollmSettingsRow(user_id=user_id, created_at=now)
        session.add(row)
    stored = stored_key(row, box)
    if api_key and stored is not None and hmac.compare_digest(stored.encode(), api_key.encode()):
        ciphertext = row.api_key_ciphertext  # the same key: kept as stored (a new encryption differs every time)
    else:
        ciphertext = box.encrypt(api_key) if api_key else None
    values = {"tenant_id": tenant_id, "provider": provider, "model": model, "base_url": base_url}
    _replace(row, values | {"api_key_ciphertext": ciphertext, "fallback_policy": fallback_policy}, now)
    flush_or_conflict(session, f"user id {user_id!r} was given BYOLLM settings by a concurrent request; retry")
    return row


def get_byollm_row(session: Session, user_id: str, *, for_update: bool = False) -> ByollmSettingsRow | None:
    """``for_update``: to change it (``row_lock``: waits for a concurrent change, so an audit's before is right)."""
    if for_update:
        return get_for_update(session, ByollmSettingsRow, user_id)
    return session.get(ByollmSettingsRow, user_id)


def byollm_row_to_replace(session: Session, user_id: str, tenant_id: str) -> ByollmSettingsRow | None:
    """The user's stored settings (None: none yet), locked to be replaced. User ids are global: settings stored
    under another tenant are a ``ConflictError``, never silently moved to this one."""
    row = get_for_update(session, ByollmSettingsRow, user_id)
    if row is not None and row.tenant_id != tenant_id:
        raise ConflictError(f"user id {user_id!r} has BYOLLM settings under another tenant; delete them there first")
    return row


def kept_key(existing: ByollmSettingsRow | None, box: SecretBox, *, provider: str, base_url: str | None) -> str | None:
    """The api key a replacement that sends none keeps (API: ``api_key`` left out; CLI: no ``--api-key`` for a
    provider that may go without one): the stored key, for the same provider; None when there is none. The key is
    write-only: with another ``base_url`` it is never kept (it would be sent to an endpoint of the caller's
    choosing), that is an ``InvalidInputError``; so is a stored key the current keys cannot decrypt (the key that
    encrypted it was rotated away: ``stored_key_mask`` shows it as stored, without a mask). It was a 500."""
    if existing is None or existing.provider != provider_name(provider) or existing.api_key_ciphertext is None:
        return None
    if existing.base_url != base_url:
        raise InvalidInputError(
            "base_url changes: send api_key again (a stored key is never sent to another endpoint), or null"
        )
    try:
        return box.decrypt(existing.api_key_ciphertext)
    except SecretError:
        raise InvalidInputError(
            "the stored api key cannot be decrypted with the configured keys (was the key that encrypted it removed "
            "from METERING_SECRET_KEYS?): send api_key again, or null"
        ) from None


def delete_byollm(session: Session, user_id: str) -> bool:
    result = session.execute(delete(ByollmSettingsRow).where(ByollmSettingsRow.user_id == user_id))
    session.flush()
    return bool(result.rowcount)  # type: ignore[attr-defined]


MASK_HIDES_AT_LEAST = 16  # characters of a key its mask never shows: beyond guessing (provider keys have 40 to 160)


def mask_key(plaintext: str | None) -> str | None:
    """``sk-…abcd``: enough to recognise a key, never enough to use it. The first 3 and last 4 characters only when
    at least ``MASK_HIDES_AT_LEAST`` stay hidden, else ``…``: an 11-character key (a local gateway's) showed 7 of its
    characters, the 4 left a few million guesses away, to every admin who may only set it."""
    if not plaintext:
        return None
    return f"{plaintext[:3]}…{plaintext[-4:]}" if len(plaintext) - 7 >= MASK_HIDES_AT_LEAST else "…"


def stored_key(row: ByollmSettingsRow | None, box: SecretBox) -> str | None:
    """The stored key; None when none is stored, or when it cannot be decrypted with the current keys (the key that
    encrypted it was rotated away: ``api_key_ciphertext`` still says a key is stored)."""
    if row is None or not row.api_key_ciphertext:
        return None
    try:
        return box.decrypt(row.api_key_ciphertext)
    except SecretError:
        return None


def stored_key_mask(row: ByollmSettingsRow, box: SecretBox) -> str | None:
    """The stored key's mask; None when none is stored, or when it cannot be decrypted (see ``stored_key``)."""
    return mask_key(stored_key(row, box))


def byollm_view(row: ByollmSettingsRow, mask: str | None) -> dict[str, Any]:
    """A user's BYOLLM settings as the admin API and the CLI show them: never the key, only ``has_api_key`` and its
    ``api_key_mask`` (``None`` for a key that cannot be decrypted, its encryption key rotated away)."""
    return byollm_fields(row) | {"has_api_key": row.api_key_ciphertext is not None, "api_key_mask": mask}


def byollm_from_row(row: ByollmSettingsRow, box: SecretBox) -> ByollmSettings:
    """The settings a call resolves. A stored key the configured keys cannot decrypt is ``key_unreadable`` (each
    call then fails as ``secret_error``, without failover), not a ``SecretError``: that failed the whole
    invocation with a 500 and no event, whatever the user's policy."""
    api_key = stored_key(row, box)
    return ByollmSettings(
        user_id=row.user_id,
        tenant_id=row.tenant_id,
        provider=row.provider,
        model=row.model,
        api_key=api_key,
        base_url=row.base_url,
        fallback_policy=FallbackPolicy(row.fallback_policy),
        key_unreadable=bool(row.api_key_ciphertext) and api_key is None,
    )


@dataclass(frozen=True, slots=True)
class Rotation:
    reencrypted: int  # stored api keys now under the newest key
    unreadable: list[str]  # users whose stored key no configured key decrypts: left as they are


def rotate_byollm_keys(session: Session, box: SecretBox) -> Rotation:
    """Re-encrypt every stored api key under the newest key. A key none of the configured keys decrypts (the one that
    encrypted it was removed) is left as it is and its user named: it aborted the whole rotation, naming nobody, so
    every other key stayed under the old key, which could then never be dropped."""
    count, unreadable = 0, []
    # Locked: a key set meanwhile (read before, then written back re-encrypted) would be overwritten by the old one.
    stored = select(ByollmSettingsRow).where(ByollmSettingsRow.api_key_ciphertext.is_not(None))
    for row in session.scalars(for_update(session, stored.order_by(ByollmSettingsRow.user_id))):
        assert row.api_key_ciphertext is not None
        try:
            row.api_key_ciphertext = box.rotate(row.api_key_ciphertext)
        except SecretError:
            unreadable.append(row.user_id)
            continue
        count += 1
    session.flush()
    return Rotation(count, unreadable)


# -- per-purpose settings -------------------------------------------------------------------------


MAX_PARAMS_DEPTH = 64  # levels of nesting in purpose params: the API's limit for any body value (MAX_JSON_DEPTH)


def nests_deeper_than(value: Any, levels: int) -> bool:
    """Whether ``value`` (JSON-like) holds more than ``levels`` lists or objects one inside another (``value`` itself
    is the first), as the API counts. Iterative: any depth."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, Mapping | list | tuple):
            if depth >= levels:
                return True
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, Mapping) else item))
    return False


def non_finite_numbers(value: Any, path: str) -> list[str]:
    """Where ``value`` holds NaN or an infinity (``json.loads`` reads ``NaN``, ``Infinity`` and ``1e999``; they
    are not JSON: PostgreSQL refuses them, and a response shows them as null)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, Mapping):
        return [where for key, item in value.items() for where in non_finite_numbers(item, f"{path}.{key}")]
    if isinstance(value, list | tuple):
        return [where for index, item in enumerate(value) for where in non_finite_numbers(item, f"{path}[{index}]")]
    return []


# A value that is a provider key ('sk-…': OpenAI, Anthropic) or a bearer credential, as a whole (a text that only
# mentions one, a system prompt saying "never print an sk-… key", is not).
_KEY_VALUE = re.compile(r"(?:sk-[A-Za-z0-9_\-]{20,}|Bearer\s+\S+)\s*", re.IGNORECASE)


def key_values(value: Any, path: str) -> list[str]:
    """Where ``value`` holds a text that is a key or a bearer credential, whatever its name (``params.headers.X``)."""
    if isinstance(value, str):
        return [path] if _KEY_VALUE.fullmatch(value.strip()) else []
    if isinstance(value, Mapping):
        return [where for key, item in value.items() for where in key_values(item, f"{path}.{key}")]
    if isinstance(value, list | tuple):
        return [where for index, item in enumerate(value) for where in key_values(item, f"{path}[{index}]")]
    return []


def non_unicode_texts(value: Any, path: str) -> list[str]:
    """Where ``value`` holds a text UTF-8 cannot encode (a lone surrogate, the JSON escape "\\ud83d" alone, which
    json.loads reads: the CLI's --params), a key included."""
    if isinstance(value, str):
        return [] if value.isascii() or _encodes(value) else [path]
    if isinstance(value, Mapping):
        return [
            where
            for key, item in value.items()
            for where in ([f"{path} (a name)"] if isinstance(key, str) and not _encodes(key) else [])
            + non_unicode_texts(item, f"{path}.{str(key).encode(errors='backslashreplace').decode()}")
        ]
    if isinstance(value, list | tuple):
        return [where for index, item in enumerate(value) for where in non_unicode_texts(item, f"{path}[{index}]")]
    return []


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_params(params: Mapping[str, Any]) -> None:
    """Params are stored and shown in clear: a secret-named key (at any depth), or a value that is a key under any
    name, is refused, not stored. So are numbers that JSON cannot hold, and values nested deeper than the API
    takes."""
    if nests_deeper_than(params, MAX_PARAMS_DEPTH):
        raise InvalidInputError(f"params nest deeper than {MAX_PARAMS_DEPTH} levels")
    secrets = secret_keys(params, "params") + key_values(params, "params")
    if secrets:
        raise InvalidInputError(
            f"{', '.join(secrets)}: purpose params are stored and shown in clear; provider keys are set on the "
            "platform (METERING_ANTHROPIC_API_KEY, METERING_OPENAI_API_KEY) or per user (BYOLLM), never here"
        )
    not_unicode = non_unicode_texts(params, "params")
    if not_unicode:
        raise InvalidInputError(
            f"{', '.join(not_unicode)}: a text that is not valid Unicode (a lone surrogate, half of a UTF-16 pair "
            "such as the JSON escape \\ud83d alone) cannot be sent to a provider"
        )
    non_finite = non_finite_numbers(params, "params")
    if non_finite:
        raise InvalidInputError(f"{', '.join(non_finite)}: a number must be finite (NaN and Infinity are not JSON)")
    temperature = params.get("temperature")  # the temperature of the purpose's calls, unless a call gives one
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0
    ):
        raise InvalidInputError(
            "params.temperature must be a number, 0 or more (it is the temperature of the purpose's calls: "
            "the provider would refuse each one)"
        )


def put_purpose(
    session: Session,
    *,
    purpose: str,
    provider: str,
    model: str,
    base_url: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> PurposeSettingsRow:
    _check_params(params or {})
    provider = _check_provider(provider, base_url)
    if problem := dropped_params_problem(provider, params or {}):  # it was stored, then dropped at every call
        raise InvalidInputError(problem)
    purpose, model = _name("purpose", purpose), _name("model", model, strip=True)
    row = session.get(PurposeSettingsRow, purpose)
    if row is None:
        row = PurposeSettingsRow(purpose=purpose)
        session.add(row)
    _replace(row, {"provider": provider, "model": model, "base_url": base_url, "params": dict(params or {})}, utcnow())
    flush_or_conflict(session, f"purpose {purpose!r} was created by a concurrent request; retry to replace it")
    return row


def list_purposes(session: Session) -> list[PurposeSettingsRow]:
    return list(session.scalars(select(PurposeSettingsRow).order_by(PurposeSettingsRow.purpose)))


def delete_purpose(session: Session, purpose: str) -> bool:
    result = session.execute(delete(PurposeSettingsRow).where(PurposeSettingsRow.purpose == purpose))
    session.flush()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def purpose_from_row(row: PurposeSettingsRow) -> PurposeSettings:
    return PurposeSettings(
        purpose=row.purpose,
        provider=row.provider,
        model=row.model,
        base_url=row.base_url,
        params=dict(row.params),
    )


# -- call budgets ---------------------------------------------------------------------------------


def put_budget(
    session: Session,
    *,
    extension_id: str,
    max_calls: int | None,
    max_tokens: int | None,
    mode: str = BudgetMode.REPORT.value,
) -> ExtensionBudgetRow:
    if mode not in {m.value for m in BudgetMode}:
        raise InvalidInputError("budget mode must be 'report' or 'enforce'")
    if max_calls is None and max_tokens is None:
        raise InvalidInputError("a budget needs max_calls, max_tokens or both")
    for name, value, limit in (("max_calls", max_calls, MAX_INT32), ("max_tokens", max_tokens, MAX_INT64)):
        if value is not None and value <= 0:
            raise InvalidInputError(f"{name} must be a positive integer")
        if value is not None and value > limit:
            raise InvalidInputError(f"{name} is at most {limit}")
    extension_id = _name("extension_id", extension_id)
    row = session.get(ExtensionBudgetRow, extension_id)
    if row is None:
        row = ExtensionBudgetRow(extension_id=extension_id)
        session.add(row)
    values = {"max_calls_per_invocation": max_calls, "max_tokens_per_invocation": max_tokens, "mode": mode}
    _replace(row, values, utcnow())
    flush_or_conflict(session, f"the budget of {extension_id!r} was created by a concurrent request; retry")
    return row


def budget_from_row(row: ExtensionBudgetRow) -> CallBudget:
    return CallBudget(
        extension_id=row.extension_id,
        max_calls=row.max_calls_per_invocation,
        max_tokens=row.max_tokens_per_invocation,
        mode=BudgetMode(row.mode),
    )


class DatabaseSettings:
    """A SettingsSource reading the database (wrap it in CachedSettings on hot paths)."""

    def __init__(self, session_factory: sessionmaker[Session], box: SecretBox) -> None:
        self._sessions = session_factory
        self._box = box
        self._warned: set[tuple[str, str]] = set()  # (purpose, problem) already logged

    def byollm(self, user_id: str, tenant_id: str) -> ByollmSettings | None:
        with self._sessions() as session:
            row = session.get(ByollmSettingsRow, user_id)
            if row is None or row.tenant_id != tenant_id:  # another tenant's: never decrypted for this one
                return None
            return byollm_from_row(row, self._box)

    def purpose(self, purpose: str) -> PurposeSettings | None:
        with self._sessions() as session:
            row = session.get(PurposeSettingsRow, purpose)
            if row is None:
                return None
            self._warn_dropped(row)
            return purpose_from_row(row)

    def _warn_dropped(self, row: PurposeSettingsRow) -> None:
        """Params stored before ``put_purpose`` refused the ones the provider drops still load (the purpose's calls
        are made as before, without them); a warning says so, once per purpose and problem, not at each reload."""
        problem = dropped_params_problem(row.provider, row.params)
        if problem is None or (row.purpose, problem) in self._warned:
            return
        self._warned.add((row.purpose, problem))
        log.warning("purpose %r: %s; set the purpose again without them (they are not sent)", row.purpose, problem)

    def budget(self, extension_id: str) -> CallBudget | None:
        with self._sessions() as session:
            row = session.get(ExtensionBudgetRow, extension_id)
            return budget_from_row(row) if row is not None else None
