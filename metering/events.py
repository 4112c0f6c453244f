"""UsageEvent: the one contract between the metering (write) half and the billing (read) half.

Quantities only, never prices. Token counts follow the OpenTelemetry GenAI conventions:
``input_tokens`` includes ``cache_read_tokens`` and ``cache_write_tokens``; ``cache_write_1h_tokens`` (cache
writes kept for an hour, which Anthropic prices above the 5-minute ones) is part of ``cache_write_tokens``;
``reasoning_tokens`` is part of ``output_tokens``. ``web_searches`` counts the searches the provider ran
server-side for the call (Anthropic's web search tool), which it charges per search on top of the tokens.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1


class Status(StrEnum):
    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"


class UsageCompleteness(StrEnum):
    REPORTED = "reported"  # the provider reported the counts
    ESTIMATED = "estimated"  # the provider reported nothing; counts estimated from text
    MISSING = "missing"  # nothing known (e.g. the call failed before any output)


class BudgetLimit(StrEnum):
    CALLS = "calls"
    TOKENS = "tokens"


_uuid7_lock = threading.Lock()
_random = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))
_uuid7_last_ms = 0
_uuid7_seq = 0


def _uuid7_ms_seq() -> tuple[int, int]:
    """The unix ms and the 12-bit sequence of the next UUIDv7 (see ``_uuid7_int``)."""
    global _uuid7_last_ms, _uuid7_seq
    with _uuid7_lock:
        ms = time.time_ns() // 1_000_000
        if ms > _uuid7_last_ms:
            _uuid7_last_ms = ms
            _uuid7_seq = _random.getrandbits(10)  # leave headroom in the counter
        else:
            _uuid7_seq += 1
            if _uuid7_seq > 0xFFF:  # counter overflow: borrow the next millisecond
                _uuid7_last_ms += 1
                _uuid7_seq = 0
            ms = _uuid7_last_ms
        return ms, _uuid7_seq


def _uuid7_int() -> int:
    """A time-ordered UUIDv7 (RFC 9562) as an int: 48-bit unix ms, 12-bit sequence, 62 random bits.

    The 12-bit field is a per-process counter within one millisecond (method 1 of RFC 9562 §6.2),
    so ids made by one process are strictly increasing. The random bits come from ``random`` seeded by
    the OS (and re-seeded after ``fork``): ids need to be unique, not unguessable, and this keeps the
    metered hot path free of a syscall.
    """
    ms, seq = _uuid7_ms_seq()
    return (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | _random.getrandbits(62)


def uuid7() -> uuid.UUID:
    return uuid.UUID(int=_uuid7_int())


# uuid7_str's text of the version and sequence ("7" and 3 hex digits, then "-"), by sequence
_VERSION_SEQ_TEXT = tuple(f"7{seq:03x}-" for seq in range(0x1000))
_VARIANT = 0b10 << 62
_ms_text: tuple[int, str] = (-1, "")  # the last millisecond's text, "xxxxxxxx-xxxx-" (many ids share one)


def uuid7_str() -> str:
    """``str(uuid7())`` without building the 128-bit int or the UUID object (the metered hot path only needs the
    text): the same id, its millisecond's text made once per millisecond, its sequence's looked up."""
    global _ms_text
    ms, seq = _uuid7_ms_seq()
    made_for, head = _ms_text  # (one tuple: read and replaced whole, so threads never pair one ms with another's text)
    if made_for != ms:
        text = f"{ms:012x}"
        head = f"{text[:8]}-{text[8:]}-"
        _ms_text = (ms, head)
    tail = (_VARIANT | _random.getrandbits(62)).to_bytes(8, "big").hex()
    return f"{head}{_VERSION_SEQ_TEXT[seq]}{tail[:4]}-{tail[4:]}"


# The rollups sum tokens and latencies (as integer microseconds) in BIGINT, the platform-wide daily ones over every
# user's calls. A value past these bounds is a unit or counting bug. At the old bounds (10^12 ms), ~9,000 events
# overflowed a bucket (~2 million 5-second calls sent in nanoseconds): PostgreSQL then failed every later batch
# holding an event of that bucket, SQLite turned the sum into a float.
MAX_TOKENS = 10**9  # per count and event: 100x the largest context window; ~9.2e9 calls at the bound overflow a sum
MAX_INT32 = 2**31 - 1  # call_index and max_tokens are INTEGER columns
MAX_INT64 = 2**63 - 1  # BIGINT
MAX_NAME = 200  # ids and names (tenant, user, extension, purpose, model): VARCHAR(200) columns
MAX_LATENCY_MS = 86_400_000.0  # 24 h: no call lasts a day; ~1e8 calls at the bound overflow a sum


# A decimal number as text, which pydantic reads as a Unix time where a datetime is expected ("1764270000", "-1",
# ".5", "1.76427e9"): no ISO 8601 date-time is digits alone.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_LEAP_SECOND = re.compile(r"[Tt ]\d\d:\d\d:60")


def _no_nul(value: str) -> str:
    if "\x00" in value:  # PostgreSQL text cannot hold NUL
        raise ValueError("text must not contain NUL (0x00) characters")
    return value


# Text fields: the length constraints come before the NUL check so that pydantic-core applies them natively (a
# constraint placed after a validator runs as a Python function: ≈ 3 µs more per event). A value both too long and
# holding a NUL is reported as too long; text that is not valid Unicode (a lone surrogate, which json.loads lets
# through and no database can store) is refused as "Input should be a valid string".
Label = Annotated[str, Field(min_length=1, max_length=MAX_NAME), AfterValidator(_no_nul)]


def _provider_name(value: str) -> str:
    value = _no_nul(value).lower()
    if len(value) > 200:  # lowering can lengthen a few characters (e.g. "İ" -> "i̇")
        raise ValueError("String should have at most 200 characters")
    return value


# A provider name is case-insensitive: stored lowercase, so "Anthropic" is priced (and its cost account is) the
# same as "anthropic".
ProviderName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_provider_name)]
ActionType = Annotated[str, Field(max_length=50), AfterValidator(_no_nul)]
MAX_SHORT_TEXT = 100  # characters of a ShortText (stop_reason, error_type)
ShortText = Annotated[str, Field(max_length=MAX_SHORT_TEXT), AfterValidator(_no_nul)]
Fingerprint = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_nul)]
# Numbers and flags are strict: a JSON number or a bool, never text ("100") or a bool for a count (true -> 1), so a
# producer's type bug is rejected with its reason instead of being billed as something it did not say.
NonNegInt = Annotated[int, Field(ge=0, le=MAX_INT32, strict=True)]
MAX_WEB_SEARCHES = 10_000  # per call: Anthropic's max_uses is per request and small; $100 at $10 per 1,000
SearchCount = Annotated[int, Field(ge=0, le=MAX_WEB_SEARCHES, strict=True)]
TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS, strict=True)]
Millis = Annotated[float, Field(ge=0, le=MAX_LATENCY_MS, allow_inf_nan=False, strict=True)]
Flag = Annotated[bool, Field(strict=True)]
# Only the versions this code understands (today: 1): an unknown one is rejected, never stored as if it were 1.
SchemaVersion = Annotated[int, Field(ge=1, le=SCHEMA_VERSION, strict=True)]


class UsageEvent(BaseModel):
    """One provider call: who, what, where, how much, how long, how it ended."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    schema_version: SchemaVersion = SCHEMA_VERSION
    event_id: uuid.UUID
    occurred_at: datetime  # when the provider call started (UTC); prices are looked up at this time
    tenant_id: Label
    user_id: Label
    extension_id: Label
    function: Label
    action_type: ActionType = "read"
    invocation_id: uuid.UUID
    call_index: NonNegInt
    purpose: Label
    provider: ProviderName
    model: Label
    is_byollm: Flag
    is_failover: Flag = False
    is_stream: Flag = False
    input_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    cache_read_tokens: TokenCount = 0
    cache_write_tokens: TokenCount = 0
    cache_write_1h_tokens: TokenCount = 0
    reasoning_tokens: TokenCount = 0
    web_searches: SearchCount = 0
    usage_completeness: UsageCompleteness
    max_tokens: NonNegInt | None = None
    stop_reason: ShortText | None = None
    latency_ms: Millis
    time_to_first_token_ms: Millis | None = None
    status: Status
    error_type: ShortText | None = None
    prompt_fingerprint: Fingerprint
    budget_exceeded: list[BudgetLimit] = Field(default_factory=list, max_length=len(BudgetLimit))

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _not_a_number(cls, value: object) -> object:
        if is_a_number(value):  # pydantic would read it as Unix seconds, or as ms past 2e10
            raise ValueError("occurred_at must be an ISO 8601 date-time with a timezone, not a number")
        # pydantic refused a leap second as "unexpected extra characters at the end of the input"
        if isinstance(value, str) and ":60" in value and _LEAP_SECOND.search(value):
            raise ValueError("occurred_at is a leap second (:60), which no date-time here holds: send :59.999999")
        return value

    @field_validator("occurred_at")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("occurred_at must carry a timezone (UTC expected)")
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("occurred_at is out of range in UTC") from None

    @field_validator("event_id")
    @classmethod
    def _is_uuid7(cls, value: uuid.UUID) -> uuid.UUID:
        if value.version != 7:
            raise ValueError("event_id must be a UUIDv7 (time-ordered, client-generated)")
        return value

    @model_validator(mode="after")
    def _token_semantics(self) -> UsageEvent:
        if self.cache_read_tokens + self.cache_write_tokens > self.input_tokens:
            raise ValueError(
                "cache_read_tokens + cache_write_tokens must not exceed input_tokens "
                "(input_tokens includes cached tokens)"
            )
        if self.cache_write_1h_tokens > self.cache_write_tokens:
            raise ValueError(
                "cache_write_1h_tokens must not exceed cache_write_tokens (1-hour cache writes are cache writes)"
            )
        if self.reasoning_tokens > self.output_tokens:
            raise ValueError("reasoning_tokens must not exceed output_tokens (reasoning is part of output)")
        if self.status is Status.ERROR and not self.error_type:
            raise ValueError("an event with status 'error' needs an error_type")
        return self

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


