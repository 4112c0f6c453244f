"""SQLAlchemy 2 models. Every change here comes with an Alembic migration in alembic/versions/."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    Uuid,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from metering.db.types import UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UsageEventRow(Base):
    """One raw usage event, exactly as metered (quantities only). Idempotent on event_id."""

    __tablename__ = "usage_events"

    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    schema_version: Mapped[int] = mapped_column(Integer, default=1)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime)
    tenant_id: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[str] = mapped_column(String(200))
    extension_id: Mapped[str] = mapped_column(String(200))
    function: Mapped[str] = mapped_column(String(200))
    action_type: Mapped[str] = mapped_column(String(50))
    invocation_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    call_index: Mapped[int] = mapped_column(Integer)
    purpose: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    is_byollm: Mapped[bool] = mapped_column(Boolean)
    is_failover: Mapped[bool] = mapped_column(Boolean)
    is_stream: Mapped[bool] = mapped_column(Boolean)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_write_1h_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")  # part of cache_write_tokens
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger)
    web_searches: Mapped[int] = mapped_column(Integer, server_default="0")
    usage_completeness: Mapped[str] = mapped_column(String(20))
    max_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stop_reason: Mapped[str | None] = mapped_column(String(100), nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    time_to_first_token_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(20))
    error_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    prompt_fingerprint: Mapped[str] = mapped_column(String(64))
    budget_exceeded: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Billing state, set by ingest (metering.billing): the raw quantities above never change.
    ingest_batch: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    billing_status: Mapped[str] = mapped_column(String(20), server_default="unpriced")
    charge_nanos: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cost_nanos: Mapped[int] = mapped_column(BigInteger, server_default="0")
    shadow_nanos: Mapped[int] = mapped_column(BigInteger, server_default="0")
    markup_pct: Mapped[str | None] = mapped_column(String(32), nullable=True)
    price_source: Mapped[str | None] = mapped_column(String(20), nullable=True)
    price_version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    invoice_period: Mapped[str | None] = mapped_column(String(7), nullable=True)
    is_late: Mapped[bool] = mapped_column(Boolean, server_default=false())

    __table_args__ = (
        Index("ix_usage_events_occurred_at", "occurred_at"),
        Index("ix_usage_events_tenant_user_time", "tenant_id", "user_id", "occurred_at"),
        Index("ix_usage_events_extension_time", "extension_id", "occurred_at"),
        Index("ix_usage_events_invocation", "invocation_id"),
    )


class ByollmSettingsRow(Base):
    """A user's own LLM. The api key is stored only as Fernet ciphertext."""

    __tablename__ = "byollm_settings"

    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(50))
    model: Mapped[str] = mapped_column(String(200))
    base_url: Mapped[str | None] = mapped_column(String(500), nullable=True)
    api_key_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    fallback_policy: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PurposeSettingsRow(Base):
    """Admin per-purpose LLM settings (second step of the resolution cascade)."""

    __tablename__ = "purpose_settings"

    purpose: Mapped[str] = mapped_column(String(200), primary_key=True)
    provider: Mapped[str] = mapped_column(String(50))
    model: Mapped[str] = mapped_column(String(200))
    base_url: Mapped[str | None] = mapped_column(String(500), nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ExtensionBudgetRow(Base):
    """Per-extension call budget, per handler invocation."""

    __tablename__ = "extension_budgets"

    extension_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    max_calls_per_invocation: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_tokens_per_invocation: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    mode: Mapped[str] = mapped_column(String(20))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


# -- billing ---------------------------------------------------------------------------------------


class PriceOverrideRow(Base):
    """An admin price for (provider, model glob) in [effective_from, effective_to). Nano-USD per 1M tokens."""

    __tablename__ = "price_overrides"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider: Mapped[str] = mapped_column(String(50))
    model_pattern: Mapped[str] = mapped_column(String(200))
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime)
    effective_to: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    input_nanos_per_mtok: Mapped[int] = mapped_column(BigInteger)
    output_nanos_per_mtok: Mapped[int] = mapped_column(BigInteger)
    cache_read_nanos_per_mtok: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cache_write_nanos_per_mtok: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cache_write_1h_nanos_per_mtok: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # NULL: cache write
    web_search_nanos_per_k: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # per 1,000 searches
    markup_pct: Mapped[str | None] = mapped_column(String(32), nullable=True)
    note: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


# A wallet id is "user:" + the tenant id with ':' and '~' escaped (each up to 3 characters: 600) + ":" + the user
# id (200): at most 806 characters (at most 1,606 bytes of UTF-8, inside a btree entry). 300 made the posting of
# a valid event fail on PostgreSQL (varchar(300)) and block its spool slot.
ACCOUNT_ID_LENGTH = 1000


