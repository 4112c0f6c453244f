"""GET /v1/usage counts a call in the hour it happened (``occurred_at``), invoices bill it in a billing period: a
late event of a finalized month and a re-rate correction of it show in the month the calls happened in the usage, and
on a later month's invoice. On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from metering.auth import Scope
from metering.billing import invoice_store
from metering.billing.ingest import ingest
from metering.billing.overrides import add_override
from metering.billing.rerate import apply_rerate
from metering.events import event_from_record
from tests.fakes.events import record
from tests.integration.api.conftest import bearer

OCTOBER, NOVEMBER, DECEMBER = (datetime(2026, m, 1, tzinfo=UTC) for m in (10, 11, 12))
NOW = datetime(2026, 11, 20, tzinfo=UTC)


def _ollama(i: int, at: datetime) -> object:
    return event_from_record(record(i, provider="ollama", model="llama3.1", input_tokens=1_000_000,
                                    output_tokens=0, cache_read_tokens=0, occurred_at=at))  # fmt: skip


def _price(session, id: str, usd: str, since: datetime) -> None:
    add_override(session, provider="ollama", model_pattern="llama3.1", effective_from=since, effective_to=None,
                 input_mtok=Decimal(usd), output_mtok=Decimal(usd), id=id)  # fmt: skip


def _billed(client, headers, start: datetime, end: datetime) -> int:
    params = {"from": start.isoformat(), "to": end.isoformat()}
    response = client.get("/v1/usage", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return sum(row["billed_nanos"] for row in response.json()["rows"])


def _invoice(client, headers, period: str) -> dict:
    response = client.get(f"/v1/invoices/tenant-1/user-1/{period}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_late_event_and_a_rerate_count_in_the_usage_of_the_month_they_happened_not_of_their_invoice(
    session_factory, client, make_token
) -> None:
    reader = bearer(make_token(Scope.READ))
    with session_factory() as session:
        _price(session, "one", "1", OCTOBER)  # $1 a call
        ingest(session, [_ollama(0, datetime(2026, 10, 31, 23, 59, 59, 999999, tzinfo=UTC))], now=NOW)
        invoice_store.finalize_period(session, "2026-10", NOW, timedelta(hours=72))
        ingest(session, [_ollama(1, datetime(2026, 10, 31, 23, 30, tzinfo=UTC))], now=NOW)  # late: October is closed
        session.commit()
    dollar = 1_000_000_000
    assert _billed(client, reader, OCTOBER, NOVEMBER) == 2 * dollar  # both calls happened in October
    assert _billed(client, reader, NOVEMBER, DECEMBER) == 0
    october, november = _invoice(client, reader, "2026-10"), _invoice(client, reader, "2026-11")
    assert october["status"] == "finalized" and october["total_nanos"] == dollar
    assert [(line["is_late"], line["billed_nanos"]) for line in november["lines"]] == [(True, dollar)]

    with session_factory() as session:  # a new price for October's calls: $3 a call
        _price(session, "three", "3", OCTOBER + timedelta(seconds=1))
        session.commit()
        apply_rerate(session, start=OCTOBER, end=NOVEMBER, markup_pct=Decimal(0), run_id="r1")
        session.commit()
    assert _billed(client, reader, OCTOBER, NOVEMBER) == 6 * dollar  # the usage of the hour the calls happened
    assert _billed(client, reader, NOVEMBER, DECEMBER) == 0
    assert _invoice(client, reader, "2026-10")["total_nanos"] == dollar  # finalized: never changes
    lines = _invoice(client, reader, "2026-11")["lines"]
    assert sorted((line["is_late"], line["correction_of"], line["billed_nanos"]) for line in lines) == [
        (False, "2026-10", 2 * dollar),  # the finalized October call's correction
        (True, None, 3 * dollar),  # the late call, billed in November, re-rated there
    ]
