"""One error hierarchy. Every domain error carries a stable code and an HTTP status.

Domain code raises these; the edges (CLI, API) render them. Messages never contain secrets.
"""

from __future__ import annotations


class MeteringError(Exception):
    """Base of every error this package raises on purpose."""

    code: str = "metering_error"
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        # Extra, JSON-ready members of the error's problem body (e.g. the ids of an invocation that failed after
        # it made metered calls). Never a secret.
        self.members: dict[str, object] = {}


class ConfigError(MeteringError):
    code = "config_error"
    status = 500


class MigrationLockTimeoutError(MeteringError):
    """A migration gave up waiting for a table another transaction holds (PostgreSQL's lock_timeout)."""

    code = "migration_lock_timeout"
    status = 503


class NotFoundError(MeteringError):
    code = "not_found"
    status = 404


class InvalidInputError(MeteringError):
    code = "invalid_input"
    status = 422


class SecretError(MeteringError):
    """A stored secret could not be decrypted (wrong or rotated-away key)."""

    code = "secret_error"
    status = 500


class BudgetExceededError(MeteringError):
    """An extension call budget in mode `enforce` refused a call before it was made."""

    code = "budget_exceeded"
    status = 429

    def __init__(self, message: str, *, extension_id: str, limit: str) -> None:
        super().__init__(message)
        self.extension_id = extension_id
        self.limit = limit


class ProviderError(MeteringError):
    """A provider call failed. `error_type` is a stable, bounded category (safe as a metric label)."""

    code = "provider_error"
    status = 502

    def __init__(
        self,
        message: str,
        *,
        error_type: str,
        provider: str,
        retryable: bool = False,
        output_limit: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.provider = provider
        self.retryable = retryable
        # A bad_request refusing the call's max_tokens: (the max_tokens it names, the most output tokens it says the
        # call could have asked for), as ``llm.providers.output_limit.stated_output_limit`` reads it
        self.output_limit = output_limit


class InvalidJSONResponseError(MeteringError):
    """`response_format="json"` was asked for and the model's text is not valid JSON."""

    code = "invalid_json_response"
    status = 502

    def __init__(self, message: str, *, text: str) -> None:
        super().__init__(message)
        self.text = text


class InvocationTimeoutError(MeteringError):
    """An extension invocation ran past its deadline: its handler was cancelled (the calls it made are metered)."""

    code = "invocation_timeout"
    status = 504


class SpoolError(MeteringError):
    code = "spool_error"
    status = 503


class PeriodOpenError(MeteringError):
    """A billing period's invoices cannot be finalized yet: the period and its grace period have not passed."""

    code = "period_open"
    status = 409


class IdempotencyConflictError(MeteringError):
    """An idempotency key was reused for a different request (other amount, user or kind)."""

    code = "idempotency_conflict"
    status = 409


class IdempotencyInProgressError(MeteringError):
    """A request with this idempotency key is still running: retry later for its result."""

    code = "idempotency_in_progress"
    status = 409


class IdempotencyOutcomeUnknownError(MeteringError):
    """The first request with this idempotency key never recorded its outcome (its process died, or the database
    failed as it finished): it may have made billed calls, so it is never run again under this key."""

    code = "idempotency_outcome_unknown"
    status = 409


class TooManyRowsError(InvalidInputError):
    """A read would answer more rows than the service returns at once (``GET /v1/usage``): narrow it."""

    code = "too_many_rows"


class BalanceLimitError(MeteringError):
    """A posting would take an account's cached balance past what the ledger can store (±2^63-1 nanos)."""

    code = "balance_limit"
    status = 422


class AuthenticationError(MeteringError):
    """No API token, or one that is unknown or revoked."""

    code = "unauthenticated"
    status = 401


class PermissionDeniedError(MeteringError):
    """A valid API token without the scope (or tenant) the operation needs."""

    code = "forbidden"
    status = 403


class PayloadTooLargeError(MeteringError):
    """A request body larger than the configured byte limit."""

    code = "payload_too_large"
    status = 413


class TooManyEventsError(PayloadTooLargeError):
    """A batch with more events than one ingest call takes."""

    code = "too_many_events"


class NotReadyError(MeteringError):
    """The service cannot serve yet: its database is unreachable or not migrated to head."""

    code = "not_ready"
    status = 503


class DatabaseUnavailableError(MeteringError):
    """The database refused or dropped the connection (or stayed locked); retrying later may succeed."""

    code = "database_unavailable"
    status = 503


class TooManyExportsError(MeteringError):
    """As many ledger exports as a process streams at once are under way (each holds a database connection)."""

    code = "too_many_exports"
    status = 503


class UnpricedModelError(NotFoundError):
    """No price is known for a provider and model (no override, not in genai-prices): it would be held."""

    code = "unpriced_model"


class BadRequestError(MeteringError):
    """A request the service cannot process as sent (e.g. a required header is missing)."""

    code = "bad_request"
    status = 400


class IdempotencyKeyRequiredError(BadRequestError):
    """A write that must be retry-safe was sent without its ``Idempotency-Key`` header."""

    code = "idempotency_key_required"


class ConflictError(MeteringError):
    """The request conflicts with the current state (e.g. a user id already configured under another tenant)."""

    code = "conflict"
    status = 409


class OverridePricedEventsError(ConflictError):
    """Ending a price override would leave events it priced outside its window, silently keeping its price."""

    code = "override_priced_events"