class AccountRow(Base):
    """A ledger account. ``balance_nanos`` (credits minus debits) is a cache of its transfers."""

    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(ACCOUNT_ID_LENGTH), primary_key=True)
    kind: Mapped[str] = mapped_column(String(30))
    tenant_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    currency: Mapped[str] = mapped_column(String(3))
    balance_nanos: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TransferRow(Base):
    """One double-entry transfer: append-only, never updated or deleted; corrections are reversals."""

    __tablename__ = "transfers"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    debit_account_id: Mapped[str] = mapped_column(String(ACCOUNT_ID_LENGTH))
    credit_account_id: Mapped[str] = mapped_column(String(ACCOUNT_ID_LENGTH))
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    kind: Mapped[str] = mapped_column(String(30))
    event_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    reverses_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    period: Mapped[str | None] = mapped_column(String(7), nullable=True)
    memo: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The tenant an idempotency key belongs to (the wallet's): keys are unique per tenant, like invoke keys.
    idempotency_tenant_id: Mapped[str | None] = mapped_column(String(200), nullable=True)

    __table_args__ = (
        CheckConstraint("amount_nanos > 0", name="amount_positive"),
        CheckConstraint("debit_account_id <> credit_account_id", name="two_accounts"),
        # Partial: only credits and adjustments carry a key; usage transfers (the bulk) skip the index.
        Index(
            "uq_transfers_tenant_idempotency_key",
            "idempotency_tenant_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
            sqlite_where=text("idempotency_key IS NOT NULL"),
        ),
        Index("ix_transfers_event", "event_id"),
        # Re-rate corrections (the only usage transfers with a memo): a period's are found without a scan.
        Index(
            "ix_transfers_memo_period",
            "period",
            postgresql_where=text("memo IS NOT NULL"),
            sqlite_where=text("memo IS NOT NULL"),
        ),
        Index("ix_transfers_created", "created_at", "id"),
    )


class RollupCounters:
    """The counters every usage rollup sums (``metering.billing.rollup.COUNTER_COLUMNS``)."""

    calls: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger)
    billed_nanos: Mapped[int] = mapped_column(BigInteger)
    shadow_nanos: Mapped[int] = mapped_column(BigInteger)
    cost_nanos: Mapped[int] = mapped_column(BigInteger)
    latency_us_sum: Mapped[int] = mapped_column(BigInteger)
    error_count: Mapped[int] = mapped_column(BigInteger)
    unpriced_count: Mapped[int] = mapped_column(BigInteger)
    # added by 0012 (hence the server defaults); cache_write_1h_tokens is part of cache_write_tokens
    cache_write_1h_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    web_searches: Mapped[int] = mapped_column(BigInteger, server_default="0")


_COUNTERS = tuple(RollupCounters.__annotations__)


class PlatformDimensions:
    """The dimensions of a platform-wide rollup: every key of ``usage_rollups`` but the time, tenant and user."""

    extension_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    function: Mapped[str] = mapped_column(String(200), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(200), primary_key=True)
    provider: Mapped[str] = mapped_column(String(200), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    is_byollm: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    status: Mapped[str] = mapped_column(String(20), primary_key=True)


class UsageRollupRow(PlatformDimensions, RollupCounters, Base):
    """Hourly usage and money per (hour, tenant, user, extension, function, purpose, provider, model, byollm,
    status). The class's own key columns come first, then the mixins' (the primary key's order)."""

    __tablename__ = "usage_rollups"

    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)

    __table_args__ = (
        # Covering on PostgreSQL: a tenant's usage over a window is an index-only scan (GET /v1/usage with a
        # tenant-bound token reads one row per user-hour; bench/RESULTS.md).
        Index(
            "ix_usage_rollups_tenant_hour",
            "tenant_id",
            "hour",
            postgresql_include=["user_id", *_COUNTERS],
        ),
    )


class PlatformUsageHourlyRow(PlatformDimensions, RollupCounters, Base):
    """``usage_rollups`` summed over tenants and users: platform-wide queries read ~1/20 of the rows."""

    __tablename__ = "platform_usage_hourly"

    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)

    # Covering on PostgreSQL: an extension's hours over a window are an index-only scan.
    __table_args__ = (
        Index("ix_platform_usage_hourly_extension_hour", "extension_id", "hour", postgresql_include=list(_COUNTERS)),
    )


class PlatformUsageDailyRow(PlatformDimensions, RollupCounters, Base):
    """``platform_usage_hourly`` summed per UTC day: a 30-day platform query reads ~1/500 of the rows."""

    __tablename__ = "platform_usage_daily"

    day: Mapped[date] = mapped_column(Date, primary_key=True)


