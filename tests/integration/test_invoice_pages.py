"""The invoice list a page at a time (``invoice_pages``), on SQLite and PostgreSQL: walking every page gives
exactly the whole list (``list_invoices``, the CLI's), in its order, with its totals and lines, for every
period and tenant filter and page size, with finalized invoices, drafts, users whose invoice holds only late
lines (a late event, a repriced held event, a zero-charge one with no wallet) or only a re-rate correction,
users with no invoice at all, and ids that are hostile to cursors and to sorting."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from metering.billing import invoice_store
from metering.billing.ingest import ingest
from metering.billing.invoice_pages import decode_invoice_cursor, encode_invoice_cursor, invoices_page
from metering.billing.invoices import Invoice
from metering.billing.overrides import add_override
from metering.billing.reprice import reprice_held
from metering.billing.rerate import apply_rerate
from metering.errors import InvalidInputError
from metering.events import event_from_record
from tests.fakes.events import record

MARKUP = Decimal(20)
GRACE = timedelta(hours=72)
SEP, OCT, NOV = "2026-09", "2026-10", "2026-11"
IN_SEP, IN_OCT, IN_NOV = (datetime(2026, month, 10, 8, tzinfo=UTC) for month in (9, 10, 11))
NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)
# Ids that break naive cursors (separators, JSON, NUL-free control characters), sorting (accents, astral
# characters, which UTF-16 and some collations order differently from code points) and CSV cells.
TENANTS = ("alpha", "t:1~x", "Zeta", "ünï", "\U0001d518nicode")
USERS = ("u-1", "u|2", 'u"3', "e\u0301", "\u00e9", "x\x1fy", "=1+1", "\U0001d518" * 200, "a,b/c")


def _ingest(session_factory, records: list[dict], now: datetime) -> None:
    with session_factory() as session:
        result = ingest(session, [event_from_record(r) for r in records], markup_pct=MARKUP, now=now)
        session.commit()
    assert result.rejected == []


def _ollama(i: int, tenant: str, user: str, at: datetime, **kw: object) -> dict:
    kw = {"model": "llama3.1", "input_tokens": 1_000 + i, "output_tokens": 300 + i, "cache_read_tokens": 0, **kw}
    return record(i, tenant_id=tenant, user_id=user, occurred_at=at, provider="ollama", **kw)


def _price(session_factory, pattern: str, since: datetime, ident: str, input_mtok: str = "0.10") -> None:
    with session_factory() as session:
        add_override(session, provider="ollama", model_pattern=pattern, effective_from=since, effective_to=None,
                     input_mtok=Decimal(input_mtok), output_mtok=Decimal("0.40"), id=ident)  # fmt: skip
        session.commit()


def _finalize(session_factory, period: str, now: datetime) -> None:
    with session_factory() as session:
        invoice_store.finalize_period(session, period, now, GRACE)
        session.commit()


@pytest.fixture
def billed(session_factory) -> None:
    """September (finalized), October (finalized) and November (open) of every tenant's users, with:

    - late lines: September events arriving in October, October ones arriving in November;
    - ``late-only`` users: only late lines in October (finalized) and November (a draft); ``late-zero``: only a
      late call of 0 tokens (charged nothing, so no wallet); ``repriced``: a September call held unpriced, priced
      in November (late);
    - ``corrected``: only October usage, re-rated in November (a correction line on November's draft alone);
    - ``held`` and ``byollm``: November calls that bill nothing (no invoice, yet candidates of the page)."""
    _price(session_factory, "llama3*", datetime(2026, 1, 1, tzinfo=UTC), "old")
    september, october, november, late_sep, late_oct = [], [], [], [], []
    for t, tenant in enumerate(TENANTS):
        for u, user in enumerate(USERS):
            i = t * 100 + u
            if u % 3 != 2:
                september.append(_ollama(i, tenant, user, IN_SEP))
            if u % 2 == 0:
                october.append(_ollama(i, tenant, user, IN_OCT + timedelta(hours=u)))
            if u % 4 != 1:
                november.append(_ollama(i, tenant, user, IN_NOV))
            if u % 5 == 0:
                late_sep.append(_ollama(i + 50, tenant, user, IN_SEP + timedelta(days=15)))
            if u % 3 == 1:
                late_oct.append(_ollama(i + 60, tenant, user, IN_OCT))
        late_sep.append(_ollama(t, tenant, "late-only", IN_SEP))
        late_oct.append(_ollama(t, tenant, "late-only", IN_OCT))
        late_sep.append(_ollama(t, tenant, "late-zero", IN_SEP, input_tokens=0, output_tokens=0))
        september.append(_ollama(t, tenant, "repriced", IN_SEP, model="mystery-1"))  # held: nobody prices it
        october.append(_ollama(t, tenant, "corrected", IN_OCT))
        november.append(_ollama(t, tenant, "held", IN_NOV, model="mystery-2"))
        november.append(_ollama(t, tenant, "byollm", IN_NOV, is_byollm=True))
    _ingest(session_factory, september, IN_SEP + timedelta(days=2))
    _finalize(session_factory, SEP, datetime(2026, 10, 5, tzinfo=UTC))
    _ingest(session_factory, late_sep, datetime(2026, 10, 6, tzinfo=UTC))
    _ingest(session_factory, october, datetime(2026, 10, 20, tzinfo=UTC))
    _finalize(session_factory, OCT, datetime(2026, 11, 5, tzinfo=UTC))
    _ingest(session_factory, late_oct, datetime(2026, 11, 6, tzinfo=UTC))
    _ingest(session_factory, november, NOW)
    _price(session_factory, "mystery-1", datetime(2026, 1, 1, tzinfo=UTC), "mystery")
    _price(session_factory, "llama3*", datetime(2026, 10, 1, tzinfo=UTC), "new", input_mtok="0.20")
    with session_factory() as session:
        assert reprice_held(session, markup_pct=MARKUP, now=NOW).priced == len(TENANTS)
        apply_rerate(session, start=datetime(2026, 10, 1, tzinfo=UTC), end=datetime(2026, 11, 1, tzinfo=UTC),
                     markup_pct=MARKUP, run_id="oct", now=NOW)  # fmt: skip
        session.commit()


def _walk(session_factory, limit: int, **filters: str | None) -> list[Invoice]:
    found: list[Invoice] = []
    cursor = None
    for _ in range(1_000):
        with session_factory() as session:
            page = invoices_page(session, limit=limit, cursor=cursor, **filters)
        assert len(page.items) <= limit
        found += page.items
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor
    raise AssertionError("the walk never ended")


def test_the_fixture_has_every_kind_of_invoice(session_factory, billed) -> None:
    with session_factory() as session:
        listed = invoice_store.list_invoices(session)
    by_user = {(i.tenant_id, i.user_id, i.period): i for i in listed}
    for tenant in TENANTS:
        for period, status in ((OCT, "finalized"), (NOV, "draft")):
            late_only = by_user[(tenant, "late-only", period)]
            assert late_only.status == status and late_only.total_nanos
            assert late_only.lines and all(line.is_late for line in late_only.lines)
        zero = by_user[(tenant, "late-zero", OCT)]
        assert (zero.calls, zero.total_nanos, [line.is_late for line in zero.lines]) == (1, 0, [True])
        assert all(line.is_late for line in by_user[(tenant, "repriced", NOV)].lines)
        corrected = by_user[(tenant, "corrected", NOV)]
        assert [line.correction_of for line in corrected.lines] == [OCT] and corrected.calls == 0
        finalized = {key for key, invoice in by_user.items() if invoice.is_finalized}
        assert {(tenant, "corrected", OCT), (tenant, USERS[0], SEP)} <= finalized
        assert not {(tenant, user, NOV) for user in ("held", "byollm")} & set(by_user)
    assert {i.period for i in listed} == {SEP, OCT, NOV}


@pytest.mark.parametrize("limit", [1, 4, 1000])
def test_walking_every_page_gives_the_whole_list(session_factory, billed, limit) -> None:
    for period in (None, SEP, OCT, NOV, "2026-12", "2026-08"):
        for tenant in (None, TENANTS[1], TENANTS[4], "nobody"):
            with session_factory() as session:
                whole = invoice_store.list_invoices(session, period=period, tenant_id=tenant)
            assert _walk(session_factory, limit, period=period, tenant_id=tenant) == whole, (period, tenant)
            if period in (SEP, OCT, NOV) and tenant != "nobody":
                assert whole


def test_a_page_examines_at_most_limit_users_and_resumes_after_the_last(session_factory, billed) -> None:
    """``held`` has usage in November but no invoice: a page of it alone is empty, with a cursor past it."""
    after_e = encode_invoice_cursor((NOV, "alpha", "e\u0301"))  # "e\u0301" < "held" < "late-only"
    with session_factory() as session:
        page = invoices_page(session, period=NOV, tenant_id="alpha", limit=1, cursor=after_e)
        assert page.items == [] and decode_invoice_cursor(page.next_cursor or "") == (NOV, "alpha", "held")
        page = invoices_page(session, period=NOV, tenant_id="alpha", limit=1, cursor=page.next_cursor)
    assert [(i.user_id, i.period) for i in page.items] == [("late-only", NOV)]


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "x",
        base64.urlsafe_b64encode(b"account|user:a:b").decode(),  # a balances cursor
        encode_invoice_cursor((OCT, "alpha", "u-1"))[:-4],  # cut short
        base64.urlsafe_b64encode(b'invoice|["2026-13","a","b"]').decode(),
        base64.urlsafe_b64encode(b'invoice|["2026-10","a"]').decode(),
        base64.urlsafe_b64encode(b'invoice|["2026-10","","b"]').decode(),
        base64.urlsafe_b64encode(b'invoice|["2026-10","a",7]').decode(),
        base64.urlsafe_b64encode(b'invoice|["2026-10","a\\u0000","b"]').decode(),
        base64.urlsafe_b64encode(b'invoice|["2026-10","a","\\ud800"]').decode(),
        base64.urlsafe_b64encode(b'invoice|{"period":"2026-10"}').decode(),
    ],
)
def test_a_bad_cursor_is_refused(session_factory, cursor) -> None:
    with session_factory() as session, pytest.raises(InvalidInputError, match="invalid cursor"):
        invoices_page(session, cursor=cursor)


def test_a_cursor_of_another_period_is_refused(session_factory) -> None:
    with session_factory() as session, pytest.raises(InvalidInputError, match="invalid cursor"):
        invoices_page(session, period=NOV, cursor=encode_invoice_cursor((OCT, "alpha", "u-1")))


def test_cursors_carry_any_id_back_unchanged() -> None:
    for user in USERS:
        for tenant in TENANTS:
            assert decode_invoice_cursor(encode_invoice_cursor((NOV, tenant, user))) == (NOV, tenant, user)
