"""A reprice or re-rate that waited for the events' locks prices them with the price book of the moment it got them.

The run under test starts, reaches its first page of events and waits there, because another transaction holds them
(PostgreSQL: their row locks; SQLite: the database write lock). That transaction changes the price overrides,
corrects the events with the new prices, and commits; then the run goes on. Before, the run had loaded the price
book when it started: it then billed what the committed change had withdrawn, or re-rated the events back to prices
that had been replaced before it even read them. Both databases; the interleaving is forced by the held lock and an
event set when the run reaches its first page (no timing).

And an override change against an ingest in flight (PostgreSQL): the change waits for the ingest, so a reprice run
once the change is committed finds the ingest's events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from metering.billing import reprice as reprice_module
from metering.billing import rerate as rerate_module
from metering.billing.checks import run_checks
from metering.billing.ingest import ingest
from metering.billing.overrides import add_override, end_override
from metering.billing.reprice import reprice_held
from metering.billing.rerate import apply_rerate, plan_rerate
from metering.db.models import UsageEventRow
from metering.db.row_lock import lock_sqlite_for_write
from metering.events import UsageEvent, event_from_record
from tests.fakes.events import record

NOW = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)
MARKUP = Decimal(20)
SINCE = datetime(2026, 1, 1, tzinfo=UTC)
START, END = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
OLD_CHARGE = 360_000_000  # 1M in x $0.10 + 0.5M out x $0.40, x 1.2
NEW_CHARGE = 720_000_000  # at $0.20 / $0.80


def ollama(i: int, model: str = "llama3.1") -> UsageEvent:
    return event_from_record(
        record(i, provider="ollama", model=model, input_tokens=1_000_000, output_tokens=500_000, cache_read_tokens=0,
               occurred_at=NOW - timedelta(minutes=5))
    )  # fmt: skip


def override(session: Session, id: str, pattern: str, input_mtok: str, output_mtok: str) -> None:
    add_override(session, provider="ollama", model_pattern=pattern, effective_from=SINCE, effective_to=None,
                 input_mtok=Decimal(input_mtok), output_mtok=Decimal(output_mtok), id=id, now=NOW)  # fmt: skip


def wait_for_an_advisory_waiter(session_factory: sessionmaker[Session], alive: Callable[[], bool]) -> None:
    """Until a transaction waits for an advisory lock (the price book's: a lock not granted), or ``alive()`` is false.
    Polling a state, not waiting for a race: the outcome does not depend on it."""
    with session_factory() as probe:
        while alive():
            waiting = probe.scalar(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))
            probe.rollback()
            if waiting:
                return
            time.sleep(0.01)


def hold_the_events(session: Session) -> None:
    """Lock every event as a concurrent correction does: their rows (PostgreSQL), the database (SQLite)."""
    if session.get_bind().dialect.name == "sqlite":
        lock_sqlite_for_write(session)
    else:
        list(session.scalars(select(UsageEventRow).with_for_update()))


def run_while_held(
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    module: ModuleType,
    run: Callable[[Session], Any],
    meanwhile: Callable[[Session], None],
) -> None:
    """Start ``run`` (in its own session and thread, committed) while another session holds the events; once ``run``
    reaches its first page of events, ``meanwhile`` runs in the holding session, which then commits."""
    reached = threading.Event()
    pages = module.event_pages

    def signalling_pages(*args: Any, **kwargs: Any) -> Iterator[list[UsageEventRow]]:
        if threading.current_thread() is worker:
            reached.set()
        yield from pages(*args, **kwargs)

    errors: list[BaseException] = []

    def work() -> None:
        try:
            with session_factory() as session:
                run(session)
                session.commit()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            reached.set()

    monkeypatch.setattr(module, "event_pages", signalling_pages)
    worker = threading.Thread(target=work)
    with session_factory() as holder:
        hold_the_events(holder)
        worker.start()
        assert reached.wait(30), "the run never reached its events"
        meanwhile(holder)  # the run waits for the events meanwhile (or reads them after this commits)
        holder.commit()
    worker.join(60)
    assert not worker.is_alive() and errors == []


def change_while_pricing(
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    pricing: Callable[[], None],
    change: Callable[[], None],
    after_change: Callable[[], None],
) -> None:
    """Run ``pricing`` (an ingest, a reprice) in a thread, paused right after it read the price book; meanwhile run
    ``change`` (of the overrides) in another thread, until it commits or waits for the pricing (an advisory lock not
    granted), and let the pricing go on if it waits; once ``change`` has committed run ``after_change`` (the admin's
    correction), then let the pricing finish. An error in either thread fails the test."""
    from metering.billing import store

    loaded, go, changed = threading.Event(), threading.Event(), threading.Event()
    load = store.load_price_book
    errors: list[BaseException] = []

    def pausing_load(session: Session, markup_pct: Decimal) -> Any:
        book = load(session, markup_pct)
        if threading.current_thread() is pricing_thread:
            loaded.set()
            assert go.wait(30)
        return book

    def guarded(work: Callable[[], None], done: threading.Event | None = None) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
                if done is not None:
                    done.set()
            except BaseException as exc:  # surfaced below
                errors.append(exc)
                loaded.set()

        return run

    monkeypatch.setattr(store, "load_price_book", pausing_load)
    pricing_thread = threading.Thread(target=guarded(pricing))
    changing = threading.Thread(target=guarded(change, changed))
    pricing_thread.start()
    assert loaded.wait(30) and errors == []
    changing.start()
    # until the change commits, or waits for the pricing
    wait_for_an_advisory_waiter(session_factory, lambda: not changed.is_set() and changing.is_alive())
    if not changed.is_set():
        go.set()  # the pricing commits, then the change
    changing.join(30)
    assert changed.is_set() and errors == []
    after_change()
    go.set()
    pricing_thread.join(30)
    assert not pricing_thread.is_alive() and errors == []


def events_by_model(session_factory: sessionmaker[Session]) -> dict[str, set[tuple[str, int]]]:
    with session_factory() as session:
        found: dict[str, set[tuple[str, int]]] = {}
        for row in session.scalars(select(UsageEventRow)):
            found.setdefault(row.model, set()).add((row.billing_status, row.charge_nanos))
        assert run_checks(session).problems == []
    return found


def test_a_rerate_that_waited_does_not_undo_prices_set_before_it_read_the_events(session_factory, monkeypatch):
    """Run A waits for the events while the price of llama3.1 goes from $0.10/$0.40 to $0.20/$0.80 and run B re-rates
    them to it. A had loaded the old prices when it started: it re-rated every event back to them, so the ledger billed
    prices replaced before A read a single event (and a dry run afterwards found them all to change again)."""
    with session_factory() as session:
        override(session, "old", "llama3*", "0.10", "0.40")
        ingest(session, [ollama(i) for i in range(3)], markup_pct=MARKUP, now=NOW)
        session.commit()

    def window(run_id: str) -> Callable[[Session], Any]:
        return lambda session: apply_rerate(session, start=START, end=END, markup_pct=MARKUP, run_id=run_id,
                                            now=NOW + timedelta(hours=1))  # fmt: skip

    def new_price_and_run_b(session: Session) -> None:
        override(session, "new", "llama3.1", "0.20", "0.80")  # exact: it wins over the glob
        assert window("run-b")(session).diff.total.events == 3

    run_while_held(session_factory, monkeypatch, rerate_module, window("run-a"), new_price_and_run_b)
    assert events_by_model(session_factory) == {"llama3.1": {("billed", NEW_CHARGE)}}
    with session_factory() as session:
        assert plan_rerate(session, start=START, end=END, markup_pct=MARKUP).diff.total.events == 0


def test_a_reprice_that_waited_does_not_bill_with_an_override_ended_before_it_read_the_events(
    session_factory, monkeypatch
):
    """Held llama3.1 and llama2 events, an override for llama*. Reprice A waits for them while the override is ended
    (from its start: it never applied) and llama3.1 gets its own price, then reprice B bills the llama3.1 events and
    leaves llama2 held. A had loaded the ended override when it started: it billed llama2 with it."""
    with session_factory() as session:
        ingest(session, [ollama(0), ollama(1, "llama2"), ollama(2, "llama2")], markup_pct=MARKUP, now=NOW)
        override(session, "llamas", "llama*", "0.10", "0.40")
        session.commit()

    def reprice(session: Session) -> Any:
        return reprice_held(session, markup_pct=MARKUP, now=NOW + timedelta(hours=1))

    def withdraw_and_reprice_b(session: Session) -> None:
        end_override(session, "llamas", SINCE + timedelta(microseconds=1))
        override(session, "llama3", "llama3.1", "0.20", "0.80")
        assert reprice(session).priced == 1

    run_while_held(session_factory, monkeypatch, reprice_module, reprice, withdraw_and_reprice_b)
    assert events_by_model(session_factory) == {"llama3.1": {("billed", NEW_CHARGE)}, "llama2": {("unpriced", 0)}}


def test_a_reprice_after_an_override_change_finds_the_events_ingested_without_it(session_factory, monkeypatch, backend):
    """An ingest has read the price book (no price for llama3.1: its event will be held) and not committed when an
    override for llama3.1 is added. The admin then runs a reprice: it must find that event. The override's commit
    did not wait for the ingest, so the reprice ran before the ingest committed, saw nothing held, and the event
    stayed held although its price existed before the reprice ran. PostgreSQL only: on SQLite an ingest takes the
    database write lock before it reads the prices, and an override change needs that lock too."""
    if backend != "postgresql":
        return

    def ingest_held() -> None:
        with session_factory() as session:
            ingest(session, [ollama(0)], markup_pct=MARKUP, now=NOW)
            session.commit()

    def add_price() -> None:
        with session_factory() as session:
            override(session, "llama3", "llama3*", "0.10", "0.40")
            session.commit()

    def the_admins_reprice() -> None:  # once the override is added
        with session_factory() as session:
            reprice_held(session, markup_pct=MARKUP, now=NOW + timedelta(hours=1))
            session.commit()

    change_while_pricing(session_factory, monkeypatch, ingest_held, add_price, the_admins_reprice)
    assert events_by_model(session_factory) == {"llama3.1": {("billed", OLD_CHARGE)}}


def test_an_ingest_that_waited_for_an_override_change_posts_after_it(session_factory, backend):
    """The batch's posting time (its transfers' created_at) is taken once it holds its locks, the price book's too:
    a batch that waited for an override change posts after that change committed."""
    if backend != "postgresql":
        return  # SQLite: the batch takes the database write lock before anything, and its posting time after it
    from metering.db.models import TransferRow

    errors: list[BaseException] = []

    def ingest_priced() -> None:
        try:
            with session_factory() as session:
                ingest(session, [ollama(0)], markup_pct=MARKUP)
                session.commit()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with session_factory() as changing:
        override(changing, "llama3", "llama3*", "0.10", "0.40")  # the price book's lock held until the commit
        ingesting = threading.Thread(target=ingest_priced)
        ingesting.start()
        wait_for_an_advisory_waiter(session_factory, ingesting.is_alive)  # until the ingest waits for it
        assert ingesting.is_alive() and errors == []
        committed = datetime.now(UTC)
        changing.commit()
    ingesting.join(30)
    assert not ingesting.is_alive() and errors == []
    with session_factory() as session:
        assert [t.created_at >= committed for t in session.scalars(select(TransferRow))] == [True, True]


def test_a_rerate_after_an_override_change_finds_the_events_a_reprice_in_flight_billed_without_it(
    session_factory, monkeypatch, backend
):
    """A reprice has read the price book (an override for llama3*) and billed held events with it, not committed, when
    that override is withdrawn and llama3.1 gets its own price. The admin then re-rates: it must find those events.
    The change did not wait for the reprice (only ingests took the price book's lock), so the re-rate ran while they
    were still held, found nothing billed, and the reprice then committed them at the withdrawn price. PostgreSQL only
    (on SQLite the reprice holds the database write lock, which the change needs too)."""
    if backend != "postgresql":
        return

    with session_factory() as session:
        ingest(session, [ollama(i) for i in range(2)], markup_pct=MARKUP, now=NOW)  # held: no price yet
        override(session, "llamas", "llama3*", "0.10", "0.40")
        session.commit()

    def reprice() -> None:
        with session_factory() as session:
            assert reprice_held(session, markup_pct=MARKUP, now=NOW + timedelta(hours=1)).priced == 2
            session.commit()

    def change_prices() -> None:
        with session_factory() as session:
            # it priced the reprice's events (committed once this end holds the price book): re-rated below
            end_override(session, "llamas", SINCE + timedelta(microseconds=1), keep_priced_events=True)
            override(session, "llama3", "llama3.1", "0.20", "0.80")
            session.commit()

    def the_admins_rerate() -> None:  # once the change is committed
        with session_factory() as session:
            apply_rerate(session, start=START, end=END, markup_pct=MARKUP, run_id="after-change",
                         now=NOW + timedelta(hours=2))  # fmt: skip
            session.commit()

    change_while_pricing(session_factory, monkeypatch, reprice, change_prices, the_admins_rerate)
    assert events_by_model(session_factory) == {"llama3.1": {("billed", NEW_CHARGE)}}


def test_a_withdrawal_and_an_end_of_the_same_override_at_once_do_not_deadlock(session_factory, backend):
    """An end takes the price book's lock, then the override's row (its UPDATE); a withdrawal took the row first (a
    read FOR UPDATE of its start) and then the price book's: at once, each waited for the other, and PostgreSQL
    failed one with a deadlock. The withdrawal reads the start without a lock (it never changes), so it waits for the
    end, then withdraws the override. (SQLite: both take the database write lock first.)"""
    if backend != "postgresql":
        return
    from metering.billing import store
    from metering.billing.overrides import withdraw
    from metering.db.models import PriceOverrideRow

    with session_factory() as session:
        override(session, "llama3", "llama3*", "0.10", "0.40")
        session.commit()
    errors: list[BaseException] = []

    def withdrawing() -> None:
        try:
            with session_factory() as session:
                withdraw(session, "llama3")
                session.commit()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with session_factory() as ending:
        store.lock_price_book(ending, change=True)  # the end has the price book's lock...
        worker = threading.Thread(target=withdrawing)
        worker.start()
        wait_for_an_advisory_waiter(session_factory, worker.is_alive)  # until the withdrawal waits for it
        end_override(ending, "llama3", NOW)  # ...and now updates the row
        ending.commit()
    worker.join(30)
    assert not worker.is_alive() and errors == []
    with session_factory() as session:
        row = session.get(PriceOverrideRow, "llama3")
        assert row is not None and row.effective_to == row.effective_from == SINCE  # ended, then withdrawn
