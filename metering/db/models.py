"""SQLAlchemy 2 models. Every change here comes with an Alembic migration in alembic/versions/."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, LargeBinary, MetaData, String, Uuid
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
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger)
    usage_completeness: Mapped[str] = mapped_column(String(20))
    max_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stop_reason: Mapped[str | None] = mapped_column(String(100), nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    time_to_first_token_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(20))
    error_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    prompt_fingerprint: Mapped[str] = mapped_column(String(64))
    budget_exceeded: Mapped[list[str]] = mapped_column(JSON, default=list)

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
