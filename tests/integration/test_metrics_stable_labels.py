"""/metrics' usage counters never step down when the ranking behind the folding changes (SQLite and PostgreSQL).

The values and label sets that get their own series are admitted once, at a scrape, and kept in the database: a
model that overtakes one of the top N later does not take its all-time sum out of ``other`` (a step down that
Prometheus reads as a counter reset: ``increase()`` showed the lifetime total as a spike). One admitted stays
admitted; one first seen when its label (or the cap on label sets) was full stays ``other``."""

from __future__ import annotations

import logging
import random
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, event, func, select
from sqlalchemy.orm import Session, sessionmaker

from metering.db.engine import make_engine, make_session_factory
from metering.db.models import MetricsLabelSetRow, MetricsLabelValueRow, PlatformUsageDailyRow
from metering.db.usage_totals import OTHER, TOTAL_COLUMNS
from metering.metrics import AppMetrics
from tests.integration.test_metrics_folding import _insert, _row

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]
USAGE = ("metering_llm_", "metering_billed_usd", "metering_shadow_usd")


def _scrape(factory: sessionmaker[Session], **caps: int) -> Series:
    limits = {"top_models": 20, "top_labels": 50, "max_label_sets": 500} | caps
    body, _content_type = AppMetrics(lambda: factory, **limits).render()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name.startswith(USAGE) and sample.name.endswith("_total")
    }


def _assert_never_down(before: Series, after: Series) -> None:
    down = {key: (before[key], after[key]) for key in before if key in after and after[key] < before[key]}
    assert not down, down


def _calls_by(series: Series, *label: str) -> dict[str, float]:
    """Calls summed per value of ``label`` (several: their values joined by /)."""
    out: dict[str, float] = {}
    for (name, labels), value in series.items():
        if name == "metering_llm_calls_total":
            key = "/".join(dict(labels)[one] for one in label)
            out[key] = out.get(key, 0) + value
    return out


def _assert_totals_exact(engine: Engine, series: Series) -> None:
    """Summed over every series, each counter is the rollups' total."""
    with engine.connect() as conn:
        sums = conn.execute(select(*(func.sum(getattr(PlatformUsageDailyRow, c)) for c in TOTAL_COLUMNS))).one()
    totals = dict(zip(TOTAL_COLUMNS, (int(v or 0) for v in sums), strict=True))

    def summed(name: str, kind: str | None = None) -> float:
        return sum(v for (n, labels), v in series.items() if n == name and (kind is None or ("kind", kind) in labels))

    assert summed("metering_llm_calls_total") == totals["calls"]
    assert summed("metering_llm_tokens_total", "input") == totals["input_tokens"]
    assert summed("metering_llm_web_searches_total") == totals["web_searches"]
    assert summed("metering_billed_usd_total") == pytest.approx(totals["billed_nanos"] / 1e9, abs=1e-9)


def test_a_model_that_overtakes_one_of_the_top_n_steps_no_series_down(engine, session_factory):
    # c is the only model of extension e2 with d: (other, e2) holds both, until c overtakes b
    _insert(engine, [_row("a", 10), _row("b", 5), _row("c", 4, extension="e2"), _row("d", 1, extension="e2")])
    first = _scrape(session_factory, top_models=2)
    assert set(_calls_by(first, "model")) == {"a", "b", OTHER}
    _insert(engine, [_row("c", 2, extension="e2", function="g")])  # c: 6 calls, more than b now
    second = _scrape(session_factory, top_models=2)
    _assert_never_down(first, second)
    assert _calls_by(second, "model") == {"a": 10, "b": 5, OTHER: 7}  # c stays where it was first reported
    _assert_totals_exact(engine, second)


def test_a_model_first_seen_when_the_top_n_is_full_stays_other_even_when_it_becomes_the_biggest(
    engine, session_factory
):
    _insert(engine, [_row("a", 3), _row("b", 2)])
    first = _scrape(session_factory, top_models=2)
    _insert(engine, [_row("z", 1)])
    second = _scrape(session_factory, top_models=2)
    _insert(engine, [_row("z", 1000, function="g"), _row("y", 5)])
    third = _scrape(session_factory, top_models=2)
    fourth = _scrape(session_factory, top_models=2)
    assert _calls_by(second, "model") == {"a": 3, "b": 2, OTHER: 1}
    assert _calls_by(third, "model") == _calls_by(fourth, "model") == {"a": 3, "b": 2, OTHER: 1006}
    for before, after in ((first, second), (second, third), (third, fourth)):
        _assert_never_down(before, after)
    _assert_totals_exact(engine, fourth)
    with session_factory() as session:
        assert sorted(
            session.scalars(select(MetricsLabelValueRow.value).where(MetricsLabelValueRow.label == "model"))
        ) == ["a", "b"]


