"""Request and response bodies of the admin, audit and invoke endpoints (the OpenAPI document comes from these).

Money and prices travel as decimal strings (``"12.50"``, ``"3.000000000"``): never floats. A BYOLLM api key is
accepted on write (``writeOnly``) and never part of a response: responses carry ``has_api_key`` and a mask.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    WithJsonSchema,
    field_validator,
)

from metering.api.exact_json import JsonNumber
from metering.api.validators import MAX_INT32, MAX_INT64, AwareUtcDatetime, no_nul
from metering.billing.money import decimal_text, is_plain_decimal, plain_decimal
from metering.billing.overrides import Ending, is_withdrawn
from metering.db.models import AuditLogRow, ExtensionBudgetRow, PriceOverrideRow, PurposeSettingsRow
from metering.events import MAX_NAME
from metering.llm.providers import KNOWN_PROVIDERS
from metering.llm.settings_store import MAX_API_KEY, MAX_BASE_URL, url_has_credentials

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Provider = Annotated[str, Field(min_length=1, max_length=50, description=f"One of: {', '.join(KNOWN_PROVIDERS)}.")]


def _no_credentials_in_url(url: str | None) -> str | None:
    if url is not None and url_has_credentials(url):
        raise ValueError(
            "base_url must not carry credentials (user:password@, or a key anywhere in it): send it as api_key"
        )
    return url


BaseUrl = Annotated[
    str | None,
    Field(None, max_length=MAX_BASE_URL, description="An http(s) URL; required for `openai_compatible`."),
    AfterValidator(_no_credentials_in_url),
]


def _plain(value: object) -> object:
    """Text must be a plain decimal (no "1_000", " 5 ", "1e3", other scripts' digits). A JSON number sent without an
    exponent is read exactly from its text (``exact_json``: the float lost digits); other JSON numbers go on."""
    if isinstance(value, str):
        return plain_decimal(value)
    if isinstance(value, JsonNumber) and is_plain_decimal(value.text):
        return plain_decimal(value.text)
    return value


UsdPerMtok = Annotated[
    Decimal,
    BeforeValidator(_plain),
    Field(description='USD per 1M tokens, exact (send a string, e.g. `"3.00"`; at most 9 decimals).'),
]
UsdPerK = Annotated[
    Decimal,
    BeforeValidator(_plain),
    Field(description='USD per 1,000, exact (send a string, e.g. `"10.00"`; at most 9 decimals).'),
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")

    _no_nul = field_validator("*", mode="before")(no_nul)  # a NUL anywhere in a body is a 422


# -- per-purpose settings ---------------------------------------------------------------------------


class PurposeIn(_In):
    provider: Provider
    model: Name
    base_url: BaseUrl = None
    params: dict[str, Any] = Field(default_factory=dict, description='Extra provider parameters, e.g. {"top_p": 0.9}.')


class PurposeOut(BaseModel):
    purpose: str
    provider: str
    model: str
    base_url: str | None
    params: dict[str, Any]
    updated_at: datetime

    @classmethod
    def of(cls, row: PurposeSettingsRow) -> PurposeOut:
        return cls(
            purpose=row.purpose,
            provider=row.provider,
            model=row.model,
            base_url=row.base_url,
            params=dict(row.params or {}),
            updated_at=row.updated_at,
        )


# -- BYOLLM ---------------------------------------------------------------------------------------------


# The length is checked by the store (422 `invalid_input` naming the limit): the schema's own `max_length` answered
# "at most 1000 items after validation, not 1037", the length of a write-only key. The document still says it.
ApiKey = Annotated[
    SecretStr, WithJsonSchema({"type": "string", "format": "password", "writeOnly": True, "maxLength": MAX_API_KEY})
]


class ByollmIn(_In):
    provider: Provider
    model: Name
    api_key: ApiKey | None = Field(
        None,
        description=(
            "Write-only: stored encrypted, never returned, logged or audited. Omit it to keep the stored key "
            "(when the provider is unchanged); send `null` to remove it. Required for `anthropic` and `openai`."
        ),
    )
    base_url: BaseUrl = None
    fallback_policy: Literal["platform", "error"] = Field(
        "platform", description="`platform`: a failed BYOLLM call is retried on the platform LLM; `error`: it fails."
    )


class ByollmOut(BaseModel):
    user_id: str
    tenant_id: str
    provider: str
    model: str
    base_url: str | None
    fallback_policy: str
    has_api_key: bool = Field(description="Whether an api key is stored (it is never returned).")
    api_key_mask: str | None = Field(description="Enough to recognise the key, e.g. `sk-…wxyz`; never the key.")
    created_at: datetime
    updated_at: datetime


# -- call budgets ---------------------------------------------------------------------------------------


class BudgetIn(_In):
    # Strict: lax mode read `true` as 1 (an enforced budget of 1 call, or of 1 token: every call refused) and "3" as 3.
    max_calls: int | None = Field(
        None, gt=0, le=MAX_INT32, strict=True, description="Max LLM calls per handler invocation (a JSON integer)."
    )
    max_tokens: int | None = Field(
        None, gt=0, le=MAX_INT64, strict=True, description="Max input+output tokens per handler invocation."
    )
    mode: Literal["report", "enforce"] = Field(
        "report", description="`report`: flag the event that went over; `enforce`: refuse the call before it is made."
    )


class BudgetOut(BaseModel):
    extension_id: str
    max_calls: int | None
    max_tokens: int | None
    mode: str
    updated_at: datetime

    @classmethod
    def of(cls, row: ExtensionBudgetRow) -> BudgetOut:
        return cls(
            extension_id=row.extension_id,
            max_calls=row.max_calls_per_invocation,
            max_tokens=row.max_tokens_per_invocation,
            mode=row.mode,
            updated_at=row.updated_at,
        )


# -- price overrides ------------------------------------------------------------------------------------


class PriceOverrideIn(_In):
    id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Default: a generated `ovr_…` id. Without `/` (it is a path segment of `…/{id}:end`): 422.",
    )
    provider: Provider
    model_pattern: str = Field(
        min_length=1,
        max_length=200,
        description=(
            "A case-insensitive glob (`*` any run of characters, `?` one; any other character, `[` too, is "
            "itself), e.g. `claude-sonnet-*`."
        ),
    )
    effective_from: AwareUtcDatetime
    effective_to: AwareUtcDatetime | None = Field(None, description="Exclusive; `null`: open-ended.")
    input_mtok: UsdPerMtok
    output_mtok: UsdPerMtok
    cache_read_mtok: UsdPerMtok | None = None
    cache_write_mtok: UsdPerMtok | None = None
    cache_write_1h_mtok: UsdPerMtok | None = Field(
        None, description="1-hour cache writes (Anthropic). `null`: the cache-write price."
    )
    web_search_per_k: UsdPerK | None = Field(
        None,
        description=(
            "Web searches the provider runs for a call (Anthropic's web search tool). `null`: a call with "
            "searches is held as unpriced, never billed $0 for them."
        ),
    )
    markup_pct: Annotated[Decimal, BeforeValidator(_plain)] | None = Field(
        None, description="This override's own markup in percent (wins over the platform's)."
    )
    note: str | None = Field(None, max_length=500)


class PriceOverrideOut(BaseModel):
    id: str
    provider: str
    model_pattern: str
    effective_from: datetime
    effective_to: datetime | None
    input_mtok: str = Field(description="USD per 1M tokens.")
    output_mtok: str
    cache_read_mtok: str | None
    cache_write_mtok: str | None
    cache_write_1h_mtok: str | None
    web_search_per_k: str | None = Field(description="USD per 1,000 web searches.")
    markup_pct: str | None
    note: str | None
    created_at: datetime
    withdrawn: bool = Field(
        description="Withdrawn (`:withdraw`, or ended at its start): an empty window that prices nothing."
    )

    @classmethod
    def of(cls, row: PriceOverrideRow) -> PriceOverrideOut:
        return cls(
            id=row.id,
            provider=row.provider,
            model_pattern=row.model_pattern,
            effective_from=row.effective_from,
            effective_to=row.effective_to,
            input_mtok=decimal_text(row.input_nanos_per_mtok) or "0",
            output_mtok=decimal_text(row.output_nanos_per_mtok) or "0",
            cache_read_mtok=decimal_text(row.cache_read_nanos_per_mtok),
            cache_write_mtok=decimal_text(row.cache_write_nanos_per_mtok),
            cache_write_1h_mtok=decimal_text(row.cache_write_1h_nanos_per_mtok),
            web_search_per_k=decimal_text(row.web_search_nanos_per_k),
            markup_pct=row.markup_pct,
            note=row.note,
            created_at=row.created_at,
            withdrawn=is_withdrawn(row),
        )


class WithdrawOverrideIn(_In):
    keep_priced_events: StrictBool = Field(
        False,
        description=(
            "End it although it priced billed events that occurred at or after its end: they keep its price until "
            "re-rated (`events_to_rerate` says which, and how). Without it such an end is 409 "
            "`override_priced_events`."
        ),
    )


class EndOverrideIn(WithdrawOverrideIn):
    at: AwareUtcDatetime | None = Field(
        None,
        description="When the override stops applying (exclusive). Default: now. At `effective_from`: withdrawn.",
    )


class EventsToRerate(BaseModel):
    """Events the override priced that its window no longer covers: they keep its price until re-rated."""

    billed: int
    byollm: int = Field(description="BYOLLM events whose shadow cost it priced (never billed).")
    first_occurred_at: datetime
    last_occurred_at: datetime
    rerate: str = Field(description="The CLI's re-rate of a window holding them all (a dry run; add `--apply`).")


class EndedPriceOverrideOut(PriceOverrideOut):
    events_to_rerate: EventsToRerate | None = Field(
        description="`null`: no event it priced lies past its end. Else they keep its price until re-rated."
    )

    @classmethod
    def of_ending(cls, ending: Ending) -> EndedPriceOverrideOut:
        beyond, row = ending.priced_beyond, ending.row
        to_rerate = None
        if beyond.first is not None and beyond.last is not None:
            to_rerate = EventsToRerate(
                billed=beyond.billed,
                byollm=beyond.byollm,
                first_occurred_at=beyond.first,
                last_occurred_at=beyond.last,
                rerate=beyond.rerate_command(row.model_pattern) or "",
            )
        return cls(**PriceOverrideOut.of(row).model_dump(), events_to_rerate=to_rerate)


# -- credits -------------------------------------------------------------------------------------------


class CreditIn(_In):
    tenant_id: Name
    user_id: Name
    amount: Annotated[Decimal, BeforeValidator(_plain)] = Field(
        description=(
            'USD, exact (send a string, e.g. `"25.00"`). A `credit` is positive; an `adjustment` may be negative '
            "(it then debits the user)."
        )
    )
    kind: Literal["credit", "adjustment"] = "credit"
    memo: str | None = Field(
        None, max_length=500, description="Not part of the request's identity: a replay keeps the first."
    )


class CreditOut(BaseModel):
    transfer_id: uuid.UUID
    kind: str
    tenant_id: str
    user_id: str
    amount: str = Field(description="Signed USD as seen by the user's wallet (> 0 credits it).")
    amount_nanos: int
    idempotency_key: str
    memo: str | None
    created_at: datetime
    replayed: bool = Field(
        description="True when the key was seen before: this is the first result, nothing was posted."
    )


# -- audit ------------------------------------------------------------------------------------------


class AuditActor(BaseModel):
    token_id: uuid.UUID | None = Field(
        description="The API token that made the change; `null` for a change made with the `metering` CLI."
    )
    name: str = Field(description="That token's name, or `cli:<os user>@<host>` for the CLI.")


class AuditEntry(BaseModel):
    id: uuid.UUID
    at: datetime
    actor: AuditActor
    tenant_id: str | None = Field(description="The tenant the change concerns; `null` for platform-wide settings.")
    action: str = Field(description="e.g. `byollm.set`, `purpose.delete`, `credit.add`.")
    target: str = Field(description="What changed, e.g. `user:acme/alice` or `purpose:content_rewrite`.")
    before: Any = Field(description="The state before (secrets as `***`); `null` when it did not exist.")
    after: Any = Field(description="The state after (secrets as `***`); `null` when it was deleted.")
    request_id: str | None = Field(description="The request's `X-Request-ID` header, when it had one.")

    @classmethod
    def of(cls, row: AuditLogRow) -> AuditEntry:
        return cls(
            id=row.id,
            at=row.at,
            actor=AuditActor(token_id=row.actor_token_id, name=row.actor_name),
            tenant_id=row.tenant_id,
            action=row.action,
            target=row.target,
            before=row.before,
            after=row.after,
            request_id=row.request_id,
        )


class AuditPage(BaseModel):
    items: list[AuditEntry] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; `null` on the last page.")


# -- invoke -------------------------------------------------------------------------------------------


class InvokeRequest(_In):
    user_id: Name = Field(description="The user the handler runs for (their BYOLLM settings apply).")
    tenant_id: Name
    params: dict[str, Any] = Field(default_factory=dict, description="The function's parameters (its own schema).")


class InvokeResponse(BaseModel):
    extension_id: str
    function: str
    invocation_id: uuid.UUID
    result: Any = Field(
        description=(
            "What the handler returned. `rewrite.rewrite`: `{text, truncated, provider, model, is_byollm}`; "
            "`rewrite.rewrite_multiple`: `{variations, truncated, provider, model, is_byollm}`; "
            "`rewrite.extract_action_items`: `{action_items: [{owner, deadline, task}], provider, model, is_byollm}`. "
            "`truncated` (bool): a rewrite (any variation) was cut off by its max_tokens, or where the model's "
            "context window ran out: the text is incomplete. "
            "`provider`, `model`: the invocation's last call; `is_byollm`: true only when every call of the "
            "invocation was served by the user's own LLM (nothing billed to the user)."
        ),
        examples=[{"text": "…", "truncated": False, "provider": "simulated", "model": "m", "is_byollm": False}],
    )
    provider: str | None = Field(description="The provider that served the last LLM call.")
    model: str | None
    is_byollm: bool | None = Field(
        description="Whether every call of the invocation was served by the user's own LLM (a failover to the "
        "platform LLM, billed, makes it false); null when no call was made. `provider` and `model`: the last call's."
    )
    event_ids: list[str] = Field(description="The usage events recorded (one per provider call).")
