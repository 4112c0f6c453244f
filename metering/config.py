"""Settings, read from the environment (prefix ``METERING_``, nested with ``__``).

Nothing here builds an engine or a client: settings are plain data. Validators refuse unsafe
defaults outside ``env=dev``.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATA_DIR = Path(".metering")
PLATFORM_DEFAULT_PROVIDER = "anthropic"
PLATFORM_DEFAULT_MODEL = "claude-sonnet-4-6"
# The providers ctx.llm has adapters for (metering.llm.providers.make_provider): defined here, the lowest layer, so the
# platform's provider setting is checked with the settings.
KNOWN_PROVIDERS: tuple[str, ...] = ("anthropic", "openai", "openai_compatible", "simulated")


def http_url(value: str | None) -> str | None:
    """``value`` when it is an http(s) URL with a host: one without a scheme (``gw.internal/v1``, ``metering:8000``)
    was accepted, then every call or delivery to it failed (retried forever by a spool's HTTP sink). Never echoed."""
    if value is None:
        return None
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


def in_memory_sqlite(url: str) -> bool:
    """``sqlite://``, ``sqlite:///:memory:``, ``sqlite:///file:x?mode=memory&uri=true`` (any driver)."""
    if not url.startswith("sqlite"):
        return False
    try:
        parsed = make_url(url)
    except ArgumentError:  # not a URL: the engine says so, naming it
        return False
    return parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory"


class PlatformLLMSettings(BaseModel):
    """The platform default LLM: the last step of the resolution cascade."""

    provider: str = PLATFORM_DEFAULT_PROVIDER
    model: str = PLATFORM_DEFAULT_MODEL
    base_url: str | None = None
    timeout_s: float = Field(60.0, gt=0, le=3600, allow_inf_nan=False)
    max_retries: int = Field(2, ge=0, le=10)
    # Endpoints besides each provider's own and ``base_url`` that a purpose may point at and still be sent the
    # platform's key of the provider it names (the operator's gateways), exactly as the purpose gives them. A JSON
    # list in the environment: METERING_PLATFORM__KEYED_BASE_URLS='["https://llm-gateway.internal/v1"]'.
    keyed_base_urls: frozenset[str] = frozenset()

    @field_validator("provider")
    @classmethod
    def _provider_is_known(cls, value: str) -> str:
        # Accepted as any text, every call to the platform LLM (and every BYOLLM failover) then failed with
        # `config_error`: a 500 from each invoke. Provider names are case-insensitive, as everywhere.
        if value.lower() not in KNOWN_PROVIDERS:
            raise ValueError(f"must be one of {', '.join(KNOWN_PROVIDERS)}")
        return value.lower()

    @field_validator("base_url")
    @classmethod
    def _base_url_is_http(cls, value: str | None) -> str | None:
        return http_url(value)

    @field_validator("keyed_base_urls")
    @classmethod
    def _keyed_base_urls_are_http(cls, value: frozenset[str]) -> frozenset[str]:
        for url in value:
            http_url(url)
        return value


class SimulatedSettings(BaseModel):
    latency_ms: float = Field(0.0, ge=0, le=600_000, allow_inf_nan=False)
    ttft_ms: float = Field(0.0, ge=0, le=600_000, allow_inf_nan=False)


class SpoolSettings(BaseModel):
    dir: Path | None = None  # default: <data_dir>/spool
    segment_bytes: int = Field(16 * 1024 * 1024, ge=4096)
    batch_size: int = Field(500, ge=1, le=5000)
    # Bounded: a sleep of inf (or of 1e300 s) raises OverflowError in the flusher thread, which stopped delivering.
    flush_interval_s: float = Field(0.5, gt=0, le=3600, allow_inf_nan=False)
    max_backoff_s: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False)
    # fsync after every append: survives power loss, not only a killed process, at ~100x the cost.
    fsync: bool = False
    # "thread": this process delivers its spool in a background thread. "external": a separate
    # `metering spool drain --follow` process delivers it, so the host process spends no CPU on it.
    flusher: Literal["thread", "external"] = "thread"
    # Where batches go: "database" ingests into METERING_DATABASE_URL; "http" POSTs them to a metering
    # service's /v1/events with a token of scope `ingest`.
    sink: Literal["database", "http"] = "database"
    http_url: str | None = None  # e.g. http://127.0.0.1:8000
    http_token: SecretStr | None = None
    http_timeout_s: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False)
    # Batches gzipped (a service that does not decode gzip answers 415: the sink then sends them uncompressed).
    http_gzip: bool = True

    @field_validator("http_url")
    @classmethod
    def _http_url_is_a_service(cls, value: str | None) -> str | None:
        # The sink appends /v1/events to it: after a query or a fragment (`…:8000/?x=1`, `…:8000/#`) that became part
        # of them, and every batch was a 404 retried forever (nothing delivered, nothing said but the retries).
        url = http_url(value)
        if url is not None and ("?" in url or "#" in url):  # "?" or "#" alone too: either ends the path
            raise ValueError("must be the service's base URL, without a query (?…) or a fragment (#…)")
        # Given the endpoint itself (`…:8000/v1/events`), batches went to /v1/events/v1/events: each a 404, retried;
        # given the API's prefix (`…:8000/v1`, as an OpenAI-style base URL is written), to /v1/v1/events.
        if url is not None and urlparse(url).path.rstrip("/").endswith(("/v1/events", "/v1")):
            raise ValueError("must be the service's base URL: /v1/events is appended to it")
        return url

    @field_validator("http_token")
    @classmethod
    def _http_token_is_a_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Given as a header holds it ("Bearer mtr_…"), quoted or with its newline, every batch was a 401, retried
        # forever (the sink "unreachable"). The format of metering.auth.tokens; the value is never echoed.
        token = value.get_secret_value() if value is not None else None
        well_formed = token is None or (
            token.startswith("mtr_") and token.isascii() and token.isprintable() and " " not in token
        )
        if not well_formed:
            raise ValueError("must be an API token as `metering tokens create` printed it (mtr_…), nothing around it")
        return value

    @model_validator(mode="after")
    def _http_sink_needs_url_and_token(self) -> SpoolSettings:
        if self.sink == "http" and (not self.http_url or self.http_token is None):
            raise ValueError("METERING_SPOOL__SINK=http needs METERING_SPOOL__HTTP_URL and METERING_SPOOL__HTTP_TOKEN")
        return self