def test_a_label_set_first_seen_when_the_cap_is_full_stays_in_other_even_when_it_becomes_the_biggest(
    engine, session_factory
):
    _insert(engine, [_row("a", 3), _row("b", 2, extension="e2")])
    first = _scrape(session_factory, max_label_sets=2)
    _insert(engine, [_row("a", 50, extension="e3"), _row("c", 1, byollm=True)])
    second = _scrape(session_factory, max_label_sets=2)
    _insert(engine, [_row("b", 100, extension="e2", function="g")])  # an admitted set goes on growing
    third = _scrape(session_factory, max_label_sets=2)
    assert _calls_by(third, "model", "extension", "byollm") == {
        "a/rewrite/false": 3,
        "b/e2/false": 102,
        "other/other/false": 50,
        "other/other/true": 1,
    }
    for before, after in ((first, second), (second, third)):
        _assert_never_down(before, after)
    _assert_totals_exact(engine, third)
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(MetricsLabelSetRow)) == 2


def test_no_series_steps_down_over_random_growth_and_totals_stay_exact(engine, session_factory):
    """Random rounds of new rollup rows (new and old models, extensions, purposes, providers in any case), a scrape
    after each: no series of any usage counter ever decreases, and the series always sum to the rollups."""
    rng = random.Random(7)
    names = [f"m{i}" for i in range(12)]
    previous: Series = {}
    for round_ in range(12):
        rows = [
            _row(
                rng.choice(names[: 3 + round_]),
                rng.choice((1, 1, 2, 5, 20)),
                extension=rng.choice(("e1", "e2", "e3", "e4", "e5")),
                purpose=rng.choice(("p1", "p2", "p3")),
                provider=rng.choice(("anthropic", "openai", "OpenAI", "x")),
                byollm=rng.random() < 0.3,
                status=rng.choice(("ok", "ok", "error")),
                function=f"f{round_}-{i}",
            )
            for i in range(rng.randrange(1, 12))
        ]
        _insert(engine, rows)
        series = _scrape(session_factory, top_models=4, top_labels=3, max_label_sets=9)
        _assert_never_down(previous, series)
        _assert_totals_exact(engine, series)
        assert len(_calls_by(series, "model")) <= 5
        previous = series


