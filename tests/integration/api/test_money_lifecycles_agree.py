"""Seeded random billing lifecycles: invoices (JSON, CSV, CLI export), the ledger, ``/v1/usage`` and
``metering billing check`` agree to the nano, on SQLite and PostgreSQL.

Each seed ingests random events over the last and the current month (random token, cache, 1-hour cache and search
counts, BYOLLM and failed calls, an unpriced model), then runs finalizations of both months, re-rates of random
windows under new overrides (markup inherited, 0 or its own; prices possibly $0), late events, an override for the
unpriced model and reprices, in a random order. A companion of ``test_money_surfaces_agree`` (one hand-made
scenario, every surface).
"""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select

from metering.auth import Scope
from metering.billing.ledger import wallet_id
from metering.billing.overrides import add_override
from metering.billing.reprice import reprice_held
from metering.billing.rerate import apply_rerate
from metering.db.models import TransferRow, UsageEventRow
from tests.fakes.events import record
from tests.integration.api.conftest import bearer
from tests.integration.api.test_money_surfaces_agree import MARKUP, MODELS, USERS, api, month_start, run_ingest
from tests.integration.lifecycle_steps import finalize_step

__all__ = ["api"]  # the fixture


def random_records(rng: random.Random, at_of, n: int) -> list[dict]:
    records = []
    for i in range(n):
        provider, model, extension, function = rng.choice(MODELS)
        tenant, user = rng.choice(USERS)
        counts = {"input_tokens": rng.randint(0, 300_000), "output_tokens": rng.randint(0, 40_000)}
        counts["cache_read_tokens"] = rng.randint(0, counts["input_tokens"] // 3) * (rng.random() < 0.5)
        counts["cache_write_tokens"] = rng.randint(0, counts["input_tokens"] // 3) * (rng.random() < 0.5)
        counts["cache_write_1h_tokens"] = rng.randint(0, counts["cache_write_tokens"]) * (rng.random() < 0.5)
        counts["web_searches"] = rng.randint(1, 5) * (rng.random() < 0.25)
        extra: dict = {"is_byollm": rng.random() < 0.2}
        if rng.random() < 0.2:
            extra |= {"status": "error", "error_type": "overloaded"}
            if rng.random() < 0.3:
                extra["usage_completeness"] = "missing"
                counts = dict.fromkeys(counts, 0)
            elif rng.random() < 0.4:
                counts = dict.fromkeys(counts, 0) | {"web_searches": 2}
        records.append(
            record(i, tenant_id=tenant, user_id=user, extension_id=extension, function=function, provider=provider,
                   model=model, occurred_at=at_of().isoformat(), reasoning_tokens=0, **counts, **extra)
        )  # fmt: skip
    return records


@pytest.mark.parametrize("seed", range(12))
def test_random_lifecycles_keep_invoices_ledger_and_usage_equal(seed, api, make_token, session_factory, run) -> None:
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(microsecond=0)
    this_start = month_start(now)
    last_start = month_start(this_start - timedelta(days=1))
    last, this = last_start.strftime("%Y-%m"), this_start.strftime("%Y-%m")

    def at_random() -> datetime:
        return last_start + (now - timedelta(minutes=1) - last_start) * rng.random()

    run_ingest(session_factory, random_records(rng, at_random, 60), now)
    steps = ["finalize last", "finalize this", "rerate", "rerate", "rerate", "late", "late", "reprice", "override"]
    rng.shuffle(steps)
    for n, step in enumerate(steps):
        if step == "late":
            run_ingest(session_factory, random_records(rng, at_random, 10), now)
            continue
        with session_factory() as session:
            if step.startswith("finalize"):
                finalize_step(session, last if step == "finalize last" else this, now)
            elif step == "rerate":
                add_override(session, provider=rng.choice(["anthropic", "openai", "openai_compatible"]),
                             model_pattern=rng.choice(["*", "claude-haiku-4-5", "gpt-*", "local-*"]),
                             effective_from=last_start + timedelta(seconds=n), effective_to=None,
                             input_mtok=Decimal(rng.randint(0, 10**7)) / 10**6,
                             output_mtok=Decimal(rng.randint(0, 10**8)) / 10**6,
                             web_search_per_k=Decimal(rng.randint(0, 20)),
                             markup_pct=rng.choice([None, Decimal(0), Decimal("33.3")]), id=f"o{n}")  # fmt: skip
                session.flush()
                start = last_start + (now - last_start) * rng.random()
                apply_rerate(session, start=start, end=start + timedelta(days=rng.randint(1, 40)), markup_pct=MARKUP,
                             run_id=f"r{n}", now=now)  # fmt: skip
            elif step == "reprice":
                reprice_held(session, markup_pct=MARKUP, now=now)
            else:
                add_override(session, provider="openai_compatible", model_pattern="local-*", effective_from=last_start,
                             effective_to=None, input_mtok=Decimal("0.123457"), output_mtok=Decimal("0.987653"),
                             web_search_per_k=Decimal("3.33"), markup_pct=Decimal("12.5"), id="llama")  # fmt: skip
            session.commit()

    check = run("billing", "check")
    assert check.exit_code == 0, check.output
    reader = bearer(make_token(Scope.READ))
    with session_factory() as session:
        events = list(session.scalars(select(UsageEventRow)))
        transfers = list(session.scalars(select(TransferRow)))
    by_id = {t.id: t for t in transfers}
    event_of = {e.event_id: e for e in events}
    charged_in: dict[tuple[str, str], int] = defaultdict(int)  # (wallet, period): net usage charge
    corrected_in: dict[tuple[str, str], int] = defaultdict(int)  # the part correcting another month's events
    for t in transfers:
        if (by_id[t.reverses_id].kind if t.kind == "reversal" else t.kind) != "usage_charge":
            continue
        amount, wallet = (
            (-t.amount_nanos, t.credit_account_id) if t.kind == "reversal" else (t.amount_nanos, t.debit_account_id)
        )
        assert t.period is not None
        charged_in[wallet, t.period] += amount
        if t.memo and event_of[t.event_id].invoice_period != t.period:
            corrected_in[wallet, t.period] += amount
    for tenant, user in USERS:
        wallet = wallet_id(tenant, user)
        for period in sorted({p for _, p in charged_in} | {last, this}):
            got = api.get(f"/v1/invoices/{tenant}/{user}/{period}", headers=reader)
            if got.status_code == 404:
                assert charged_in.get((wallet, period), 0) == 0, (tenant, user, period)
                continue
            invoice = got.json()
            assert invoice["total_nanos"] == charged_in[wallet, period], (tenant, user, period, invoice["status"])
            if invoice["status"] == "draft":
                lines = invoice["lines"]
                assert sum(x["billed_nanos"] for x in lines if x["correction_of"]) == corrected_in[wallet, period]
                assert sum(x["billed_nanos"] for x in lines if not x["correction_of"]) == sum(
                    e.charge_nanos
                    for e in events
                    if (e.tenant_id, e.user_id, e.invoice_period, e.billing_status) == (tenant, user, period, "billed")
                )
            api_csv = api.get(f"/v1/invoices/{tenant}/{user}/{period}.csv", headers=reader).text
            cli = run("billing", "invoices", "export", tenant, user, period)
            assert cli.exit_code == 0 and cli.output.replace("\r\n", "\n") == api_csv.replace("\r\n", "\n")
    end = now.replace(minute=0, second=0) + timedelta(hours=1)
    params = {"from": last_start.isoformat(), "to": end.isoformat(), "group_by": "user,model,byollm"}
    rows = api.get("/v1/usage", params=params, headers=reader).json()["rows"]
    want: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for e in events:
        sums = want[e.user_id, e.model, e.is_byollm]
        sums[0] += 1
        sums[1] += e.charge_nanos
        sums[2] += e.shadow_nanos
        sums[3] += e.cost_nanos
    assert {
        (r["user_id"], r["model"], r["byollm"]): [r["calls"], r["billed_nanos"], r["shadow_nanos"], r["cost_nanos"]]
        for r in rows
    } == dict(want)