def without_zeros_past_nine_decimals(markup_pct: Decimal) -> Decimal:
    """A markup (the platform's, an override's) is stored as text on every event it prices (32 characters): zeros past
    its 9th decimal are dropped (``12.5`` and 40 zeros is ``12.500000000``; ``12.50`` stays), a finer value is kept."""
    exponent = markup_pct.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -9 and markup_pct == (nanos := markup_pct.quantize(Decimal("1e-9"))):
        return nanos
    return markup_pct


class BillingSettings(BaseModel):
    # Platform markup in percent on top of the provider price ("20" charges cost x 1.2); an override's own
    # markup wins. Kept as a Decimal: money is never a float.
    # At most 9 decimals and 18 digits: the markup is stored as text (32 characters) on every priced event.
    markup_pct: Annotated[Decimal, AfterValidator(without_zeros_past_nine_decimals)] = Field(
        Decimal(0), ge=Decimal(-100), max_digits=18, decimal_places=9, allow_inf_nan=False
    )
    # Invoices of a month stay drafts this long after it ends (late events still land in them).
    invoice_grace_hours: float = Field(72.0, ge=0, le=8784, allow_inf_nan=False)  # at most a (leap) year


class ApiSettings(BaseModel):
    """The HTTP service (``metering serve``)."""

    # Bodies above this are refused with 413 before any JSON is parsed (Content-Length, then counted).
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # Events per POST /v1/events: one batch is one ingest transaction.
    max_batch_events: int = Field(5000, ge=1, le=5000)
    # A token's last_used_at is written at most this often (not on every request). At most a (leap) year: every
    # authenticated request makes a timedelta of it (inf or 1e15 raised OverflowError: a 500 on every request).
    token_touch_interval_s: float = Field(60.0, ge=0, le=366 * 86_400, allow_inf_nan=False)
    # Rows of one GET /v1/usage answer (not paginated): a query that would answer more is a 422 `too_many_rows`, so a
    # long window grouped by hour, user and model cannot build an answer that exhausts the server's memory. An answer
    # holds about 5 KB per row while it is built (~250 MB at 50,000 rows; its JSON ~540 bytes a row).
    max_usage_rows: int = Field(50_000, ge=1, le=1_000_000)
    # GET /metrics without a token; false requires a token of scope `read`.
    metrics_public: bool = True
    # Label cardinality on /metrics: N models get a series of their own, N providers, purposes and extensions each
    # too, admitted by scrapes (most calls first) and kept (metering.db.metric_labels); the others are "other".
    metrics_top_models: int = Field(20, ge=1, le=1000)
    metrics_top_labels: int = Field(50, ge=1, le=1000)
    # ... and their combinations: beyond this many label sets (admitted alike), the rest are summed into one set of
    # "other" per (byollm, status). Each set is 10 series (calls, 6 token kinds, searches, billed, shadow).
    metrics_max_label_sets: int = Field(500, ge=1, le=100_000)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERING_", env_nested_delimiter="__", extra="ignore", env_file=None)

    env: Literal["dev", "test", "prod"] = "dev"
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str | None = None  # default: sqlite:///<data_dir>/metering.db
    # Fernet keys, comma separated, newest first. Outside dev they must be given.
    secret_keys: SecretStr | None = None
    anthropic_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("METERING_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY")
    )
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("METERING_OPENAI_API_KEY", "OPENAI_API_KEY")
    )
    platform: PlatformLLMSettings = PlatformLLMSettings()
    simulated: SimulatedSettings = SimulatedSettings()
    spool: SpoolSettings = SpoolSettings()
    billing: BillingSettings = BillingSettings()
    api: ApiSettings = ApiSettings()
    # At most an hour: an admin's change (a BYOLLM key revoked, a budget set to enforce) must reach every process.
    settings_cache_ttl_s: float = Field(5.0, ge=0, le=3600, allow_inf_nan=False)
    # PostgreSQL: how long a migration's statement waits for a table another transaction holds (a long export, an
    # open psql session) before the run gives up and changes nothing; while it waits, every query on that table
    # queues behind it. 0: wait as long as it takes. Never bounds the wait for another run of `metering migrate`.
    migration_lock_timeout_s: float = Field(5.0, ge=0, le=3600, allow_inf_nan=False)
    # Provider adapters (SDK client, connection pool, key) kept per process; the least recently used beyond it close.
    provider_pool_size: int = Field(64, ge=1, le=100_000)  # metering.llm.pool.DEFAULT_MAX_ADAPTERS

    @field_validator("database_url")
    @classmethod
    def _database_url_not_blank(cls, value: str | None) -> str | None:
        # Set but empty (`METERING_DATABASE_URL=$DB_URL` with DB_URL unset) silently meant the local SQLite file.
        if value is not None and not value.strip():
            raise ValueError("is set but empty: unset it for the default SQLite file in METERING_DATA_DIR")
        if value is not None and in_memory_sqlite(value):
            raise ValueError(
                "an in-memory SQLite database is neither kept nor shared between connections and processes (`migrate` "
                "said 'at head', then every command failed with 'no such table'): give a file, sqlite:///path/to.db"
            )
        return value

    @model_validator(mode="after")
    def _safe_outside_dev(self) -> Settings:
        if self.env == "prod" and self.secret_keys is None:
            raise ValueError("METERING_SECRET_KEYS is required when METERING_ENV=prod")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'metering.db'}"

    @property
    def spool_dir(self) -> Path:
        return self.spool.dir or self.data_dir / "spool"

    def platform_api_key(self, provider: str) -> str | None:
        secret = {"anthropic": self.anthropic_api_key, "openai": self.openai_api_key}.get(provider)
        return secret.get_secret_value() if secret else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