class MetricsLabelValueRow(Base):
    """A provider, model, purpose or extension that has its own series on ``/metrics``, admitted at a scrape (the
    ``position``-th of its label): it keeps them while ``position`` is within the label's top N setting, so a series
    never takes its sum out of ``other`` (``metering.db.metric_labels``)."""

    __tablename__ = "metrics_label_values"

    label: Mapped[str] = mapped_column(String(20), primary_key=True)
    value: Mapped[str] = mapped_column(String(200), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)

    __table_args__ = (UniqueConstraint("label", "position", name="uq_metrics_label_values_position"),)


class MetricsLabelSetRow(Base):
    """A label set of ``/metrics`` (its values as reported: a value without its own series is ``other``) admitted at
    a scrape, the ``position``-th: it keeps its series while ``position`` is within ``METRICS_MAX_LABEL_SETS``."""

    __tablename__ = "metrics_label_sets"

    provider: Mapped[str] = mapped_column(String(200), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(200), primary_key=True)
    extension: Mapped[str] = mapped_column(String(200), primary_key=True)
    is_byollm: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    status: Mapped[str] = mapped_column(String(20), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, unique=True)


class UserUsageDailyRow(RollupCounters, Base):
    """``usage_rollups`` summed per UTC day, tenant and user: a tenant's usage by user over 30 days reads one row
    per user-day instead of one per user-hour and model, extension..."""

    __tablename__ = "user_usage_daily"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True)

    __table_args__ = (Index("ix_user_usage_daily_tenant_day", "tenant_id", "day"),)


class InvoiceRow(Base):
    """A finalized (immutable) monthly invoice. Open periods are drafts computed from the events."""

    __tablename__ = "invoices"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[str] = mapped_column(String(200))
    period: Mapped[str] = mapped_column(String(7))
    status: Mapped[str] = mapped_column(String(20))
    currency: Mapped[str] = mapped_column(String(3))
    total_nanos: Mapped[int] = mapped_column(BigInteger)
    rounded_nanos: Mapped[int] = mapped_column(BigInteger)
    residue_nanos: Mapped[int] = mapped_column(BigInteger)
    finalized_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("tenant_id", "user_id", "period", name="uq_invoices_user_period"),)


class FinalizedPeriodRow(Base):
    """A month that ``finalize`` closed, for every user: an event of it that arrives later is billed late, in the
    next open month, even for a user who had no invoice in it (finalization issued nothing for them)."""

    __tablename__ = "finalized_periods"

    period: Mapped[str] = mapped_column(String(7), primary_key=True)
    finalized_at: Mapped[datetime] = mapped_column(UTCDateTime)


class InvoiceLineRow(Base):
    __tablename__ = "invoice_lines"

    invoice_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    line_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    extension_id: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    is_late: Mapped[bool] = mapped_column(Boolean)
    calls: Mapped[int] = mapped_column(BigInteger)
    billed_nanos: Mapped[int] = mapped_column(BigInteger)
    correction_of: Mapped[str | None] = mapped_column(String(7), nullable=True)


# -- API -------------------------------------------------------------------------------------------


class ApiTokenRow(Base):
    """An API token. Only the SHA-256 of the secret is stored; ``prefix`` (its first 8 characters) is for display
    and lookup. ``scopes`` is a list of 'ingest' | 'read' | 'admin'; a token with a ``tenant_id`` acts for that
    tenant only."""

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(8))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    tenant_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        Index("ix_api_tokens_prefix", "prefix"),
    )


class InvokeRequestRow(Base):
    """An ``Idempotency-Key`` of ``POST …:invoke``, per tenant: claimed (``running``) before the handler runs, then
    ``done`` with the status and body it answered, which a retry with the same key gets back instead of running
    (and paying for) the invocation again. ``request_sha256`` identifies the request (extension, function, user,
    params). Kept 24 h (``metering.db.invoke_requests``)."""

    __tablename__ = "invoke_requests"

    tenant_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    invocation_id: Mapped[uuid.UUID] = mapped_column(Uuid)  # chosen at the claim: its usage events carry it
    state: Mapped[str] = mapped_column(String(10))
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response: Mapped[Any | None] = mapped_column(JSON(none_as_null=True), nullable=True)

    __table_args__ = (
        CheckConstraint("state IN ('running', 'done')", name="state"),
        Index("ix_invoke_requests_claimed_at", "claimed_at"),
    )


# -- audit -----------------------------------------------------------------------------------------


class AuditLogRow(Base):
    """One admin change: who (the API token), what (``action`` on ``target``), before and after (secrets
    redacted), written in the transaction of the change itself. Append-only."""

    __tablename__ = "audit_log"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor_token_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    actor_name: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    action: Mapped[str] = mapped_column(String(100))
    target: Mapped[str] = mapped_column(String(500))
    before: Mapped[Any | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    after: Mapped[Any | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(200), nullable=True)

    __table_args__ = (
        Index("ix_audit_log_at_id", "at", "id"),
        Index("ix_audit_log_action_at_id", "action", "at", "id"),
        Index("ix_audit_log_tenant_at_id", "tenant_id", "at", "id"),
    )
