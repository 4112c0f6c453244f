"""Invoices on SQLite and PostgreSQL, through ingest: exact drafts, finalization after the grace period,
immutability (late events go to the next open invoice as late lines), CSV exports, the period lock."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from metering.billing import invoice_store
from metering.billing.export import LEDGER_COLUMNS, invoice_csv, ledger_csv
from metering.billing.ingest import ingest
from metering.cli.billing_invoices import invoices_app, ledger_export_command
from metering.db.models import InvoiceLineRow, InvoiceRow, TransferRow, UsageEventRow
from metering.errors import InvalidInputError, PeriodOpenError
from metering.events import event_from_record
from tests.fakes.events import record

MARCH = datetime(2025, 3, 10, 9, 0, tzinfo=UTC)
APRIL = datetime(2025, 4, 2, 9, 0, tzinfo=UTC)
GRACE = timedelta(hours=72)
END_OF_GRACE = datetime(2025, 4, 4, tzinfo=UTC)  # 2025-04-01 00:00 UTC + 72 h
TENANT = "tenant-1"


def ingest_records(session_factory, records: list[dict], now: datetime) -> None:
    with session_factory() as session:
        result = ingest(session, [event_from_record(r) for r in records], markup_pct=Decimal(20), now=now)
        session.commit()
    assert result.rejected == [] and result.inserted == len(records)


def march_usage(session_factory, user: str = "user-1") -> None:
    """5 billed calls over 2 models and 2 extensions, plus 2 BYOLLM calls (never billed), in March."""
    records = [
        record(0, user_id=user, occurred_at=MARCH, input_tokens=1_200, output_tokens=300),
        record(1, user_id=user, occurred_at=MARCH + timedelta(days=1), input_tokens=5_000, output_tokens=1_000),
        record(2, user_id=user, occurred_at=MARCH, model="claude-haiku-4-5", input_tokens=777, output_tokens=33),
        record(0, user_id=user, occurred_at=MARCH, extension_id="summarize", input_tokens=10_001, output_tokens=7),
        record(1, user_id=user, occurred_at=MARCH, extension_id="summarize", input_tokens=9_999, output_tokens=3),
        record(3, user_id=user, occurred_at=MARCH, is_byollm=True, input_tokens=50_000, output_tokens=9_000),
        record(4, user_id=user, occurred_at=MARCH, is_byollm=True, model="claude-haiku-4-5"),
    ]
    ingest_records(session_factory, records, now=MARCH + timedelta(days=2))


def billed_sum(session, user: str, period: str) -> tuple[int, int]:
    e = UsageEventRow
    stmt = select(func.count(), func.coalesce(func.sum(e.charge_nanos), 0)).where(
        e.user_id == user, e.invoice_period == period, e.billing_status == "billed"
    )
    calls, total = session.execute(stmt).one()
    return int(calls), int(total)


def test_draft_total_is_the_exact_sum_of_billed_charges(session_factory) -> None:
    march_usage(session_factory)
    with session_factory() as session:
        invoice = invoice_store.get_invoice(session, TENANT, "user-1", "2025-03")
        calls, total = billed_sum(session, "user-1", "2025-03")
        byollm = session.scalars(select(UsageEventRow).where(UsageEventRow.is_byollm.is_(True))).all()
    assert invoice.status == "draft" and invoice.finalized_at is None
    assert calls == 5 and total > 0
    assert invoice.total_nanos == total and invoice.calls == 5
    assert invoice.rounded_nanos % 10_000_000 == 0
    assert invoice.rounded_nanos + invoice.residue_nanos == total
    assert [(x.extension_id, x.model, x.is_late, x.calls) for x in invoice.lines] == [
        ("rewrite", "claude-haiku-4-5", False, 1),
        ("rewrite", "claude-sonnet-4-6", False, 2),
        ("summarize", "claude-sonnet-4-6", False, 2),
    ]
    # BYOLLM calls are metered (shadow cost kept) but never billed, so never on an invoice.
    assert len(byollm) == 2 and all(r.billing_status != "billed" and r.shadow_nanos > 0 for r in byollm)
    assert sum(line.billed_nanos for line in invoice.lines) == total


def test_a_byollm_only_user_has_no_invoice(session_factory) -> None:
    march_usage(session_factory, "user-1")
    ingest_records(
        session_factory, [record(0, user_id="byo", occurred_at=MARCH, is_byollm=True)], now=MARCH + timedelta(days=2)
    )
    with session_factory() as session:
        listed = invoice_store.list_invoices(session)
        assert [(i.user_id, i.period) for i in listed] == [("user-1", "2025-03")]
        assert invoice_store.get_invoice(session, TENANT, "byo", "2025-03").lines == ()
        invoice_store.finalize_period(session, "2025-03", END_OF_GRACE, GRACE)
        session.commit()
        assert session.scalar(select(func.count()).select_from(InvoiceRow).where(InvoiceRow.user_id == "byo")) == 0


def test_finalize_refuses_inside_the_grace_period(session_factory) -> None:
    march_usage(session_factory)
    with session_factory() as session:
        for now in (MARCH, datetime(2025, 4, 1, tzinfo=UTC), END_OF_GRACE - timedelta(microseconds=1)):
            with pytest.raises(PeriodOpenError, match="2025-03"):
                invoice_store.finalize_period(session, "2025-03", now, GRACE)
        assert session.scalar(select(func.count()).select_from(InvoiceRow)) == 0
        with pytest.raises(InvalidInputError):
            invoice_store.finalize_period(session, "2025-13", END_OF_GRACE, GRACE)


def test_finalize_after_the_grace_period_is_idempotent(session_factory) -> None:
    march_usage(session_factory, "user-1")
    march_usage(session_factory, "user-2")
    with session_factory() as session:
        draft = invoice_store.get_invoice(session, TENANT, "user-1", "2025-03")
        issued = invoice_store.finalize_period(session, "2025-03", END_OF_GRACE, GRACE)
        session.commit()
    assert [(i.user_id, i.status, i.finalized_at) for i in issued] == [
        ("user-1", "finalized", END_OF_GRACE),
        ("user-2", "finalized", END_OF_GRACE),
    ]
    with session_factory() as session:
        stored = invoice_store.get_invoice(session, TENANT, "user-1", "2025-03")
        assert stored.status == "finalized" and stored.finalized_at == END_OF_GRACE
        assert (stored.lines, stored.total_nanos, stored.rounded_nanos, stored.residue_nanos) == (
            draft.lines,
            draft.total_nanos,
            draft.rounded_nanos,
            draft.residue_nanos,
        )
        counts = (
            session.scalar(select(func.count()).select_from(InvoiceRow)),
            session.scalar(select(func.count()).select_from(InvoiceLineRow)),
        )
        assert counts == (2, 6)
        assert invoice_store.finalize_period(session, "2025-03", END_OF_GRACE + timedelta(days=9), GRACE) == []
        session.commit()
    with session_factory() as session:
        again = (
            session.scalar(select(func.count()).select_from(InvoiceRow)),
            session.scalar(select(func.count()).select_from(InvoiceLineRow)),
        )
        assert again == counts
        assert invoice_store.get_invoice(session, TENANT, "user-1", "2025-03") == stored


def test_force_finalizes_inside_the_grace_period(session_factory) -> None:
    march_usage(session_factory)
    with session_factory() as session:
        issued = invoice_store.finalize_period(session, "2025-03", APRIL, GRACE, force=True)
        session.commit()
    assert [i.status for i in issued] == ["finalized"]


def test_a_late_event_goes_to_the_next_open_invoice_and_the_finalized_one_never_changes(session_factory) -> None:
    march_usage(session_factory)
    with session_factory() as session:
        (finalized,) = invoice_store.finalize_period(session, "2025-03", END_OF_GRACE, GRACE)
        session.commit()
    late = record(9, occurred_at=MARCH + timedelta(days=20), input_tokens=4_321, output_tokens=123)
    on_time = record(0, occurred_at=APRIL, input_tokens=1_000, output_tokens=100)
    ingest_records(session_factory, [late, on_time], now=END_OF_GRACE + timedelta(hours=1))
    with session_factory() as session:
        march = invoice_store.get_invoice(session, TENANT, "user-1", "2025-03")
        april = invoice_store.get_invoice(session, TENANT, "user-1", "2025-04")
        late_row = session.get(UsageEventRow, event_from_record(late).event_id)
        late_transfers = session.scalars(select(TransferRow).where(TransferRow.event_id == late_row.event_id)).all()
        _, april_total = billed_sum(session, "user-1", "2025-04")
    assert march == finalized  # lines, totals and finalized_at unchanged
    assert (late_row.invoice_period, late_row.is_late) == ("2025-04", True)
    assert {t.period for t in late_transfers} == {"2025-04"}
    assert april.status == "draft"
    assert [(x.extension_id, x.model, x.is_late, x.calls) for x in april.lines] == [
        ("rewrite", "claude-sonnet-4-6", False, 1),
        ("rewrite", "claude-sonnet-4-6", True, 1),
    ]
    assert april.lines[1].billed_nanos == late_row.charge_nanos
    assert april.total_nanos == april_total


def test_list_invoices_mixes_finalized_and_drafts_and_filters(session_factory) -> None:
    march_usage(session_factory, "user-1")
    ingest_records(session_factory, [record(0, occurred_at=APRIL)], now=APRIL + timedelta(hours=1))
    with session_factory() as session:
        invoice_store.finalize_period(session, "2025-03", END_OF_GRACE, GRACE)
        session.commit()
        listed = invoice_store.list_invoices(session)
        assert [(i.period, i.user_id, i.status) for i in listed] == [
            ("2025-03", "user-1", "finalized"),
            ("2025-04", "user-1", "draft"),
        ]
        assert [i.period for i in invoice_store.list_invoices(session, period="2025-04")] == ["2025-04"]
        assert invoice_store.list_invoices(session, tenant_id="another") == []


def test_invoice_csv_has_the_lines_and_exact_totals(session_factory) -> None:
    march_usage(session_factory)
    with session_factory() as session:
        invoice = invoice_store.get_invoice(session, TENANT, "user-1", "2025-03")
    rows = list(csv.DictReader(io.StringIO(invoice_csv(invoice))))
    lines = [r for r in rows if r["row"] == "line"]
    assert [(r["extension_id"], r["model"], int(r["calls"]), int(r["amount_nanos"])) for r in lines] == [
        (x.extension_id, x.model, x.calls, x.billed_nanos) for x in invoice.lines
    ]
    assert all(Decimal(r["amount_usd"]) * 10**9 == int(r["amount_nanos"]) for r in rows)
    summary = {r["row"]: int(r["amount_nanos"]) for r in rows if r["row"] != "line"}
    assert summary == {
        "total": invoice.total_nanos,
        "rounded_total": invoice.rounded_nanos,
        "residue": invoice.residue_nanos,
    }


def test_ledger_csv_lists_the_periods_transfers_in_order(session_factory) -> None:
    march_usage(session_factory)
    ingest_records(session_factory, [record(0, occurred_at=APRIL)], now=APRIL + timedelta(hours=1))
    with session_factory() as session:
        expected = session.scalars(
            select(TransferRow).where(TransferRow.period == "2025-03").order_by(TransferRow.created_at, TransferRow.id)
        ).all()
        exported = ledger_csv(session, "2025-03")
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert tuple(rows[0]) == LEDGER_COLUMNS
    assert len(expected) == 10  # 5 billed calls: a usage charge and a provider cost each
    assert [r["id"] for r in rows] == [str(t.id) for t in expected]
    assert [(r["kind"], r["debit_account_id"], int(r["amount_nanos"])) for r in rows] == [
        (t.kind, t.debit_account_id, t.amount_nanos) for t in expected
    ]
    assert all(Decimal(r["amount_usd"]) * 10**9 == int(r["amount_nanos"]) for r in rows)
    assert rows[0]["created_at"] == expected[0].created_at.isoformat()
    assert {r["event_id"] for r in rows} <= {str(t.event_id) for t in expected}


def test_the_period_lock_blocks_finalization_while_an_ingest_holds_it(session_factory, backend) -> None:
    march_usage(session_factory)
    with session_factory() as ingesting:
        invoice_store.lock_period_shared(ingesting, "2025-03")
        invoice_store.lock_period_shared(ingesting, "2025-03")  # shared: re-entrant, and other ingests pass
        if backend == "postgresql":
            with session_factory() as finalizing:
                finalizing.execute(text("SET LOCAL lock_timeout = '200ms'"))
                with pytest.raises(OperationalError, match="lock timeout"):
                    invoice_store.finalize_period(finalizing, "2025-03", END_OF_GRACE, GRACE)
        ingesting.commit()
    with session_factory() as finalizing:
        assert len(invoice_store.finalize_period(finalizing, "2025-03", END_OF_GRACE, GRACE)) == 1
        finalizing.commit()


def test_the_cli_finalizes_shows_and_exports(session_factory, db_url, tmp_path) -> None:
    march_usage(session_factory)
    env = {"METERING_DATABASE_URL": db_url, "METERING_DATA_DIR": str(tmp_path), "COLUMNS": "200"}
    runner = CliRunner()
    listed = runner.invoke(invoices_app, ["list", "--period", "2025-03"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "user-1" in listed.output and "draft" in listed.output
    done = runner.invoke(invoices_app, ["finalize", "2025-03"], env=env)
    assert done.exit_code == 0, done.output
    assert "finalized 1 invoice(s) of 2025-03" in done.output
    open_period = runner.invoke(invoices_app, ["finalize", "2999-01"], env=env)
    assert open_period.exit_code != 0
    shown = runner.invoke(invoices_app, ["show", TENANT, "user-1", "2025-03"], env=env)
    assert shown.exit_code == 0 and "finalized" in shown.output and "rounding residue" in shown.output
    out = tmp_path / "invoice.csv"
    exported = runner.invoke(invoices_app, ["export", TENANT, "user-1", "2025-03", "--out", str(out)], env=env)
    assert exported.exit_code == 0, exported.output
    with session_factory() as session:
        invoice = invoice_store.get_invoice(session, TENANT, "user-1", "2025-03")
    assert out.read_text(encoding="utf-8") == invoice_csv(invoice).replace("\r\n", "\n")
    ledger = tmp_path / "ledger.csv"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        ledger_export_command("2025-03", ledger)
    assert len(list(csv.DictReader(ledger.open(newline="")))) == 10


def test_draft_lines_of_nobody_are_empty(session_factory) -> None:
    with session_factory() as session:
        assert invoice_store.draft_lines(session, TENANT, "nobody", "2025-03") == []
        with pytest.raises(InvalidInputError, match="YYYY-MM"):
            invoice_store.draft_lines(session, TENANT, "nobody", "March")


def test_a_late_event_waiting_on_a_month_being_finalized_moves_on_past_it(session_factory, backend) -> None:
    """March is finalized, so a March event bills late into April. If April is being finalized while that ingest
    waits for April's lock, the ingest must see April closed once it gets the lock and bill into May: before, it
    billed into April with what it had read before waiting, a charge no invoice ever showed."""
    import threading
    import time

    march_usage(session_factory)
    with session_factory() as session:
        invoice_store.finalize_period(session, "2025-03", END_OF_GRACE, GRACE)
        session.commit()
    late = event_from_record(record(7, occurred_at=MARCH + timedelta(days=3), input_tokens=4_000))
    finalizing = session_factory()
    invoice_store.finalize_period(finalizing, "2025-04", END_OF_GRACE, GRACE, force=True)  # holds April's lock
    done = threading.Event()

    def ingest_late() -> None:
        with session_factory() as session:
            ingest(session, [late], markup_pct=Decimal(20), now=END_OF_GRACE)
            session.commit()
        done.set()

    worker = threading.Thread(target=ingest_late)
    worker.start()
    time.sleep(0.5)
    if backend == "postgresql":
        assert not done.is_set()  # waiting for April's lock (SQLite: waiting for the database's write lock)
    finalizing.commit()
    finalizing.close()
    worker.join(timeout=30)
    assert done.is_set()
    with session_factory() as session:
        stored = session.get(UsageEventRow, late.event_id)
        april = invoice_store.get_invoice(session, TENANT, "user-1", "2025-04")
        may = invoice_store.get_invoice(session, TENANT, "user-1", "2025-05")
    assert (stored.invoice_period, stored.is_late) == ("2025-05", True)
    assert april.lines == ()  # April was closed with nothing on it for this user, and stays so
    assert [(line.is_late, line.calls, line.billed_nanos) for line in may.lines] == [(True, 1, stored.charge_nanos)]


def test_ids_holding_the_separator_never_share_an_invoice(session_factory) -> None:
    """('a\x1fb', 'c') and ('a', 'b\x1fc') once got one invoice id: finalizing their month failed on the primary
    key, for every user of the month (found by a reviewer)."""
    first = record(0, occurred_at=MARCH, user_id="c") | {"tenant_id": "a\x1fb"}
    second = record(0, occurred_at=MARCH, user_id="b\x1fc") | {"tenant_id": "a"}
    ingest_records(session_factory, [first, second], now=MARCH + timedelta(days=1))
    with session_factory() as session:
        issued = invoice_store.finalize_period(session, "2025-03", END_OF_GRACE, GRACE)
        session.commit()
    assert sorted((i.tenant_id, i.user_id) for i in issued) == [("a", "b\x1fc"), ("a\x1fb", "c")]
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(InvoiceRow).where(InvoiceRow.period == "2025-03")) == 2


def test_the_checks_name_charges_of_a_finalized_month_that_its_invoices_do_not_show(session_factory) -> None:
    """`billing check` proves that a finalized month's invoices show exactly what the ledger charged in it. A
    charge posted into a closed month with no invoice for it (as versions before finalized_periods did for a user
    who had no invoice there), or a finalized invoice whose total is not its period's charges, is named; finalizing
    the month again issues the missing invoice."""
    from metering.billing.checks import run_checks
    from metering.db.models import FinalizedPeriodRow

    march_usage(session_factory, "user-1")
    with session_factory() as session:
        invoice_store.finalize_period(session, "2025-03", END_OF_GRACE, GRACE)
        session.commit()
        assert run_checks(session).problems == []
    with session_factory() as session:  # an earlier version: March closed only for user-1, who had an invoice
        session.delete(session.get(FinalizedPeriodRow, "2025-03"))
        session.commit()
    ingest_records(session_factory, [record(0, user_id="user-2", occurred_at=MARCH)], now=END_OF_GRACE)
    with session_factory() as session:
        session.add(FinalizedPeriodRow(period="2025-03", finalized_at=END_OF_GRACE))  # migration 0007's backfill
        session.commit()
        _, late = billed_sum(session, "user-2", "2025-03")
        problems = run_checks(session).problems
    assert problems == [f"period 2025-03, tenant {TENANT!r}, user 'user-2': {late} nanos charged, 0 invoiced"]

    with session_factory() as session:
        session.execute(text("UPDATE invoices SET total_nanos = total_nanos + 7 WHERE user_id = 'user-1'"))
        _, charged = billed_sum(session, "user-1", "2025-03")
        problems = run_checks(session).problems
        session.rollback()
    assert (
        f"period 2025-03, tenant {TENANT!r}, user 'user-1': {charged} nanos charged, {charged + 7} invoiced" in problems
    )

    with session_factory() as session:
        (issued,) = invoice_store.finalize_period(session, "2025-03", END_OF_GRACE, GRACE)
        session.commit()
        assert (issued.user_id, issued.total_nanos) == ("user-2", late)
        assert run_checks(session).problems == []


def test_a_month_cannot_be_finalized_before_it_begins_even_forced(session_factory) -> None:
    """`invoices finalize 2027-11 --force` (a typo for 2026-11) closed a month that had not begun: every event of it
    was then billed late into the next one."""
    from metering.billing.store import finalized_periods

    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    with session_factory() as session:
        with pytest.raises(PeriodOpenError, match=r"period 2027-11 has not started \(it is 2026-11\)"):
            invoice_store.finalize_period(session, "2027-11", now, GRACE, force=True)
        with pytest.raises(PeriodOpenError, match="has not started"):
            invoice_store.finalize_period(session, "2026-12", now, GRACE, force=True)
        assert invoice_store.finalize_period(session, "2026-11", now, GRACE, force=True) == []  # the current one: yes
        session.commit()
    with session_factory() as session:
        assert finalized_periods(session) == {"2026-11"}


@pytest.mark.parametrize(
    ("tampering", "lines_altered", "rounding_altered"),
    [
        ("UPDATE invoice_lines SET billed_nanos = billed_nanos + 7 WHERE line_no = 1", True, False),
        ("DELETE FROM invoice_lines WHERE line_no = 2", True, False),
        (
            "UPDATE invoices SET rounded_nanos = rounded_nanos + 10000000, residue_nanos = residue_nanos - 10000000",
            False,
            True,
        ),
        ("UPDATE invoices SET residue_nanos = residue_nanos + 1", False, True),
        ("UPDATE invoices SET total_nanos = total_nanos + 3, residue_nanos = residue_nanos + 3", True, False),
    ],
)
def test_the_checks_name_a_finalized_invoice_whose_lines_or_rounding_were_altered(
    session_factory, tampering: str, lines_altered: bool, rounding_altered: bool
) -> None:
    """A finalized invoice is what the user is shown: its lines must add up to its total, and its total must be
    rounded once, half-even, to cents, the residue being the rest. `billing check` compared only the total with the
    ledger, so an invoice whose lines, rounded total or residue were altered (by hand, or by a bug) passed."""
    from metering.billing.checks import run_checks
    from metering.billing.money import round_cents

    march_usage(session_factory)
    with session_factory() as session:
        invoice_store.finalize_period(session, "2025-03", END_OF_GRACE, GRACE)
        session.commit()
        assert run_checks(session).problems == []
    with session_factory() as session:
        session.execute(text(tampering))
        lines = sum(session.scalars(select(InvoiceLineRow.billed_nanos)))
        total, rounded, residue = session.execute(
            select(InvoiceRow.total_nanos, InvoiceRow.rounded_nanos, InvoiceRow.residue_nanos)
        ).one()
        problems = [p for p in run_checks(session).problems if p.startswith("finalized invoice")]
        session.rollback()
    who = f"finalized invoice 2025-03, tenant {TENANT!r}, user 'user-1'"
    expected = []
    if lines_altered:
        expected.append(f"{who}: its lines add up to {lines} nanos, its total is {total}")
    if rounding_altered:
        right = round_cents(total)
        expected.append(
            f"{who}: total {total} nanos shown rounded to {rounded} with residue {residue}, not {right[0]} with "
            f"{right[1]} (once, half-even, to cents)"
        )
    assert problems == expected


def test_the_invoice_rounding_check_takes_ties_to_even_and_negative_totals_alike(session_factory) -> None:
    """The check's SQL decides half-even rounding itself: half a cent goes to the even cent, whatever the sign
    (a correction can make a total negative), on both databases."""
    import uuid

    from metering.billing.checks import run_checks
    from metering.billing.money import round_cents

    totals = (5_000_000, 15_000_000, 25_000_001, -5_000_000, -15_000_000, -25_000_000, -4_999_999, 0)
    with session_factory() as session:
        for n, total in enumerate(totals):
            for rounded in (round_cents(total)[0], round_cents(total)[0] + 10_000_000):
                ident = uuid.uuid4()
                session.add(InvoiceRow(id=ident, tenant_id=TENANT, user_id=f"u{n}-{rounded}", period="2025-03",
                                       status="finalized", currency="USD", total_nanos=total, rounded_nanos=rounded,
                                       residue_nanos=total - rounded, finalized_at=END_OF_GRACE))  # fmt: skip
                session.add(InvoiceLineRow(invoice_id=ident, line_no=1, extension_id="x", model="m", is_late=False,
                                           calls=1, billed_nanos=total))  # fmt: skip
        session.flush()
        problems = [p for p in run_checks(session).problems if p.startswith("finalized invoice")]
        session.rollback()
    wrong = {(n, total) for n, total in enumerate(totals)}
    assert len(problems) == len(wrong)
    for n, total in wrong:
        right = round_cents(total)
        bad = right[0] + 10_000_000
        assert any(f"user 'u{n}-{bad}'" in p and f"not {right[0]} with {right[1]}" in p for p in problems), problems