_FAILED = frozenset({Status.ERROR, Status.CANCELLED})


def used_nothing(status: Status, completeness: UsageCompleteness, total_tokens: int, web_searches: int) -> bool:
    """Whether a call used nothing the provider charges for (Policy A rule 2, ``metering.billing.policy``): it failed
    (``error`` / ``cancelled``) and its usage is ``missing``, or reports neither tokens nor web searches. A failed call
    whose usage reports searches (0 tokens included: a search the provider ran and charges) used them."""
    return status in _FAILED and (
        completeness is UsageCompleteness.MISSING or (total_tokens == 0 and web_searches == 0)
    )


# Fields added to schema 1 after its first release. A record carries each only when it is not 0 (the metered
# client's spool lines, the HTTP sink's batches), so a service that does not know them yet (``extra="forbid"``)
# still takes every event that does not use them: producers can be upgraded before the service.
ADDED_COUNTS = ("cache_write_1h_tokens", "web_searches")


def record_of(event: UsageEvent) -> dict[str, Any]:
    """The JSON record of ``event``, as its spool line says it: ``ADDED_COUNTS`` only when not 0."""
    record = event.model_dump(mode="json")
    for name in ADDED_COUNTS:
        if not record[name]:
            del record[name]
    return record


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_a_number(value: object) -> bool:
    """Whether pydantic would read ``value`` as a Unix time where a datetime is expected: a number, or text that is
    one. Times are ISO 8601: a number is ambiguous (seconds, or milliseconds past 2e10) and carries no offset."""
    if isinstance(value, str):  # (every date-time with a time holds ":"; no number does: one scan for most events)
        return ":" not in value and _NUMBER.fullmatch(value.strip()) is not None
    return isinstance(value, int | float)


