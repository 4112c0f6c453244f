"""Invoices (pure): exact totals, one half-even rounding to cents with a visible residue, line order."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime

import pytest

from metering.billing.export import INVOICE_COLUMNS, invoice_csv, text_cell, usd
from metering.billing.invoices import _NAMESPACE as INVOICE_NAMESPACE
from metering.billing.invoices import InvoiceLine, build_invoice, invoice_id

WHEN = datetime(2025, 4, 4, tzinfo=UTC)


def line(ext: str = "rewrite", model: str = "m", late: bool = False, calls: int = 1, nanos: int = 0) -> InvoiceLine:
    return InvoiceLine(ext, model, late, calls, nanos)


def test_total_is_exact_and_rounded_once_half_even_with_residue() -> None:
    lines = [line(model="a", nanos=1_000_000_000), line(model="b", nanos=1_145_000_000)]
    invoice = build_invoice("t", "u", "2025-03", lines, "draft", None)
    assert invoice.total_nanos == 2_145_000_000
    assert invoice.rounded_nanos == 2_140_000_000  # $2.145 -> $2.14: half to even
    assert invoice.residue_nanos == 5_000_000
    assert invoice.rounded_nanos + invoice.residue_nanos == invoice.total_nanos


@pytest.mark.parametrize(
    ("total", "rounded", "residue"),
    [
        (2_155_000_000, 2_160_000_000, -5_000_000),  # $2.155 -> $2.16: half to even (up)
        (2_145_000_001, 2_150_000_000, -4_999_999),  # just above half: up
        (2_144_999_999, 2_140_000_000, 4_999_999),  # just below half: down
        (10_000_000, 10_000_000, 0),  # whole cents: no residue
        (0, 0, 0),
        (4_999_999, 0, 4_999_999),
    ],
)
def test_rounding_cases(total: int, rounded: int, residue: int) -> None:
    invoice = build_invoice("t", "u", "2025-03", [line(nanos=total)], "draft", None)
    assert (invoice.total_nanos, invoice.rounded_nanos, invoice.residue_nanos) == (total, rounded, residue)


def test_lines_are_rounded_once_on_the_total_not_per_line() -> None:
    # Three lines of $0.004 each: per-line rounding would give $0.00, the total $0.012 rounds to $0.01.
    invoice = build_invoice("t", "u", "2025-03", [line(model=m, nanos=4_000_000) for m in "abc"], "draft", None)
    assert (invoice.total_nanos, invoice.rounded_nanos, invoice.residue_nanos) == (12_000_000, 10_000_000, 2_000_000)


def test_lines_sorted_regular_first_then_late_each_by_extension_and_model() -> None:
    lines = [
        line("summarize", "b", late=True),
        line("rewrite", "z"),
        line("rewrite", "a", late=True),
        line("summarize", "a"),
        line("rewrite", "b"),
    ]
    invoice = build_invoice("t", "u", "2025-03", lines, "draft", None)
    assert [(x.is_late, x.extension_id, x.model) for x in invoice.lines] == [
        (False, "rewrite", "b"),
        (False, "rewrite", "z"),
        (False, "summarize", "a"),
        (True, "rewrite", "a"),
        (True, "summarize", "b"),
    ]


def test_empty_draft_and_calls() -> None:
    invoice = build_invoice("t", "u", "2025-03", [], "draft", None)
    assert invoice.lines == () and invoice.total_nanos == 0 and invoice.calls == 0
    assert build_invoice("t", "u", "2025-03", [line(calls=3), line(model="x", calls=4)], "draft", None).calls == 7


def test_status_and_finalized_at_must_agree() -> None:
    assert build_invoice("t", "u", "2025-03", [], "finalized", WHEN).is_finalized
    with pytest.raises(ValueError):
        build_invoice("t", "u", "2025-03", [], "finalized", None)
    with pytest.raises(ValueError):
        build_invoice("t", "u", "2025-03", [], "draft", WHEN)
    with pytest.raises(ValueError):
        build_invoice("t", "u", "2025-03", [], "open", None)  # type: ignore[arg-type]


def test_invoice_id_is_derived_and_distinct() -> None:
    assert invoice_id("t", "u", "2025-03") == invoice_id("t", "u", "2025-03")
    assert invoice_id("t", "u", "2025-03") != invoice_id("t", "u", "2025-04")
    assert invoice_id("t/u", "x", "2025-03") != invoice_id("t", "u/x", "2025-03")
    # Ids holding the separator once shared an invoice: ('a\x1fb', 'c') and ('a', 'b\x1fc'), or ('a', 'b') in
    # period 'c\x1f2025-03' of a join. Every other id is as it always was (stored invoices keep theirs).
    assert invoice_id("a\x1fb", "c", "2025-03") != invoice_id("a", "b\x1fc", "2025-03")
    assert invoice_id("a\x1fb", "c", "2025-03") != uuid.uuid5(INVOICE_NAMESPACE, "a\x1fb\x1fc\x1f2025-03")
    assert invoice_id("acme", "alice", "2025-03") == uuid.uuid5(INVOICE_NAMESPACE, "acme\x1falice\x1f2025-03")


def test_usd_is_exact_and_never_an_exponent() -> None:
    assert usd(0) == "0.000000000"
    assert usd(5) == "0.000000005"
    assert usd(2_145_000_000) == "2.145000000"
    assert usd(-5_000_000) == "-0.005000000"


def test_invoice_csv_rows_and_exact_amounts() -> None:
    lines = [line("rewrite", "m", calls=2, nanos=1_000_000_000), line("rewrite", "m", late=True, nanos=1_145_000_000)]
    rows = list(csv.DictReader(io.StringIO(invoice_csv(build_invoice("t", "u", "2025-03", lines, "draft", None)))))
    assert tuple(rows[0]) == INVOICE_COLUMNS
    assert [(r["row"], r["is_late"], r["calls"], r["amount_usd"], r["amount_nanos"]) for r in rows] == [
        ("line", "false", "2", "1.000000000", "1000000000"),
        ("line", "true", "1", "1.145000000", "1145000000"),
        ("total", "", "3", "2.145000000", "2145000000"),
        ("rounded_total", "", "", "2.140000000", "2140000000"),
        ("residue", "", "", "0.005000000", "5000000"),
    ]
    assert {(r["period"], r["tenant_id"], r["user_id"], r["status"]) for r in rows} == {("2025-03", "t", "u", "draft")}


@pytest.mark.parametrize(
    ("value", "cell"),
    [("=1+1", "'=1+1"), ("+SUM(A1)", "'+SUM(A1)"), ("-2+3", "'-2+3"), ("@cmd", "'@cmd"), ("\tx", "'\tx"),
     ("\rx", "'\rx"), ("acme", "acme"), ("a=b", "a=b"), ("", ""), (None, "")],
)  # fmt: skip
def test_text_cells_never_start_a_formula(value, cell) -> None:
    assert text_cell(value) == cell


def test_invoice_csv_neutralises_formulas_in_ids_but_not_negative_amounts() -> None:
    lines = [line("=HYPERLINK(1)", "@m", nanos=-1_500_000_000)]
    rows = list(csv.DictReader(io.StringIO(invoice_csv(build_invoice("-2+3", "+u", "2025-03", lines, "draft", None)))))
    assert (rows[0]["tenant_id"], rows[0]["user_id"], rows[0]["extension_id"], rows[0]["model"]) == (
        "'-2+3", "'+u", "'=HYPERLINK(1)", "'@m",
    )  # fmt: skip
    assert (rows[0]["amount_usd"], rows[0]["amount_nanos"]) == ("-1.500000000", "-1500000000")


def test_periods_run_from_1970_01_to_9999_11_in_ascii_digits() -> None:
    from datetime import UTC, datetime

    from metering.billing.periods import parse_period, period_bounds

    assert parse_period("2026-11") == (2026, 11)
    assert period_bounds("2026-12") == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert period_bounds("9999-11")[1] == datetime(9999, 12, 1, tzinfo=UTC)
    for bad in ("9999-12", "1969-12", "2026-13", "2026-00", "2026-1", "\uff12\uff10\uff12\uff16-\uff11\uff11", "x"):
        with pytest.raises(ValueError, match="YYYY-MM"):
            parse_period(bad)


def test_an_event_billed_in_a_period_happened_no_earlier_than_the_finalized_months_just_before_it() -> None:
    from metering.billing.periods import billing_period, earliest_billed_in, previous_period

    assert [previous_period(p) for p in ("2026-03", "2026-01", "1970-02", "1970-01")] == [
        "2026-02",
        "2025-12",
        "1970-01",
        None,
    ]
    finalized = {"2025-11", "2025-12", "2026-01", "2026-03", "1970-01"}
    assert earliest_billed_in("2026-02", finalized) == "2025-11"  # 2026-01, 2025-12, 2025-11 closed; 2025-10 open
    assert earliest_billed_in("2026-04", finalized) == "2026-03"
    assert earliest_billed_in("2026-03", finalized) == "2026-03"  # 2026-02 is open: only its own events
    assert earliest_billed_in("1970-02", finalized) == "1970-01"
    for month in ("2025-09", "2025-10", "2025-11", "2025-12", "2026-01", "2026-02", "2026-03", "2026-04"):
        billed_in = billing_period(month, finalized)[0]
        assert earliest_billed_in(billed_in, finalized) <= month <= billed_in
