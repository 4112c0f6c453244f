"""Property test of the read side on SQLite and PostgreSQL: after random sequences of ingest (late events, BYOLLM
calls, unknown models, failed and cancelled calls, usage estimated or missing, any latency, events at UTC day and
hour edges given in other offsets), finalization, price overrides, reprice and re-rate, ``usage`` answers exactly
what a recomputation from the raw events gives, for random groupings, filters (provider in any case) and windows
(cut anywhere on whole hours, given in any offset), whichever rollups it reads; and ``/metrics``' sums equal the
raw events, per label set."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from metering.billing.ingest import ingest
from metering.billing.reprice import reprice_held
from metering.billing.rerate import apply_rerate
from metering.billing.rollup import COUNTER_COLUMNS, latency_us
from metering.billing.usage_queries import GROUPS, UsageFilters, usage
from metering.db.models import UsageEventRow
from metering.db.usage_totals import TOTAL_COLUMNS, unpriced_events, usage_totals
from metering.events import UsageEvent, event_from_record
from tests.conftest import _clean
from tests.fakes.events import record
from tests.integration.lifecycle_steps import finalize_step, override_step

NOW = datetime(2026, 3, 10, tzinfo=UTC)
BASE = datetime(2026, 1, 30, tzinfo=UTC)  # events over four days around a month's end
MODELS = (("anthropic", "claude-sonnet-4-6"), ("ollama", "llama3.1"), ("Ollama", "Llama3.2"), ("openai", "gpt-4o-mini"))
USERS = (("tenant-1", "ann"), ("tenant-1", "bob"), ("tenant-2", "ann"))
EXTENSIONS = ("rewrite", "summarize")
FUNCTIONS = ("rewrite", "Rewrite", "shorten")
PURPOSES = ("content_rewrite", "summary")
OFFSETS = (-8, 0, 5.5, 9)


def _offset(hours: float) -> timezone:
    return timezone(timedelta(hours=hours))


@st.composite
def usage_event(draw: st.DrawFn, index: int) -> UsageEvent:
    provider, model = draw(st.sampled_from(MODELS))
    tenant, user = draw(st.sampled_from(USERS))
    # on an hour or day edge (or a minute either side of it)
    at = BASE + timedelta(hours=draw(st.integers(0, 4 * 24 - 1)), minutes=draw(st.sampled_from([0, 1, 59])))
    ended = draw(st.sampled_from(["ok", "ok", "ok", "ok", "error", "cancelled"]))
    counted = draw(st.sampled_from(["reported", "reported", "estimated", "missing"]))
    cache_write = 0 if counted == "missing" else draw(st.sampled_from([0, 0, 2_000]))
    cache_read = 0 if counted == "missing" else draw(st.sampled_from([0, 0, 500]))
    output = 0 if counted == "missing" else draw(st.integers(0, 40_000))
    return event_from_record(
        record(
            index,
            tenant_id=tenant,
            user_id=user,
            provider=provider,
            model=model,
            extension_id=draw(st.sampled_from(EXTENSIONS)),
            function=draw(st.sampled_from(FUNCTIONS)),
            purpose=draw(st.sampled_from(PURPOSES)),
            is_byollm=draw(st.integers(0, 3)) == 0,
            occurred_at=at.astimezone(_offset(draw(st.sampled_from(OFFSETS)))),
            input_tokens=0 if counted == "missing" else draw(st.integers(cache_read + cache_write, 400_000)),
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            cache_write_1h_tokens=draw(st.sampled_from([0, cache_write // 2, cache_write])),
            web_searches=draw(st.sampled_from([0, 0, 0, 1, 3])),
            output_tokens=output,
            reasoning_tokens=draw(st.sampled_from([0, output // 3])),
            usage_completeness=counted,
            # any float: the rollups' microseconds (Python on SQLite, SQL on PostgreSQL) equal rollup.latency_us
            latency_ms=draw(st.one_of(st.sampled_from([1.0, 12.345, 0.0005, 1.0015]), st.floats(0, 3_600_000))),
            **({"status": ended, "error_type": "server_error", "stop_reason": None} if ended != "ok" else {}),
        )
    )


@st.composite
def steps(draw: st.DrawFn) -> list[tuple]:
    found: list[tuple] = []
    index = 0
    for _ in range(draw(st.integers(2, 10))):
        kind = draw(st.sampled_from(["ingest", "ingest", "finalize", "override", "reprice", "rerate"]))
        if kind == "ingest":
            count = draw(st.integers(1, 8))
            found.append((kind, [draw(usage_event(index + i)) for i in range(count)]))
            index += count
        elif kind == "finalize":
            found.append((kind, draw(st.sampled_from(["2026-01", "2026-02"]))))
        elif kind == "override":
            found.append((kind, draw(st.sampled_from(["ollama", "anthropic"])),
                          draw(st.sampled_from(["0", "0.3", "2.5"])),
                          draw(st.sampled_from([None, Decimal(-100), Decimal(35)]))))  # fmt: skip
        elif kind == "reprice":
            found.append((kind,))
        else:
            start = BASE + timedelta(hours=draw(st.integers(-2, 90)))
            found.append((kind, start, start + timedelta(hours=draw(st.integers(1, 60))), draw(st.sampled_from("ab"))))
    return found


def _apply(session, step: tuple, number: int) -> None:
    kind, *args = step
    if kind == "ingest":
        ingest(session, args[0], markup_pct=Decimal(20), now=NOW)
    elif kind == "finalize":
        finalize_step(session, args[0], NOW)
    elif kind == "override":
        override_step(session, number, *args)
    elif kind == "reprice":
        reprice_held(session, markup_pct=Decimal(20), now=NOW)
    else:
        start, end, run = args
        apply_rerate(session, start=start, end=end, markup_pct=Decimal(20), run_id=f"{run}{number}", now=NOW)


_KEYS = {
    "tenant": lambda e: e.tenant_id,
    "user": lambda e: e.user_id,
    "extension": lambda e: e.extension_id,
    "function": lambda e: e.function,
    "purpose": lambda e: e.purpose,
    "provider": lambda e: e.provider,
    "model": lambda e: e.model,
    "byollm": lambda e: e.is_byollm,
    "status": lambda e: e.status,
    "hour": lambda e: e.occurred_at.astimezone(UTC).replace(minute=0, second=0, microsecond=0),
    "day": lambda e: e.occurred_at.astimezone(UTC).date(),
}


def _sums(events: list[UsageEventRow]) -> tuple[int, ...]:
    return (
        len(events),
        sum(e.input_tokens for e in events),
        sum(e.output_tokens for e in events),
        sum(e.cache_read_tokens for e in events),
        sum(e.cache_write_tokens for e in events),
        sum(e.reasoning_tokens for e in events),
        sum(e.charge_nanos for e in events),
        sum(e.shadow_nanos for e in events),
        sum(e.cost_nanos for e in events),
        sum(latency_us(e.latency_ms) for e in events),
        sum(e.status == "error" for e in events),
        sum(e.billing_status == "unpriced" for e in events),
        sum(e.cache_write_1h_tokens for e in events),
        sum(e.web_searches for e in events),
    )


def _expected(events: list[UsageEventRow], group_by: list[str]) -> list[tuple[tuple[Any, ...], tuple[int, ...]]]:
    groups: dict[tuple[Any, ...], list[UsageEventRow]] = defaultdict(list)
    for e in events:
        groups[tuple(_KEYS[g](e) for g in group_by)].append(e)
    return [(key, _sums(groups[key])) for key in sorted(groups)]


def _answered(session, start, end, group_by, filters) -> list[tuple[tuple[Any, ...], tuple[int, ...]]]:
    rows = []
    for group in usage(session, start, end, group_by, filters):
        key = []
        for name in group_by:
            value = group.key[GROUPS[name]]
            key.append(value.astimezone(UTC) if name == "hour" else value)
        t = group.totals
        rows.append((tuple(key), (t.calls, t.input_tokens, t.output_tokens, t.cache_read_tokens,
                                  t.cache_write_tokens, t.reasoning_tokens, t.billed_nanos, t.shadow_nanos,
                                  t.cost_nanos, t.latency_us_sum, t.errors, t.unpriced, t.cache_write_1h_tokens,
                                  t.web_searches)))  # fmt: skip
    return rows


_FILTER_VALUES = {
    "tenant_id": [t for t, _ in USERS],
    "user_id": [u for _, u in USERS],
    "extension_id": list(EXTENSIONS),
    "provider": ["ollama", "OLLAMA", "Anthropic", "openai"],
    "model": [m for _, m in MODELS],
    "byollm": [True, False],
    "status": ["ok", "error", "cancelled"],
    "function": ["rewrite", "Rewrite"],
    "purpose": ["summary"],
}
_MATCH = {
    "tenant_id": lambda e, v: e.tenant_id == v,
    "user_id": lambda e, v: e.user_id == v,
    "extension_id": lambda e, v: e.extension_id == v,
    "provider": lambda e, v: e.provider.lower() == v.lower(),
    "model": lambda e, v: e.model == v,
    "byollm": lambda e, v: e.is_byollm is v,
    "status": lambda e, v: e.status == v,
    "function": lambda e, v: e.function == v,
    "purpose": lambda e, v: e.purpose == v,
}


@st.composite
def queries(draw: st.DrawFn) -> list[tuple]:
    found = []
    for _ in range(draw(st.integers(1, 12))):
        group_by = draw(st.lists(st.sampled_from(list(GROUPS)), unique=True, max_size=3))
        names = draw(st.lists(st.sampled_from(list(_FILTER_VALUES)), unique=True, max_size=2))
        filters = {name: draw(st.sampled_from(_FILTER_VALUES[name])) for name in names}
        start = BASE + timedelta(hours=draw(st.integers(-3, 90)))
        end = start + timedelta(hours=draw(st.integers(1, 100)))
        offset = _offset(draw(st.sampled_from(OFFSETS)))
        found.append((group_by, filters, start.astimezone(offset), end.astimezone(offset)))
    return found


def _check_usage(session, query: tuple) -> None:
    group_by, filters, start, end = query
    events = [
        e
        for e in session.scalars(select(UsageEventRow))
        if start <= _KEYS["hour"](e) < end and all(_MATCH[n](e, v) for n, v in filters.items())
    ]
    answered = _answered(session, start, end, group_by, UsageFilters(**filters))
    assert answered == _expected(events, group_by), query


def _check_metrics(session) -> None:
    events = list(session.scalars(select(UsageEventRow)))
    groups: dict[tuple[Any, ...], list[UsageEventRow]] = defaultdict(list)
    for e in events:
        groups[(e.provider, e.model, e.purpose, e.extension_id, e.is_byollm, e.status)].append(e)
    # _sums is in COUNTER_COLUMNS order
    positions = [COUNTER_COLUMNS.index(column) for column in TOTAL_COLUMNS]
    expected = {key: tuple(_sums(group)[i] for i in positions) for key, group in groups.items()}
    answered = {
        (r.provider, r.model, r.purpose, r.extension, r.is_byollm, r.status): r.counters for r in usage_totals(session)
    }
    assert answered == expected
    assert unpriced_events(session) == sum(e.billing_status == "unpriced" for e in events)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=steps(), asked=queries())
def test_usage_equals_the_raw_events_after_any_lifecycle(engine, session_factory, sequence, asked) -> None:
    _clean(engine)
    for number, step in enumerate(sequence):
        with session_factory() as session:
            _apply(session, step, number)
            session.commit()
        with session_factory() as session:
            for query in asked:
                _check_usage(session, query)
            _check_metrics(session)
