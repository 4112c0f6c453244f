"""/metrics' label folding, done by the database (``folded_usage_totals``) on SQLite and PostgreSQL: values beyond
the top N of their label and label sets beyond the cap become ``other``, every total stays exact, and a scrape
reads a bounded number of rows however many distinct names were ingested (they were all read and folded in
Python: a client sending a million model names made every scrape hold a million rows)."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Sequence
from datetime import date, timedelta

from sqlalchemy import Engine, delete, insert
from sqlalchemy.orm import Session, sessionmaker

from metering.db.metric_labels import admit_label_values
from metering.db.models import MetricsLabelSetRow, MetricsLabelValueRow, PlatformUsageDailyRow
from metering.db.usage_totals import OTHER, TOTAL_COLUMNS, LabelTotals, folded_usage_totals, usage_totals
from metering.metrics import AppMetrics

CALLS = TOTAL_COLUMNS.index("calls")
LabelSet = tuple[str, str, str, str, bool, str]
DAY = date(2026, 1, 1)


def _insert(engine: Engine, rows: Sequence[dict[str, object]]) -> None:
    """Daily platform rollup rows, as ingest leaves them (a row per day and label set)."""
    counters = {"cost_nanos": 0, "latency_us_sum": 0, "error_count": 0, "unpriced_count": 0}
    with engine.begin() as conn:
        conn.execute(insert(PlatformUsageDailyRow), [{**counters, **row} for row in rows])


def _row(
    model: str,
    calls: int,
    *,
    extension: str = "rewrite",
    byollm: bool = False,
    provider: str = "anthropic",
    purpose: str = "content_rewrite",
    status: str = "ok",
    day: date = DAY,
    function: str = "f",
) -> dict[str, object]:
    values = dict.fromkeys(TOTAL_COLUMNS, 0) | {"calls": calls, "input_tokens": 3 * calls, "billed_nanos": 7 * calls}
    return {
        "day": day,
        "extension_id": extension,
        "function": function,
        "purpose": purpose,
        "provider": provider,
        "model": model,
        "is_byollm": byollm,
        "status": status,
        **values,
    }


def _folded(session_factory: sessionmaker[Session], **caps: int) -> dict[LabelSet, tuple[int, ...]]:
    limits = {"top_models": 20, "top_labels": 50, "max_label_sets": 500} | caps
    with session_factory() as session:  # what a scrape does: admit the values and sets not decided yet, then read
        assert admit_label_values(session, **limits)
        session.commit()
        totals = folded_usage_totals(session, **limits)
    assert not totals.undecided
    rows = totals.rows
    folded = {(r.provider, r.model, r.purpose, r.extension, r.is_byollm, r.status): r.counters for r in rows}
    assert len(folded) == len(rows)  # one row per label set
    return folded


def _forget_admissions(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(delete(MetricsLabelSetRow))
        conn.execute(delete(MetricsLabelValueRow))


def _reference(
    rows: Sequence[LabelTotals], top_models: int, top_labels: int, cap: int
) -> dict[LabelSet, tuple[int, ...]]:
    """The folding as it was done in Python over every row (the specification of the first scrape's admission)."""

    def top(value: int, n: int) -> set[str]:
        calls: dict[str, int] = {}
        for row in rows:
            key = (row.provider, row.model, row.purpose, row.extension)[value]
            calls[key] = calls.get(key, 0) + row.counters[CALLS]
        return set(sorted(calls, key=lambda k: (-calls[k], k))[:n])

    kept = [top(0, top_labels), top(1, top_models), top(2, top_labels), top(3, top_labels)]
    folded: dict[LabelSet, list[int]] = {}

    def add(key: LabelSet, counters: Sequence[int]) -> None:
        sums = folded.setdefault(key, [0] * len(TOTAL_COLUMNS))
        for i, count in enumerate(counters):
            sums[i] += count

    for row in rows:
        names = [
            v if v in kept[i] else OTHER for i, v in enumerate((row.provider, row.model, row.purpose, row.extension))
        ]
        add((names[0], names[1], names[2], names[3], row.is_byollm, row.status), row.counters)
    if len(folded) > cap:
        ranked = sorted(folded.items(), key=lambda kv: (-kv[1][CALLS], kv[0]))
        folded = {}
        for rank, (key, sums) in enumerate(ranked):
            add(key if rank < cap else (OTHER, OTHER, OTHER, OTHER, key[4], key[5]), sums)
    return {key: tuple(sums) for key, sums in folded.items()}


def test_models_beyond_the_top_n_fold_into_other_with_ties_broken_by_code_point(engine, session_factory):
    # "B" < "a" by code point (a locale collation says otherwise); ties are broken the same way on both databases
    _insert(engine, [_row("b", 3), _row("B", 3), _row("c", 1), _row("d", 2, extension="chatty", byollm=True)])
    assert _folded(session_factory, top_models=2, top_labels=1) == {
        ("anthropic", "B", "content_rewrite", "rewrite", False, "ok"): (3, 9, 0, 0, 0, 0, 0, 0, 21, 0),
        ("anthropic", "b", "content_rewrite", "rewrite", False, "ok"): (3, 9, 0, 0, 0, 0, 0, 0, 21, 0),
        ("anthropic", OTHER, "content_rewrite", "rewrite", False, "ok"): (1, 3, 0, 0, 0, 0, 0, 0, 7, 0),
        ("anthropic", OTHER, "content_rewrite", OTHER, True, "ok"): (2, 6, 0, 0, 0, 0, 0, 0, 14, 0),
    }


def test_rows_that_become_one_label_set_are_summed_over_days_and_functions(engine, session_factory):
    later = DAY + timedelta(days=1)
    _insert(engine, [_row("x", 2), _row("x", 2, day=later), _row("y", 1, function="g"), _row("z", 1, day=later)])
    folded = _folded(session_factory, top_models=1)
    assert folded == {
        ("anthropic", "x", "content_rewrite", "rewrite", False, "ok"): (4, 12, 0, 0, 0, 0, 0, 0, 28, 0),
        ("anthropic", OTHER, "content_rewrite", "rewrite", False, "ok"): (2, 6, 0, 0, 0, 0, 0, 0, 14, 0),
    }


def test_label_sets_beyond_the_cap_are_summed_into_other_per_byollm_and_status(engine, session_factory):
    _insert(engine, [_row(f"m{i}", 10 - i, extension=f"e{i % 3}", byollm=i % 2 == 1) for i in range(8)])
    uncapped = _folded(session_factory)
    assert len(uncapped) == 8 and _folded(session_factory, max_label_sets=8) == uncapped
    capped = _folded(session_factory, max_label_sets=3)
    assert sorted(key[1] for key in capped if key[1] != OTHER) == ["m0", "m1", "m2"]  # the most calls
    assert set(capped) - {key for key in capped if key[1] != OTHER} == {
        (OTHER, OTHER, OTHER, OTHER, False, "ok"),
        (OTHER, OTHER, OTHER, OTHER, True, "ok"),
    }
    for column in range(len(TOTAL_COLUMNS)):  # every total exact
        assert sum(v[column] for v in capped.values()) == sum(v[column] for v in uncapped.values())
    assert capped[(OTHER, OTHER, OTHER, OTHER, False, "ok")][CALLS] == 6 + 4  # m4 and m6


def test_the_database_folds_as_the_python_reference_does(engine, session_factory):
    """Random label sets (names that tie, a real model named "other", mixed-case providers, non-ASCII), every cap."""
    rng = random.Random(4)
    names = ["a", "B", "b", "other", "é", "Z", "zz", "m-1", "m-10", "m-2"]
    rows = [
        _row(
            rng.choice(names),
            rng.choice((1, 1, 2, 3, 5)),
            extension=rng.choice(names[:6]),
            purpose=rng.choice(names[3:]),
            provider=rng.choice(("anthropic", "openai", "OpenAI", "x")),
            byollm=rng.random() < 0.3,
            status=rng.choice(("ok", "ok", "error")),
            day=DAY + timedelta(days=rng.randrange(3)),
            function=f"f{i}",  # every row its own key
        )
        for i in range(400)
    ]
    _insert(engine, rows)
    with session_factory() as session:
        raw = usage_totals(session)
    for top_models, top_labels, cap in [(20, 50, 500), (3, 2, 500), (1, 1, 1), (4, 3, 7), (10, 10, 25), (2, 5, 3)]:
        _forget_admissions(engine)  # each caps' folding as the first scrape of these rows admits it
        expected = _reference(raw, top_models, top_labels, cap)
        assert _folded(session_factory, top_models=top_models, top_labels=top_labels, max_label_sets=cap) == expected


def test_a_scrape_holds_a_bounded_number_of_rows_however_many_models_were_ingested(engine, session_factory):
    distinct = 20_000
    model = "m" * 190
    _insert(engine, [_row(f"{model}{i:07d}", 1 + i % 3) for i in range(distinct)])
    metrics = AppMetrics(lambda: session_factory, top_models=20, top_labels=50, max_label_sets=500)
    metrics.render()  # SQLAlchemy's statement cache and the driver's first use are not what is measured
    tracemalloc.start()
    try:
        body, _content_type = metrics.render()
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert body.count(b"metering_llm_calls_total{") == 21  # the top 20 models and "other"
    assert f'model="{OTHER}"'.encode() in body
    # The models' names alone are 20,000 x ~250 bytes = 5 MB: reading every row held them all at once.
    assert peak < 2_000_000, peak
