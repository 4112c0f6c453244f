"""Policy A: BYOLLM calls are metered, never billed; failed calls without usage are not billable (a failed call whose
usage reports web searches is: the provider ran and charges them)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from metering.billing.policy import BillingStatus, Decision, decide
from metering.billing.pricing import Quote
from metering.events import Status, UsageCompleteness

QUOTE = Quote(
    cost_nanos=2_145_000_000,
    price_nanos=2_574_000_000,
    markup_pct=Decimal("20"),
    source="genai-prices",
    source_version="genai-prices==0.2.3 (bundled data)",
    matched_model="claude-sonnet-4-6",
)


def _decide(**overrides):
    args = dict(
        is_byollm=False,
        status=Status.OK,
        usage_completeness=UsageCompleteness.REPORTED,
        total_tokens=1_010_000,
        web_searches=0,
        quote=QUOTE,
    )
    args.update(overrides)
    return decide(**args)


def test_platform_call_is_billed_at_price_with_cost():
    assert _decide() == Decision(
        BillingStatus.BILLED, charge_nanos=2_574_000_000, cost_nanos=2_145_000_000, shadow_nanos=0
    )


def test_byollm_is_excluded_with_shadow_price():
    assert _decide(is_byollm=True) == Decision(
        BillingStatus.EXCLUDED_BYOLLM, charge_nanos=0, cost_nanos=0, shadow_nanos=2_574_000_000
    )


def test_byollm_without_quote_is_excluded_not_unpriced():
    decision = _decide(is_byollm=True, quote=None)
    assert decision.status is BillingStatus.EXCLUDED_BYOLLM
    assert (decision.charge_nanos, decision.cost_nanos, decision.shadow_nanos) == (0, 0, 0)


def test_byollm_wins_over_failed_call():
    decision = _decide(is_byollm=True, status=Status.ERROR, usage_completeness="missing", total_tokens=0)
    assert decision.status is BillingStatus.EXCLUDED_BYOLLM


def test_failed_over_call_is_billed_like_a_platform_call():
    # The failed-over call was served by the platform config, so it arrives with is_byollm=False.
    assert _decide(is_byollm=False).status is BillingStatus.BILLED


@pytest.mark.parametrize("status", [Status.ERROR, Status.CANCELLED, "error", "cancelled"])
@pytest.mark.parametrize(
    ("completeness", "tokens"),
    [(UsageCompleteness.MISSING, 0), (UsageCompleteness.MISSING, 50), (UsageCompleteness.REPORTED, 0)],
)
def test_failed_call_without_usage_is_not_billable(status, completeness, tokens):
    decision = _decide(status=status, usage_completeness=completeness, total_tokens=tokens)
    assert decision == Decision(BillingStatus.NOT_BILLABLE, 0, 0, 0)


@pytest.mark.parametrize("status", [Status.ERROR, Status.CANCELLED])
def test_failed_call_with_reported_usage_is_billed(status):
    # A cancelled stream that consumed tokens still costs the platform money.
    decision = _decide(status=status, usage_completeness=UsageCompleteness.ESTIMATED, total_tokens=300)
    assert decision.status is BillingStatus.BILLED
    assert decision.charge_nanos == QUOTE.price_nanos


@pytest.mark.parametrize("status", [Status.ERROR, Status.CANCELLED])
@pytest.mark.parametrize("completeness", [UsageCompleteness.REPORTED, UsageCompleteness.ESTIMATED])
def test_failed_call_whose_usage_reports_searches_and_no_tokens_is_billed(status, completeness):
    """The provider charged the searches it ran before the call failed: billed for what was reported, not $0."""
    decision = _decide(status=status, usage_completeness=completeness, total_tokens=0, web_searches=2)
    assert decision == Decision(BillingStatus.BILLED, QUOTE.price_nanos, QUOTE.cost_nanos, 0)
    # without a search price it is held, never billed as if the searches were free
    assert _decide(status=status, usage_completeness=completeness, total_tokens=0, web_searches=2, quote=None) == (
        Decision(BillingStatus.UNPRICED, 0, 0, 0)
    )


@pytest.mark.parametrize("status", [Status.ERROR, Status.CANCELLED])
def test_failed_call_with_missing_usage_is_not_billable_whatever_its_searches(status):
    decision = _decide(status=status, usage_completeness=UsageCompleteness.MISSING, total_tokens=0, web_searches=3)
    assert decision == Decision(BillingStatus.NOT_BILLABLE, 0, 0, 0)


def test_no_quote_is_unpriced_never_zero_billed():
    assert _decide(quote=None) == Decision(BillingStatus.UNPRICED, 0, 0, 0)


def test_failed_no_usage_and_no_quote_is_not_billable_rather_than_unpriced():
    decision = _decide(status=Status.ERROR, usage_completeness=UsageCompleteness.MISSING, total_tokens=0, quote=None)
    assert decision.status is BillingStatus.NOT_BILLABLE


def test_statuses_are_strings():
    assert BillingStatus.EXCLUDED_BYOLLM == "excluded_byollm"
    assert {s.value for s in BillingStatus} == {"billed", "excluded_byollm", "unpriced", "not_billable"}


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        _decide(status="exploded")
    with pytest.raises(ValueError):
        _decide(total_tokens=-1)
    with pytest.raises(ValueError):
        _decide(web_searches=-1)
