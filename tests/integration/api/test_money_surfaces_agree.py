"""Every surface that shows money agrees to the nano for the same events, on SQLite and PostgreSQL.

One rich scenario over two months (the last one finalized, the current one open): several tenants, users, extensions
and models, BYOLLM calls, failed calls (with and without usage, with web searches), cache reads and (1-hour) writes,
web searches, an unpriced model later given an override with a markup and repriced, a re-rate of a past window of
the finalized month, a late event, credits and an adjustment. Then the quote, the events, the ledger, the balances,
the invoices (JSON, CSV, CLI), the ledger CSV, ``/v1/usage``, ``/metrics`` and ``metering billing check`` agree.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from metering.api.app import create_app
from metering.auth import Scope
from metering.billing.credits import add_credit
from metering.billing.ingest import ingest
from metering.billing.ledger import wallet_id
from metering.billing.overrides import add_override
from metering.billing.reprice import reprice_held
from metering.billing.rerate import apply_rerate
from metering.config import ApiSettings, BillingSettings, Settings
from metering.db.models import TransferRow, UsageEventRow
from metering.events import event_from_record
from tests.fakes.events import record
from tests.integration.api.conftest import bearer
from tests.integration.lifecycle_steps import finalize_step

MARKUP = Decimal(20)
USERS = (("t1", "u1"), ("t1", "u2"), ("t2", "u1"), ("t:2", "u~3"))
MODELS = (
    ("anthropic", "claude-sonnet-4-6", "rewrite", "rewrite"),
    ("anthropic", "claude-haiku-4-5", "rewrite", "extract_action_items"),
    ("openai", "gpt-4o-mini", "chatty", "summarize_thread"),
    ("openai_compatible", "local-llama", "chatty", "local"),
    ("Simulated", "claude-haiku-4-5", "sim", "sim"),
    ("OpenAI", "gpt-4o", "chatty", "summarize_thread"),
)


def month_start(at: datetime) -> datetime:
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


@pytest.fixture
def api(db_url, tmp_path):
    settings = Settings(env="test", database_url=db_url, data_dir=tmp_path, billing=BillingSettings(markup_pct=MARKUP))
    with TestClient(create_app(settings)) as client:
        yield client


def scenario_records(at_of, n: int) -> list[dict]:
    """``n`` varied events; ``at_of(i)`` places the i-th."""
    records = []
    for i in range(n):
        provider, model, extension, function = MODELS[i % len(MODELS)]
        tenant, user = USERS[(i // 2) % len(USERS)]
        counts = {
            "input_tokens": 1_000 + 7_919 * i,
            "output_tokens": 13 + 311 * i,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
        }
        if i % 3 == 1:
            counts["cache_read_tokens"] = 500 + 17 * i
        if i % 4 == 2 and provider == "anthropic":
            counts["cache_write_tokens"] = 700 + 3 * i
            counts["cache_write_1h_tokens"] = (300 + i) if i % 8 == 2 else 0
        if provider in ("anthropic", "openai_compatible") and i % 5 == 3:
            counts["web_searches"] = 1 + i % 4
        extra: dict = {}
        if i % 6 == 5:
            extra["is_byollm"] = True
        if i % 7 == 4:
            extra["status"] = "error"
            extra["error_type"] = "overloaded"
            if i % 14 == 4:  # no usage at all
                extra["usage_completeness"] = "missing"
                counts = {k: 0 for k in counts}
            elif i % 21 == 11:  # searches, no tokens
                counts = {k: 0 for k in counts} | {"web_searches": 2}
        records.append(
            record(
                i,
                tenant_id=tenant,
                user_id=user,
                extension_id=extension,
                function=function,
                provider=provider,
                model=model,
                occurred_at=at_of(i).isoformat(),
                **counts,
                **extra,
            )
        )
    return records


def run_ingest(session_factory, records, now) -> None:
    with session_factory() as session:
        result = ingest(session, [event_from_record(r) for r in records], markup_pct=MARKUP, now=now)
        assert result.rejected == [], result.rejected
        session.commit()


def nanos_of_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_every_money_surface_agrees(api, make_token, session_factory, run, db_url, tmp_path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    this_start = month_start(now)
    last_start = month_start(this_start - timedelta(days=1))
    last, this = last_start.strftime("%Y-%m"), this_start.strftime("%Y-%m")
    span = (now - timedelta(minutes=1)) - this_start

    # a re-rate's new haiku price, effective in a window of the last month only (other events keep their quote)
    window = (last_start + timedelta(days=10), last_start + timedelta(days=20))
    run_ingest(session_factory, scenario_records(lambda i: last_start + timedelta(hours=7 * i + 1, minutes=i), 60), now)
    run_ingest(session_factory, scenario_records(lambda i: this_start + span * (i + 1) / 41, 40), now)
    with session_factory() as session:
        add_override(
            session,
            provider="anthropic",
            model_pattern="claude-haiku-4-5",
            effective_from=window[0],
            effective_to=window[1],
            input_mtok=Decimal("1.234567"),
            output_mtok=Decimal("5.4321"),
            web_search_per_k=Decimal("9.99"),
            markup_pct=Decimal("33.3"),
            id="haiku-rerate",
        )
        session.commit()
    with session_factory() as session:
        finalize_step(session, last, now)
        session.commit()
    with session_factory() as session:
        result = apply_rerate(
            session,
            start=window[0],
            end=window[1],
            model_pattern="claude-haiku-4-5",
            markup_pct=MARKUP,
            run_id="r1",
            now=now,
        )
        assert result.applied
        session.commit()
    # late events of the finalized month
    late = scenario_records(lambda i: last_start + timedelta(days=25, hours=i), 9)
    # and a call held for good: searches on a model without a search price
    late.append(
        record(
            99,
            tenant_id="t2",
            user_id="u1",
            model="claude-3-haiku-20240307",
            web_searches=2,
            occurred_at=(now - timedelta(minutes=2)).isoformat(),
        )
    )
    run_ingest(session_factory, late, now)
    # the unpriced model gets an override with its own markup, from before its first event; reprice
    with session_factory() as session:
        add_override(
            session,
            provider="openai_compatible",
            model_pattern="local-*",
            effective_from=last_start,
            effective_to=None,
            input_mtok=Decimal("0.123457"),
            output_mtok=Decimal("0.987653"),
            web_search_per_k=Decimal("3.33"),
            markup_pct=Decimal("12.5"),
            id="llama",
        )
        session.commit()
    with session_factory() as session:
        assert reprice_held(session, markup_pct=MARKUP, now=now).priced > 0
        session.commit()
    with session_factory() as session:
        add_credit(session, tenant_id="t1", user_id="u1", amount=Decimal("25.00"), idempotency_key="k1", now=now)
        add_credit(
            session,
            tenant_id="t:2",
            user_id="u~3",
            amount=Decimal("-1.234567891"),
            idempotency_key="k2",
            kind="adjustment",
            now=now,
        )
        session.commit()

    reader = bearer(make_token(Scope.READ))
    with session_factory() as session:
        events = list(session.scalars(select(UsageEventRow)))
        transfers = list(session.scalars(select(TransferRow)))
    assert {e.billing_status for e in events} == {"billed", "excluded_byollm", "not_billable", "unpriced"}
    assert any(e.is_late for e in events) and any(e.price_source == "override" for e in events)

    # 1. the quote of each priced event's counts at its time is its charge and cost (shadow for BYOLLM)
    for e in events:
        if e.price_source is None:
            continue
        params = {
            "provider": e.provider,
            "model": e.model,
            "at": e.occurred_at.isoformat(),
            "input_tokens": e.input_tokens,
            "output_tokens": e.output_tokens,
            "cache_read_tokens": e.cache_read_tokens,
            "cache_write_tokens": e.cache_write_tokens,
            "cache_write_1h_tokens": e.cache_write_1h_tokens,
            "web_searches": e.web_searches,
        }
        quote = api.get("/v1/prices/quote", params=params, headers=reader)
        assert quote.status_code == 200, quote.text
        body = quote.json()
        if e.billing_status == "billed":
            assert (body["price_nanos"], body["cost_nanos"]) == (e.charge_nanos, e.cost_nanos), (
                e.provider,
                e.model,
                e.occurred_at,
                e.price_source,
                e.price_version,
                e.markup_pct,
                body["source"],
                body["source_version"],
                body["markup_pct"],
                e.is_late,
                e.status,
                e.web_searches,
            )
        elif e.billing_status == "excluded_byollm":
            assert body["price_nanos"] == e.shadow_nanos, e.event_id

    # 2. events' charges = net ledger usage charges = balances (with the credits)
    by_id = {t.id: t for t in transfers}
    event_of = {e.event_id: e for e in events}

    def period_of(t: TransferRow) -> str:
        return t.period or t.created_at.strftime("%Y-%m")

    def signed(t: TransferRow) -> tuple[str, int]:
        """(kind, amount) of a transfer, a reversal as minus the kind it reverses."""
        if t.kind == "reversal":
            return by_id[t.reverses_id].kind, -t.amount_nanos
        return t.kind, t.amount_nanos

    charged: dict[str, int] = defaultdict(int)
    charged_in: dict[tuple[str, str], int] = defaultdict(int)  # (wallet, period) -> net usage charge
    for t in transfers:
        kind, amount = signed(t)
        if kind == "usage_charge":
            wallet = t.debit_account_id if t.kind == "usage_charge" else t.credit_account_id
            charged[wallet] += amount
            charged_in[wallet, period_of(t)] += amount
    expected: dict[str, int] = defaultdict(int)
    for e in events:
        expected[wallet_id(e.tenant_id, e.user_id)] += e.charge_nanos
    assert dict(charged) == {k: v for k, v in expected.items() if v or k in charged}
    balances = {a["account_id"]: a["balance_nanos"] for a in api.get("/v1/balances", headers=reader).json()["accounts"]}
    credits = {wallet_id("t1", "u1"): 25 * 10**9, wallet_id("t:2", "u~3"): -1_234_567_891}
    for wallet in expected:
        assert balances[wallet] == credits.get(wallet, 0) - expected[wallet], wallet
    assert sum(balances.values()) == 0

    # 3. invoices (API JSON, API CSV, CLI CSV) = the events' lines = the ledger, per user and period
    for tenant, user in USERS:
        wallet = wallet_id(tenant, user)
        for period in (last, this):
            path = f"/v1/invoices/{tenant}/{user}/{period}"
            got = api.get(path, headers=reader)
            assert got.status_code == 200, got.text
            invoice = got.json()
            assert invoice["status"] == ("finalized" if period == last else "draft")
            lines: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
            for e in events:
                if (e.tenant_id, e.user_id, e.invoice_period, e.billing_status) == (tenant, user, period, "billed"):
                    if period == last and e.is_late:
                        continue
                    key = (e.extension_id, e.model, e.is_late, None)
                    lines[key][0] += 1
                    lines[key][1] += e.charge_nanos
            got_lines = {
                (x["extension_id"], x["model"], x["is_late"], x["correction_of"]): [x["calls"], x["billed_nanos"]]
                for x in invoice["lines"]
            }
            regular = {k: v for k, v in got_lines.items() if k[3] is None}
            if period == last:
                # the finalized invoice kept the charges before the re-rate
                assert set(regular) == set(lines)
            else:
                assert regular == dict(lines), (tenant, user, period)
            for item in (invoice, *invoice["lines"]):  # every *_usd is its *_nanos, exactly
                for name in [k for k in item if k.endswith("_usd")]:
                    stem = name.removesuffix("_usd")
                    assert Decimal(item[name]) * 10**9 == item[stem + "_nanos"], name
            assert invoice["total_nanos"] == sum(v[1] for v in got_lines.values())
            assert invoice["total_nanos"] == charged_in[wallet, period], (tenant, user, period)
            cents = (Decimal(invoice["total_nanos"]) / 10**7).quantize(Decimal(1), ROUND_HALF_EVEN) * 10**7
            assert (invoice["rounded_nanos"], invoice["residue_nanos"]) == (
                int(cents),
                invoice["total_nanos"] - int(cents),
            )
            api_csv = api.get(path + ".csv", headers=reader)
            assert api_csv.status_code == 200
            cli = run("billing", "invoices", "export", tenant, user, period)
            assert cli.exit_code == 0, cli.output
            assert cli.output.replace("\r\n", "\n") == api_csv.text.replace("\r\n", "\n")
            rows = nanos_of_csv(api_csv.text)
            csv_lines = [r for r in rows if r["row"] == "line"] if "row" in rows[0] else None
            assert csv_lines is None or len(csv_lines) == len(invoice["lines"])
            amounts = [int(r[list(r)[-1]]) for r in rows]
            assert amounts[-3:] == [invoice["total_nanos"], invoice["rounded_nanos"], invoice["residue_nanos"]]
            assert sum(amounts[:-3]) == invoice["total_nanos"]
            corrections = sum(v[1] for k, v in got_lines.items() if k[3] is not None)
            if period == this:
                rerated = sum(
                    signed(t)[1]
                    for t in transfers
                    if t.memo == "rerate:r1"
                    and signed(t)[0] == "usage_charge"
                    and event_of[t.event_id].invoice_period != period_of(t)
                    and wallet in (t.debit_account_id, t.credit_account_id)
                )
                assert corrections == rerated
    listed = api.get("/v1/invoices", headers=reader).json()["invoices"]
    assert {(i["tenant_id"], i["user_id"], i["period"]): i["total_nanos"] for i in listed} == {
        (t, u, p): charged_in[wallet_id(t, u), p] for t, u in USERS for p in (last, this)
    }

    # 4. the ledger CSV of each period = the transfers of the period = GET /v1/transfers?period=
    def walk(params: dict, headers: dict = reader) -> list[tuple[str, int]]:
        found, cursor = [], None
        while True:
            page = api.get(
                "/v1/transfers",
                params={**params, "limit": 7, **({"cursor": cursor} if cursor else {})},
                headers=headers,
            ).json()
            found += [(item["id"], item["amount_nanos"]) for item in page["items"]]
            if not (cursor := page["next_cursor"]):
                return sorted(found)

    for period in (last, this):
        assert walk({"period": period}) == sorted(
            (str(t.id), t.amount_nanos) for t in transfers if period_of(t) == period
        )
    for e in events[::9]:
        assert walk({"event_id": str(e.event_id)}) == sorted(
            (str(t.id), t.amount_nanos) for t in transfers if t.event_id == e.event_id
        )
    for period in (last, this):
        got = api.get(f"/v1/ledger/{period}.csv", headers=reader)
        assert got.status_code == 200
        rows = nanos_of_csv(got.text)
        assert sorted((r["id"], int(r["amount_nanos"])) for r in rows) == sorted(
            (str(t.id), t.amount_nanos) for t in transfers if period_of(t) == period
        )
        assert all(Decimal(r["amount_usd"]) * 10**9 == int(r["amount_nanos"]) for r in rows)
        cli = run("billing", "ledger-export", period)
        assert cli.exit_code == 0 and cli.output.replace("\r\n", "\n") == got.text.replace("\r\n", "\n")
    assert sum(1 for t in transfers if period_of(t) not in (last, this)) == 0

    # 5. /v1/usage under every group_by = the events
    end = now.replace(minute=0, second=0) + timedelta(hours=1)
    dims = {
        "tenant": "tenant_id",
        "user": "user_id",
        "extension": "extension_id",
        "function": "function",
        "purpose": "purpose",
        "provider": "provider",
        "model": "model",
        "byollm": "is_byollm",
        "status": "status",
    }

    def group_value(e: UsageEventRow, name: str):
        if name == "hour":
            return e.occurred_at.replace(minute=0, second=0, microsecond=0).isoformat()
        if name == "day":
            return e.occurred_at.date().isoformat()
        return getattr(e, dims[name])

    def usage_rows(params: dict, group: list[str], headers: dict) -> dict[tuple, list[int]]:
        got = api.get("/v1/usage", params={**params, "group_by": ",".join(group)} if group else params, headers=headers)
        assert got.status_code == 200, got.text
        have = {}
        for r in got.json()["rows"]:
            key = []
            for g in group:
                value = r[g if g in ("hour", "day") else dims[g] if dims[g] != "is_byollm" else "byollm"]
                if g == "hour":
                    value = datetime.fromisoformat(value.replace("Z", "+00:00")).isoformat()
                key.append(value)
            for name in ("billed", "shadow", "cost"):
                assert Decimal(r[name + "_usd"]) * 10**9 == r[name + "_nanos"], name
            have[tuple(key)] = [r["calls"], r["billed_nanos"], r["shadow_nanos"], r["cost_nanos"], r["unpriced"]]
        return have

    def usage_of(chosen: list[UsageEventRow], group: list[str]) -> dict[tuple, list[int]]:
        want: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
        for e in chosen:
            sums = want[tuple(group_value(e, g) for g in group)]
            sums[0] += 1
            sums[1] += e.charge_nanos
            sums[2] += e.shadow_nanos
            sums[3] += e.cost_nanos
            sums[4] += e.billing_status == "unpriced"
        return dict(want)

    groups = [[name] for name in [*dims, "hour", "day"]] + [["tenant", "user", "model"], ["user", "day"], []]
    windows = [(last_start, end), (last_start + timedelta(days=3, hours=5), this_start + timedelta(hours=7))]
    tenant_readers = {tenant: bearer(make_token(Scope.READ, tenant=tenant)) for tenant in ("t1", "t:2")}
    for start, stop in windows:
        inside = [e for e in events if start <= e.occurred_at < stop]
        params = {"from": start.isoformat(), "to": stop.isoformat()}
        for group in groups:
            assert usage_rows(params, group, reader) == usage_of(inside, group), (start, stop, group)
        filters = [("byollm", "true", "is_byollm", True), ("byollm", "false", "is_byollm", False),
                   ("status", "error", "status", "error"), ("provider", "OpenAI", "provider", "openai"),
                   ("model", "claude-haiku-4-5", "model", "claude-haiku-4-5"),
                   ("extension_id", "chatty", "extension_id", "chatty"), ("function", "local", "function", "local"),
                   ("purpose", "content_rewrite", "purpose", "content_rewrite")]  # fmt: skip
        for name, value, field, stored in filters:
            chosen = [e for e in inside if getattr(e, field) == stored]
            for group in (["day"], ["hour"], ["user"], []):
                assert usage_rows({**params, name: value}, group, reader) == usage_of(chosen, group), (name, group)
        for tenant, headers in tenant_readers.items():
            mine = [e for e in inside if e.tenant_id == tenant]
            for group in (["user"], ["user", "day"], ["model"], ["hour"], ["day", "byollm"], []):
                assert usage_rows(params, group, headers) == usage_of(mine, group), (tenant, group)
            filtered = {**params, "tenant_id": tenant, "user_id": "u1"}
            assert usage_rows(filtered, [], reader) == usage_of([e for e in mine if e.user_id == "u1"], [])

    # tenant-bound ledger CSVs and invoice lists = that tenant's wallets' transfers and invoices
    for tenant, headers in tenant_readers.items():
        wallets = {wallet_id(t, u) for t, u in USERS if t == tenant}
        for period in (last, this):
            rows = nanos_of_csv(api.get(f"/v1/ledger/{period}.csv", headers=headers).text)
            assert sorted((r["id"], int(r["amount_nanos"])) for r in rows) == sorted(
                (str(t.id), t.amount_nanos)
                for t in transfers
                if period_of(t) == period and {t.debit_account_id, t.credit_account_id} & wallets
            )
        for period in (last, this):
            listed_p = api.get("/v1/invoices", params={"period": period, "tenant_id": tenant}, headers=reader).json()
            assert {i["user_id"]: i["total_nanos"] for i in listed_p["invoices"]} == {
                u: charged_in[wallet_id(t, u), period] for t, u in USERS if t == tenant
            }
        accounts = api.get("/v1/balances", params={"tenant_id": tenant}, headers=reader).json()["accounts"]
        assert {a["account_id"]: a["balance_nanos"] for a in accounts} == {w: balances[w] for w in wallets}
        mine = api.get("/v1/invoices", headers=headers).json()["invoices"]
        assert {(i["user_id"], i["period"]): i["total_nanos"] for i in mine} == {
            (u, p): charged_in[wallet_id(t, u), p] for t, u in USERS if t == tenant for p in (last, this)
        }
        # ... and its pages with its own token: transfers walked 7 at a time, balances, held events
        assert walk({}, headers) == sorted(
            (str(t.id), t.amount_nanos) for t in transfers if {t.debit_account_id, t.credit_account_id} & wallets
        )
        own = api.get("/v1/balances", headers=headers).json()
        assert {a["account_id"]: a["balance_nanos"] for a in own["accounts"]} == {w: balances[w] for w in wallets}
        held = api.get("/v1/events/unpriced", params={"limit": 1000}, headers=headers).json()["items"]
        assert sorted(i["event_id"] for i in held) == sorted(
            str(e.event_id) for e in events if e.tenant_id == tenant and e.billing_status == "unpriced"
        )
    assert any(e.billing_status == "unpriced" and e.tenant_id not in tenant_readers for e in events)

    # 6. /metrics = the events, per label set
    text = api.get("/metrics").text
    for metric, field in (("metering_billed_usd_total", "charge_nanos"), ("metering_shadow_usd_total", "shadow_nanos")):
        series: dict[tuple, Decimal] = {}
        for line in text.splitlines():
            if line.startswith(metric + "{"):
                labels, value = line[len(metric) + 1 :].rsplit("} ", 1)
                parsed = dict(part.split("=", 1) for part in labels.split(","))
                key = tuple(
                    parsed[k].strip('"') for k in ("provider", "model", "purpose", "extension", "byollm", "status")
                )
                series[key] = Decimal(value)
        want_series: dict[tuple, int] = defaultdict(int)
        for e in events:
            key = (e.provider, e.model, e.purpose, e.extension_id, str(e.is_byollm).lower(), e.status)
            want_series[key] += getattr(e, field)
        got_nanos = {k: int((v * 10**9).quantize(Decimal(1))) for k, v in series.items() if v}
        assert got_nanos == {k: v for k, v in want_series.items() if v}, metric

    # ... and with most labels folded into "other", the sums per byollm and status are still exact
    folded = ApiSettings(metrics_top_models=1, metrics_top_labels=1, metrics_max_label_sets=2)
    with TestClient(create_app(Settings(env="test", database_url=db_url, data_dir=tmp_path, api=folded))) as small:
        small_text = small.get("/metrics").text
    assert 'model="other"' in small_text
    for metric, field in (("metering_billed_usd_total", "charge_nanos"), ("metering_shadow_usd_total", "shadow_nanos")):
        sums: dict[tuple, Decimal] = defaultdict(Decimal)
        for line in small_text.splitlines():
            if line.startswith(metric + "{"):
                labels, value = line[len(metric) + 1 :].rsplit("} ", 1)
                parsed = dict(part.split("=", 1) for part in labels.split(","))
                sums[parsed["byollm"].strip('"'), parsed["status"].strip('"')] += Decimal(value)
        want_sums: dict[tuple, int] = defaultdict(int)
        for e in events:
            want_sums[str(e.is_byollm).lower(), e.status] += getattr(e, field)
        assert {k: int((v * 10**9).quantize(Decimal(1))) for k, v in sums.items() if v} == {
            k: v for k, v in want_sums.items() if v
        }, metric

    # 7. the checks pass
    check = run("billing", "check")
    assert check.exit_code == 0, check.output


# Ids and names clients choose, each hostile to a CSV or a spreadsheet in its own way.
HOSTILE_USERS = (("=t,1", '@"u" 2'), ("ténant ✓", "-1+1"), ("t\ttab", "+u;\nnl"))
HOSTILE_NAMES = (('=HYPERLINK("x","y")', 'm,"q"\r\nz'), ("ext é", "-m@1"), ("\rcr", "plain"))


def test_csv_cells_with_hostile_names_equal_the_json(api, make_token, session_factory, run) -> None:
    """Commas, quotes, newlines, tabs, formula starts and non-ASCII in tenant, user, extension, model, key and memo:
    each CSV (invoice via API and CLI, ledger) parses back to the JSON's values, a formula start behind a ``'``."""
    now = datetime.now(UTC).replace(microsecond=0)
    start = month_start(now)
    period = start.strftime("%Y-%m")
    with session_factory() as session:
        add_override(session, provider="openai_compatible", model_pattern="*", effective_from=start - timedelta(days=1),
                     effective_to=None, input_mtok=Decimal("1.5"), output_mtok=Decimal("7.25"), id="any")  # fmt: skip
        session.commit()
    records = []
    for i, ((tenant, user), (extension, model)) in enumerate(zip(HOSTILE_USERS * 2, HOSTILE_NAMES * 2, strict=True)):
        at = start + (now - start) * (i + 1) / 8
        records.append(
            record(i, tenant_id=tenant, user_id=user, extension_id=extension, provider="openai_compatible",
                   model=model, input_tokens=1_000 + 37 * i, output_tokens=300 + i, cache_read_tokens=0,
                   cache_write_tokens=0, reasoning_tokens=0, occurred_at=at.isoformat())
        )  # fmt: skip
    run_ingest(session_factory, records, now)
    with session_factory() as session:
        for n, (tenant, user) in enumerate(HOSTILE_USERS):
            add_credit(session, tenant_id=tenant, user_id=user, amount=Decimal("3.5"), idempotency_key=f"=k{n}",
                       memo=f"-memo,\n\"{n}\"", now=now)  # fmt: skip
        session.commit()

    def cell(value: str) -> str:
        return "'" + value if value.startswith(("=", "+", "-", "@", "\t", "\r")) else value

    reader = bearer(make_token(Scope.READ))
    for tenant, user in HOSTILE_USERS:
        path = f"/v1/invoices/{quote(tenant, safe='')}/{quote(user, safe='')}/{period}"
        invoice = api.get(path, headers=reader)
        assert invoice.status_code == 200, invoice.text
        body = invoice.json()
        api_csv = api.get(path + ".csv", headers=reader)
        assert api_csv.status_code == 200
        cli = run("billing", "invoices", "export", "--", tenant, user, period)  # "--": a user "-1+1" is no option
        assert cli.exit_code == 0 and cli.stdout_bytes == api_csv.content  # byte for byte (output normalises \r\n)
        rows = nanos_of_csv(api_csv.text)
        assert [r["row"] for r in rows] == ["line"] * len(body["lines"]) + ["total", "rounded_total", "residue"]
        assert {(r["tenant_id"], r["user_id"]) for r in rows} == {(cell(tenant), cell(user))}
        assert [(r["extension_id"], r["model"], int(r["amount_nanos"])) for r in rows[:-3]] == [
            (cell(x["extension_id"]), cell(x["model"]), x["billed_nanos"]) for x in body["lines"]
        ]
    ledger = nanos_of_csv(api.get(f"/v1/ledger/{period}.csv", headers=reader).text)
    with session_factory() as session:
        transfers = {str(t.id): t for t in session.scalars(select(TransferRow))}
    assert {r["id"] for r in ledger} == set(transfers)
    for r in ledger:
        t = transfers[r["id"]]
        assert (r["debit_account_id"], r["credit_account_id"]) == (t.debit_account_id, t.credit_account_id)
        assert (r["idempotency_key"], r["memo"]) == (cell(t.idempotency_key or ""), cell(t.memo or ""))
        assert int(r["amount_nanos"]) == t.amount_nanos