def test_scrapes_at_once_admit_no_more_than_the_caps(engine, migrated_url, caplog):
    """Scrapes of several replicas at once (threads, each with its own engine: its own connections) admit at most
    N values per label and the cap of sets, and none fails or falls back."""
    _insert(engine, [_row(f"m{i:02d}", 1 + i % 7, extension=f"e{i % 9}", function=f"f{i}") for i in range(60)])
    engines = [make_engine(migrated_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    results: list[Series] = []
    errors: list[BaseException] = []

    def scrape(own: Engine) -> None:
        try:
            barrier.wait()
            results.append(_scrape(make_session_factory(own), top_models=5, top_labels=4, max_label_sets=8))
        except BaseException as exc:
            errors.append(exc)

    caplog.set_level(logging.WARNING, logger="metering.metrics")
    try:
        threads = [threading.Thread(target=scrape, args=(own,)) for own in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for own in engines:
            own.dispose()
    assert not errors and len(results) == len(engines)
    assert not [r for r in caplog.records if r.name == "metering.metrics"], caplog.text
    with engine.connect() as conn:
        counts = dict(
            conn.execute(select(MetricsLabelValueRow.label, func.count()).group_by(MetricsLabelValueRow.label)).all()
        )
        sets = conn.scalar(select(func.count()).select_from(MetricsLabelSetRow))
    assert counts == {"provider": 1, "purpose": 1, "model": 5, "extension": 4} and sets == 8
    final = _scrape(make_session_factory(engine), top_models=5, top_labels=4, max_label_sets=8)
    for series in results:
        _assert_never_down(series, final)


def _read_only_engine(url: str) -> Engine:
    """An engine whose connections refuse writes, as a read-only database or a replica does."""
    if url.startswith("sqlite"):
        engine = make_engine(url)

        @event.listens_for(engine, "connect")
        def query_only(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            dbapi_connection.execute("PRAGMA query_only = ON")

        return engine
    return make_engine(f"{url}?options=-c%20default_transaction_read_only%3Don")


def test_a_scrape_of_a_read_only_database_answers_without_the_values_not_admitted(
    engine, migrated_url, session_factory, caplog
):
    _insert(engine, [_row("a", 3), _row("b", 2)])
    _scrape(session_factory, top_models=5)  # a and b admitted
    _insert(engine, [_row("c", 9, extension="e2")])
    read_only = _read_only_engine(migrated_url)
    caplog.set_level(logging.WARNING, logger="metering.metrics")
    try:
        series = _scrape(make_session_factory(read_only), top_models=5)
    finally:
        read_only.dispose()
    assert _calls_by(series, "model") == {"a": 3, "b": 2}  # c: left out until a scrape can admit it
    assert "left out until a scrape can" in caplog.text
    with session_factory() as session:  # nothing was written
        models = select(func.count()).select_from(MetricsLabelValueRow).where(MetricsLabelValueRow.label == "model")
        assert session.scalar(models) == 2


def test_values_scraped_while_the_database_refuses_writes_step_no_series_down(engine, migrated_url, session_factory):
    """Values stored since the last admission, scraped while no admission can be written (a read-only database, a
    standby): counted as ``other`` then, they left it once admitted, and the next read-only period counted only the
    values new since: ``other`` came back lower (Prometheus read a counter reset in any window holding both)."""
    _insert(engine, [_row("a", 3), _row("b", 2)])
    _scrape(session_factory, top_models=5)  # a and b admitted
    read_only = _read_only_engine(migrated_url)
    try:
        _insert(engine, [_row("c", 9, extension="e2")])
        first = _scrape(make_session_factory(read_only), top_models=5)
        _scrape(session_factory, top_models=5)  # writable again: c is admitted
        _insert(engine, [_row("d", 1, extension="e3")])
        second = _scrape(make_session_factory(read_only), top_models=5)
    finally:
        read_only.dispose()
    _assert_never_down(first, second)
    last = _scrape(session_factory, top_models=5)
    _assert_never_down(second, last)
    assert _calls_by(last, "model") == {"a": 3, "b": 2, "c": 9, "d": 1}
    _assert_totals_exact(engine, last)


def _is_lock(statement: str) -> bool:
    """The statement that takes the admission's lock: SQLite's write lock (a no-op write), PostgreSQL's advisory
    lock."""
    return "UPDATE invoices SET status" in statement or "advisory" in statement


def test_the_admission_reads_the_rollups_before_it_takes_the_write_lock(engine, session_factory):
    """Admission summed the rollups (every row of platform_usage_daily, seconds with many models over many days)
    under the write lock it then held to commit: ingest waited for it, past the busy timeout ("database is locked",
    a 503). Now the rollups are read before the lock; under it only the small admitted tables are read."""
    _insert(engine, [_row(f"m{i}", 1 + i, extension=f"e{i % 3}") for i in range(8)])
    statements: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def seen(_conn, _cursor, statement, _params, _context, _executemany):  # type: ignore[no-untyped-def]
        statements.append(statement)

    @event.listens_for(engine, "commit")
    def committed(_conn):  # type: ignore[no-untyped-def]
        statements.append("COMMIT")

    try:
        series = _scrape(session_factory, top_models=5, max_label_sets=4)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
        event.remove(engine, "commit", committed)
    locks = [i for i, statement in enumerate(statements) if _is_lock(statement)]
    assert len(locks) == 1
    under = statements[locks[0] + 1 : statements.index("COMMIT", locks[0])]  # the write transaction
    assert not [statement for statement in under if "platform_usage_daily" in statement], under
    inserts = [statement.split("(")[0].strip() for statement in under if statement.startswith("INSERT")]
    assert inserts == ["INSERT INTO metrics_label_values", "INSERT INTO metrics_label_sets"]
    summed = [statement for statement in statements[: locks[0]] if "platform_usage_daily" in statement]
    assert len(summed) >= 2  # the scrape's read, then the admission's sums: both before the lock
    assert _calls_by(series, "model") == {"m7": 8, "m6": 7, "m5": 6, "m4": 5, OTHER: 10}  # m3: its set beyond the cap
    _assert_totals_exact(engine, series)


def test_an_admission_made_between_the_read_and_the_lock_is_taken_into_account(engine, session_factory):
    """The plan is made before the lock: another scrape may admit (and commit) in between. The admitted tables are
    read again under the lock and the plan made again from the same sums, so positions never clash and nothing
    admitted meanwhile is admitted twice; what was stored after this scrape's read waits for the next one."""
    _insert(engine, [_row("a", 3), _row("b", 2)])
    other = make_engine(str(engine.url.render_as_string(hide_password=False)))
    injected: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def admit_first(_conn, _cursor, statement, _params, _context, _executemany):  # type: ignore[no-untyped-def]
        if _is_lock(statement) and not injected:
            injected.append(statement)
            _insert(other, [_row("c", 9, extension="e2")])
            _scrape(make_session_factory(other), top_models=5)  # admits a, b, c and their sets, commits

    try:
        first = _scrape(session_factory, top_models=5)
    finally:
        event.remove(engine, "before_cursor_execute", admit_first)
        other.dispose()
    assert injected
    assert _calls_by(first, "model") == {"a": 3, "b": 2, "c": 9}
    with session_factory() as session:
        values = session.execute(
            select(MetricsLabelValueRow.value, MetricsLabelValueRow.position)
            .where(MetricsLabelValueRow.label == "model")
            .order_by(MetricsLabelValueRow.position)
        ).all()
        sets = session.scalar(select(func.count()).select_from(MetricsLabelSetRow))
    assert [tuple(row) for row in values] == [("c", 1), ("a", 2), ("b", 3)] and sets == 3
    _assert_totals_exact(engine, _scrape(session_factory, top_models=5))
