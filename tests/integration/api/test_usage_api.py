"""GET /v1/usage: sums of the hourly rollups equal sums of the raw events, grouped any way, on both databases;
window and group validation; tenant-bound tokens; scopes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import combinations
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text

from metering.auth import Scope
from metering.billing.usage_queries import GROUPS
from metering.db.usage_totals import usage_totals
from tests.integration.api.conftest import assert_problem, bearer
from tests.integration.api.read_data import ALPHA, BETA, T0, comparable, expected_rows, seed, stored_events, total

START = T0.replace(hour=0)
END = START + timedelta(days=5)
WINDOW = {"from": START.isoformat(), "to": END.isoformat()}


@pytest.fixture
def events(session_factory):
    seed(session_factory)
    return stored_events(session_factory)


@pytest.fixture
def reader(make_token):
    return bearer(make_token(Scope.READ))


def _usage(client, headers, **params):
    response = client.get("/v1/usage", params={**WINDOW, **params}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _sorted(rows, fields):
    return sorted((comparable(r, fields) for r in rows), key=repr)


def _check(body, events, fields):
    assert _sorted(body["rows"], fields) == sorted(expected_rows(events, fields), key=repr)
    assert comparable(body["totals"], []) == total(events)


def test_totals_equal_the_sums_of_the_ingested_events(client, reader, events):
    assert {e.billing_status for e in events} == {"billed", "excluded_byollm", "unpriced"}
    body = _usage(client, reader)
    assert body["group_by"] == [] and len(body["rows"]) == 1
    expected = total(events)
    assert comparable(body["rows"][0], []) == expected
    assert comparable(body["totals"], []) == expected
    assert body["from"] == "2026-09-29T00:00:00Z" and body["to"] == "2026-10-04T00:00:00Z"
    # The usd strings are exact: 9 decimals, equal to the nanos.
    row = body["rows"][0]
    assert int(row["billed_usd"].replace(".", "")) == row["billed_nanos"] and len(row["billed_usd"].split(".")[1]) == 9
    assert int(row["shadow_usd"].replace(".", "")) == row["shadow_nanos"] > 0
    assert int(row["cost_usd"].replace(".", "")) == row["cost_nanos"] > 0


@pytest.mark.parametrize(
    "group_by",
    [["model"], ["byollm"], ["hour"], ["day"], ["model", "byollm"], ["day", "model"], ["tenant", "user", "status"]],
)
def test_grouped_sums_equal_the_events(client, reader, events, group_by):
    body = _usage(client, reader, group_by=",".join(group_by))
    assert body["group_by"] == group_by
    fields = [GROUPS[g] for g in group_by]
    _check(body, events, fields)
    for row in body["rows"]:  # dimensions not grouped by are null
        assert all(row[f] is None for f in GROUPS.values() if f not in fields)


def test_hours_and_days_are_utc_buckets_in_order(client, reader, events):
    days = _usage(client, reader, group_by="day")["rows"]
    assert [r["day"] for r in days] == ["2026-09-29", "2026-09-30", "2026-10-01", "2026-10-02"]
    hours = _usage(client, reader, group_by="hour")["rows"]
    stamps = [datetime.fromisoformat(r["hour"]) for r in hours]
    assert stamps == sorted(stamps) and all(s.tzinfo is not None and s.utcoffset() == timedelta(0) for s in stamps)
    assert stamps[0] == T0 and all(s.minute == 0 for s in stamps)
    assert sum(r["calls"] for r in hours) == len(events)


def test_every_dimension_at_once(client, reader, events):
    body = _usage(client, reader, group_by=list(GROUPS))
    _check(body, events, list(GROUPS.values()))


@pytest.mark.parametrize("pair", list(combinations(["tenant", "extension", "purpose", "provider", "hour"], 2)))
def test_pairs_of_dimensions(client, reader, events, pair):
    _check(_usage(client, reader, group_by=list(pair)), events, [GROUPS[g] for g in pair])


def test_repeated_and_comma_separated_group_by_are_the_same(client, reader, events):
    a = _usage(client, reader, group_by=["model", "day"])
    b = _usage(client, reader, group_by="model,day")
    c = _usage(client, reader, group_by=["model,day", "model"])
    assert a == b == c and a["group_by"] == ["model", "day"]


def test_the_window_is_half_open_on_whole_hours(client, reader, events):
    start, end = T0 + timedelta(hours=5), T0 + timedelta(hours=29)
    body = _usage(client, reader, **{"from": start.isoformat(), "to": end.isoformat()}, group_by="hour")
    inside = [e for e in events if start <= e.occurred_at.replace(minute=0, second=0, microsecond=0) < end]
    assert 0 < len(inside) < len(events)
    _check(body, inside, ["hour"])
    assert datetime.fromisoformat(body["rows"][0]["hour"]) == start
    assert datetime.fromisoformat(body["rows"][-1]["hour"]) < end
    # A time without an offset is UTC; an offset is converted.
    naive = _usage(client, reader, **{"from": "2026-09-30T02:00:00", "to": "2026-09-30T06:00:00+02:00"})
    assert naive["from"] == "2026-09-30T02:00:00Z" and naive["to"] == "2026-09-30T04:00:00Z"


def test_filters(client, reader, events):
    cases = {
        "tenant_id": (BETA, lambda e: e.tenant_id == BETA),
        "user_id": ("user-2", lambda e: e.user_id == "user-2"),
        "extension_id": ("summarize", lambda e: e.extension_id == "summarize"),
        "function": ("rewrite", lambda e: e.function == "rewrite"),
        "purpose": ("summary", lambda e: e.purpose == "summary"),
        "provider": ("openai", lambda e: e.provider == "openai"),
        "model": ("mystery-model-1", lambda e: e.model == "mystery-model-1"),
        "byollm": ("false", lambda e: not e.is_byollm),
        "status": ("error", lambda e: e.status == "error"),
    }
    for name, (value, keep) in cases.items():
        chosen = [e for e in events if keep(e)]
        assert 0 < len(chosen) < len(events), name
        _check(_usage(client, reader, **{name: value}, group_by="model"), chosen, ["model"])
    byollm = [e for e in events if e.is_byollm]
    body = _usage(client, reader, byollm="true", provider="anthropic")
    assert body["totals"]["billed_nanos"] == 0 and body["totals"]["shadow_nanos"] > 0
    assert body["totals"]["calls"] == sum(e.provider == "anthropic" for e in byollm)
    assert _usage(client, reader, model="no-such-model")["rows"] == []
    empty = _usage(client, reader, model="no-such-model")["totals"]
    assert empty["calls"] == 0 and empty["avg_latency_ms"] is None and empty["billed_usd"] == "0.000000000"


@pytest.mark.parametrize("params", [{}, {"group_by": "hour"}, {"group_by": "user"}, {"tenant_id": BETA}])
def test_the_provider_filter_is_case_insensitive_like_provider_names(client, reader, events, params):
    """Events sent as "OpenAI" are stored (and rolled up) as "openai": provider=OpenAI matched none of them."""
    for provider in ("openai", "anthropic"):
        chosen = [e for e in events if e.provider == provider and params.get("tenant_id", e.tenant_id) == e.tenant_id]
        assert chosen
        expected = _usage(client, reader, provider=provider, **params)
        assert comparable(expected["totals"], []) == total(chosen)
        for spelling in (provider.upper(), provider.capitalize()):
            assert _usage(client, reader, provider=spelling, **params) == expected, spelling


def test_unbilled_and_unpriced_calls_are_counted(client, reader, events):
    rows = {r["model"]: r for r in _usage(client, reader, group_by="model")["rows"]}
    mystery = rows["mystery-model-1"]
    held = [e for e in events if e.model == "mystery-model-1" and not e.is_byollm]
    assert mystery["unpriced"] == len(held) > 0 and mystery["cost_nanos"] == 0
    assert rows["claude-sonnet-4-6"]["errors"] == sum(
        e.status == "error" for e in events if e.model == "claude-sonnet-4-6"
    )


def test_usage_is_served_from_the_rollups(client, reader, events, session_factory):
    """Deleting the raw events does not change the answer: only usage_rollups is read."""
    before = _usage(client, reader, group_by="model,day")
    with session_factory() as session:
        session.execute(text("DELETE FROM usage_events"))
        session.commit()
    assert _usage(client, reader, group_by="model,day") == before


@pytest.mark.parametrize(
    "group_by", ["", "day", "model,byollm", "extension,status", "tenant", "user,day", "tenant,model"]
)
@pytest.mark.parametrize(("from_hours", "to_hours"), [(5, 29), (0, 48), (22, 23), (2, 120), (23, 73)])
def test_windows_cutting_days_equal_the_events(client, reader, events, group_by, from_hours, to_hours):
    """Whole days from the daily rollups, edge hours from the hourly ones: the same sums as the raw events."""
    start, end = START + timedelta(hours=from_hours), START + timedelta(hours=to_hours)
    body = _usage(client, reader, **{"from": start.isoformat(), "to": end.isoformat()}, group_by=group_by)
    inside = [e for e in events if start <= e.occurred_at.replace(minute=0, second=0, microsecond=0) < end]
    assert inside
    fields = [GROUPS[name] for name in group_by.split(",") if name]
    _check(body, inside, fields)
    keys = [tuple(r[f] for f in fields) for r in body["rows"]]
    assert keys == sorted(keys)  # ordered by the group values


def test_queries_read_the_coarsest_rollups_that_answer_them(client, reader, events, session_factory):
    """Without a tenant or user only the platform rollups are read (per day, per hour for hour groups); by
    tenant, user and day only, whole days come from the per-user daily rollups; anything finer per tenant or
    user needs the per-user hourly rollups."""
    coarse = {
        "platform by day": {"group_by": "day,model"},
        "platform by hour": {"group_by": "hour"},
        "tenants": {"group_by": "tenant"},
        "a tenant's users by day": {"group_by": "user,day", "tenant_id": BETA},
    }
    before = {name: _usage(client, reader, **params) for name, params in coarse.items()}
    fine = _usage(client, reader, group_by="tenant,model")
    assert fine["rows"] and all(body["rows"] for body in before.values())
    with session_factory() as session:
        session.execute(text("DELETE FROM usage_rollups"))
        session.commit()
    assert {name: _usage(client, reader, **params) for name, params in coarse.items()} == before
    assert _usage(client, reader, group_by="tenant,model")["rows"] == []


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"group_by": "model,colour"}, "cannot group usage by 'colour'"),
        ({"group_by": "tenant_id"}, "group_by takes tenant, user, extension"),
        ({"from": "2026-09-29T10:30:00Z"}, "from must be a whole UTC hour"),
        ({"to": "2026-10-01T00:00:01Z"}, "to must be a whole UTC hour"),
        ({"from": "2026-10-01T00:00:00Z", "to": "2026-10-01T00:00:00Z"}, "must be before to"),
    ],
)
def test_invalid_requests_are_422_problems(client, reader, params, fragment):
    response = client.get("/v1/usage", params={**WINDOW, **params}, headers=reader)
    body = assert_problem(response, 422, "invalid_input")
    assert fragment in body["detail"]


def test_a_number_is_no_time(client, reader, events):
    """``from=1759190400`` (Unix seconds of a whole hour) was read as 2025-09-30T00:00Z, and ``1759190400000`` as
    milliseconds: a time is ISO 8601, as documented and as ingest requires of ``occurred_at``."""
    unix = int(START.timestamp())
    numbers = ({"from": str(unix)}, {"from": f"{unix}000"}, {"to": f"{int(END.timestamp())}.0"}, {"from": "0"})
    for params in (*numbers, {"from": f"{unix}.0e0"}, {"to": f"{int(END.timestamp()) / 10}E1"}):  # exponent form
        body = assert_problem(
            client.get("/v1/usage", params={**WINDOW, **params}, headers=reader), 422, "validation_error"
        )
        assert "not a number" in body["detail"], params
    assert _usage(client, reader)["totals"]["calls"] == len(events)


@pytest.mark.parametrize("name", ["tenant_id", "user_id", "extension_id", "function", "purpose", "provider", "model"])
def test_an_empty_filter_is_refused(client, reader, make_token, events, name):
    """Ids and names are never empty, so ``model=`` matched nothing: a 200 with no rows, as if there were no usage
    (and ``tenant_id=`` was a 403 for a tenant-bound token). A 422 now, naming the parameter."""
    for headers in (reader, bearer(make_token(Scope.READ, tenant=ALPHA))):
        body = assert_problem(
            client.get("/v1/usage", params={**WINDOW, name: ""}, headers=headers), 422, "validation_error"
        )
        assert f"query.{name}" in body["detail"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("tenant", BETA), ("user", "user-2"), ("extension", "summarize"), ("groupby", "model"), ("tenant_ids", BETA)],
)
def test_an_unknown_parameter_is_refused(client, reader, make_token, events, name, value):
    """``tenant=`` (the group's name, not the filter ``tenant_id=``) or a misspelt ``group_by`` was ignored: a 200
    summing every tenant, user or extension, as if it were the asked one's usage. A 422 now, naming the parameter."""
    assert _usage(client, reader, tenant_id=BETA)["totals"] != _usage(client, reader)["totals"]
    for headers in (reader, bearer(make_token(Scope.READ, tenant=ALPHA))):
        response = client.get("/v1/usage", params={**WINDOW, name: value}, headers=headers)
        body = assert_problem(response, 422, "validation_error")
        assert body["detail"].startswith(f"the request does not match the schema: query.{name}: unknown parameter")
        assert "tenant_id" in body["detail"] and "group_by" in body["detail"]
    # the token is checked first, as for the schema's own errors
    assert_problem(client.get("/v1/usage", params={**WINDOW, name: value}), 401, "unauthenticated")


@pytest.mark.parametrize(("name", "values"), [("tenant_id", [ALPHA, BETA]), ("model", ["gpt-4o", "gpt-4o"])])
def test_a_filter_given_twice_is_refused(client, reader, events, name, values):
    """``tenant_id=a&tenant_id=b`` answered for b alone (the last value), as if it were the two tenants' usage. A 422
    now, naming the parameter; ``group_by`` still takes several."""
    params = [*WINDOW.items(), *((name, value) for value in values)]
    response = client.get("/v1/usage", params=params, headers=reader)
    body = assert_problem(response, 422, "validation_error")
    assert body["detail"] == (
        f"the request does not match the schema: query.{name}: given {len(values)} times, it takes one value"
    )
    assert _usage(client, reader, group_by=["model", "day"])["group_by"] == ["model", "day"]


def test_malformed_parameters_are_validation_errors(client, reader):
    for params in ({"from": "yesterday"}, {"status": "exploded"}, {"byollm": "perhaps"}):
        response = client.get("/v1/usage", params={**WINDOW, **params}, headers=reader)
        assert_problem(response, 422, "validation_error")
    assert_problem(client.get("/v1/usage", params={"to": WINDOW["to"]}, headers=reader), 422, "validation_error")


def test_a_tenant_bound_token_sees_only_its_tenant(client, make_token, events):
    headers = bearer(make_token(Scope.READ, tenant=ALPHA))
    alpha = [e for e in events if e.tenant_id == ALPHA]
    body = _usage(client, headers, group_by="tenant,model")
    _check(body, alpha, ["tenant_id", "model"])
    assert BETA not in str(body)
    assert _usage(client, headers, tenant_id=ALPHA) == _usage(client, headers)
    for group_by in ("", "user", "day,byollm", ",".join(GROUPS)):
        assert BETA not in str(_usage(client, headers, group_by=group_by))
    denied = client.get("/v1/usage", params={**WINDOW, "tenant_id": BETA}, headers=headers)
    body = assert_problem(denied, 403, "forbidden")
    assert f"token bound to tenant {ALPHA}" in body["detail"]


def test_unbound_token_sees_every_tenant(client, reader, events):
    tenants = [r["tenant_id"] for r in _usage(client, reader, group_by="tenant")["rows"]]
    assert sorted(tenants) == [ALPHA, BETA]


def test_authentication_and_scope(client, make_token):
    assert_problem(client.get("/v1/usage", params=WINDOW), 401, "unauthenticated")
    assert_problem(client.get("/v1/usage", params=WINDOW, headers=bearer("mtr_" + "x" * 43)), 401, "unauthenticated")
    for scopes in ((Scope.INGEST,), (Scope.ADMIN,), (Scope.INGEST, Scope.ADMIN)):
        response = client.get("/v1/usage", params=WINDOW, headers=bearer(make_token(*scopes)))
        assert "read" in assert_problem(response, 403, "forbidden")["detail"]


def test_window_starts_are_compared_as_instants(client, reader, events):
    """A window given in another offset selects the same hours as its UTC spelling."""
    start = (T0 + timedelta(hours=3)).astimezone(ZoneInfo("Asia/Kolkata"))  # +05:30: 05:30 local, 00:00 UTC
    local = _usage(client, reader, **{"from": start.isoformat(), "to": END.isoformat()})
    utc = _usage(client, reader, **{"from": (T0 + timedelta(hours=3)).isoformat(), "to": END.isoformat()})
    assert local == utc
    assert local["from"] == (T0 + timedelta(hours=3)).astimezone(UTC).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize("offset", ["+05:30", "+0530"])
def test_an_offset_whose_plus_was_not_encoded_is_named(client, reader, events, offset):
    """A query string reads ``+`` as a space: ``from=2026-09-30T05:30:00+05:30`` sent as is (curl, a browser) came as
    ``05:30:00 05:30``, refused with pydantic's "unexpected extra characters at the end of the input". The 422 now
    says how to send the offset; sent as ``%2B``, it is the same window as its UTC spelling."""
    response = client.get(f"/v1/usage?from=2026-09-30T05:30:00{offset}&to=2026-10-04T00:00:00Z", headers=reader)
    body = assert_problem(response, 422, "validation_error")
    assert body["detail"] == (
        "the request does not match the schema: query.from: Value error, a '+' in a query string reads as a space: "
        f"send the offset as %2B{offset[1:]} (or the time in UTC, with Z)"
    )
    encoded = _usage(client, reader, **{"from": f"2026-09-30T05:30:00{offset}"})
    assert encoded == _usage(client, reader, **{"from": "2026-09-30T00:00:00Z"}) and encoded["totals"]["calls"] > 0


@pytest.mark.parametrize("params", [{}, {"user_id": "alice"}, {"tenant_id": ALPHA}, {"group_by": "day"}])
def test_a_window_inside_the_last_day_datetimes_hold_is_answered(client, reader, params):
    """Whole days start at the first midnight after `from`: there is none after 9999-12-31, and computing it
    overflowed (a 500)."""
    window = {"from": "9999-12-31T01:00:00Z", "to": "9999-12-31T23:00:00Z"}
    response = client.get("/v1/usage", params=window | params, headers=reader)
    assert response.status_code == 200, response.text
    assert response.json()["totals"]["calls"] == 0


@pytest.mark.parametrize("params", [{}, {"group_by": "hour"}, {"group_by": "day"}, {"tenant_id": BETA}])
def test_events_stored_with_an_old_provider_spelling_group_with_their_provider(
    client, reader, events, session_factory, params
):
    """Events stored before provider names were lowercased keep their spelling ("OpenAI"): provider=openai matched
    them, but group_by=provider answered them apart ("OpenAI" and "openai", neither the filter's total), and so
    did /metrics' provider label."""
    legacy = "gpt-4o"
    with session_factory() as session:
        for table in ("usage_events", "usage_rollups", "platform_usage_hourly", "platform_usage_daily"):
            session.execute(text(f"UPDATE {table} SET provider = 'OpenAI' WHERE model = :m"), {"m": legacy})
        session.commit()
        assert {r.provider for r in usage_totals(session)} == {"anthropic", "openai"}
    group_by = ",".join(filter(None, ["provider", params.get("group_by")]))
    body = _usage(client, reader, **{**params, "group_by": group_by})
    openai = [e for e in events if e.provider == "openai" and params.get("tenant_id", e.tenant_id) == e.tenant_id]
    assert {r["provider"] for r in body["rows"]} == {"anthropic", "openai"}
    rows = [r for r in body["rows"] if r["provider"] == "openai"]
    assert sum(r["calls"] for r in rows) == len(openai)
    assert sum(r["billed_nanos"] for r in rows) == sum(e.charge_nanos for e in openai)
    filtered = _usage(client, reader, **{k: v for k, v in params.items() if k != "group_by"}, provider="OpenAI")
    assert filtered["totals"]["calls"] == len(openai)