def to_utc(value: datetime) -> datetime:
    """``value`` in UTC (without an offset it is UTC already). A ValueError when its UTC value falls outside the
    years 1 to 9999 (e.g. ``9999-12-31T23:00:00-05:00``): Python cannot hold it, no column can store it."""
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time in UTC is out of range (years 1 to 9999)") from None


def event_from_record(record: dict[str, Any]) -> UsageEvent:
    """Validate a raw record (a spool line, an HTTP payload item) into a UsageEvent."""
    return UsageEvent.model_validate(record)


MAX_REASON_ERRORS = 10  # errors listed in one event's rejection reason
MAX_ECHO = 64  # characters of the input quoted per part of a reason


def shown(value: object) -> str:
    """Part of the input quoted in a reason: at most 64 characters, control characters escaped."""
    text = str(value)
    quoted = text if text.isprintable() else repr(text)[1:-1]
    return quoted if len(quoted) <= MAX_ECHO else quoted[: MAX_ECHO - 1] + "…"


def validation_reason(exc: ValidationError) -> str:
    """Why a record is not a ``UsageEvent``, for people: ``where: what`` per error, at most 10, input quoted short."""
    errors = exc.errors(include_url=False)
    listed = "; ".join(
        f"{'.'.join(shown(p) for p in e['loc']) or 'event'}: {e['msg']}" for e in errors[:MAX_REASON_ERRORS]
    )
    more = len(errors) - MAX_REASON_ERRORS
    return listed + (f" (and {more} more)" if more > 0 else "")
