"""Policy A (pure): a call served by the user's own provider key is metered but never billed.

``is_byollm`` is that of the config that actually served the call, so a BYOLLM call that failed over to the
platform LLM arrives with ``is_byollm=False`` and is billed like any platform call.

Order of the rules:

1. ``is_byollm`` -> ``excluded_byollm``: charge 0, cost 0, shadow = the quote's price (0 when no quote).
2. ``error`` / ``cancelled`` with usage ``missing``, or whose usage reports neither tokens nor web searches ->
   ``not_billable`` (nothing to charge; ``metering.events.used_nothing``). A failed call whose usage reports web
   searches, even with 0 tokens, is billable for what it reports: the provider ran those searches and charges them.
3. no quote -> ``unpriced`` (held; never charged $0 silently).
4. otherwise ``billed``: charge = quote.price_nanos, cost = quote.cost_nanos.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from metering.billing.pricing import Quote
from metering.events import Status, UsageCompleteness, used_nothing


class BillingStatus(StrEnum):
    BILLED = "billed"
    EXCLUDED_BYOLLM = "excluded_byollm"
    UNPRICED = "unpriced"
    NOT_BILLABLE = "not_billable"


@dataclass(frozen=True, slots=True)
class Decision:
    status: BillingStatus
    charge_nanos: int  # posted to the user's account
    cost_nanos: int  # platform's provider cost
    shadow_nanos: int  # what a BYOLLM call would have been charged (kept, never posted as a charge)


_NOT_BILLABLE = Decision(BillingStatus.NOT_BILLABLE, charge_nanos=0, cost_nanos=0, shadow_nanos=0)
_UNPRICED = Decision(BillingStatus.UNPRICED, charge_nanos=0, cost_nanos=0, shadow_nanos=0)


def decide(
    *,
    is_byollm: bool,
    status: Status | str,
    usage_completeness: UsageCompleteness | str,
    total_tokens: int,
    web_searches: int,
    quote: Quote | None,
) -> Decision:
    """Apply Policy A to one priced (or unpriceable) call."""
    status = status if type(status) is Status else Status(status)
    completeness = (
        usage_completeness if type(usage_completeness) is UsageCompleteness else UsageCompleteness(usage_completeness)
    )
    if total_tokens < 0 or web_searches < 0:
        raise ValueError("total_tokens and web_searches must be >= 0")
    if is_byollm:
        shadow = quote.price_nanos if quote is not None else 0
        return Decision(BillingStatus.EXCLUDED_BYOLLM, charge_nanos=0, cost_nanos=0, shadow_nanos=shadow)
    if used_nothing(status, completeness, total_tokens, web_searches):
        return _NOT_BILLABLE
    if quote is None:
        return _UNPRICED
    return Decision(BillingStatus.BILLED, charge_nanos=quote.price_nanos, cost_nanos=quote.cost_nanos, shadow_nanos=0)
