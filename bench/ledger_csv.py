"""Memory and time of a period's ledger CSV export (``GET /v1/ledger/{period}.csv``, ``billing ledger-export``).

A fresh PostgreSQL database (``bench_ledger_<pid>``, dropped afterwards) migrated to head, holding ``--transfers``
transfers of one period (written with ``generate_series``: usage charges and provider costs, with event ids, as
ingest posts them; a few thousand credits with keys and memos). Each variant runs in its own child process, and
its peak resident memory (``ru_maxrss`` of that child) and wall time are recorded; variants alternate over
``--rounds`` rounds:

  floor     the child imports metering, connects and reads one row: the memory every variant starts from
  whole     the baseline, the export as it was built before it was streamed: every transfer of the period as an
            ORM object (``session.scalars(select(TransferRow)...)``), then the whole CSV as one string
  streamed  ``export.ledger_csv_chunks`` (rows read with ``yield_per`` from a server-side cursor, written a
            chunk at a time), each chunk written to /dev/null

Every variant's output is checked: the same number of bytes and the same SHA-256 in every variant.

Run:  .venv/bin/python -m bench.ledger_csv [--transfers 1000000] [--rounds 3] [--out bench/out/ledger_csv.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.api_ingest import database, log
from bench.report import emit

ROOT = Path(__file__).resolve().parents[1]
PERIOD = "2026-10"
VARIANTS = ("floor", "whole", "streamed")

FILL = """
INSERT INTO transfers (id, debit_account_id, credit_account_id, amount_nanos, currency, kind, event_id,
                       period, created_at)
SELECT md5('t' || i)::uuid,
       CASE WHEN i %% 2 = 0 THEN 'user:tenant-' || (i %% 50) || ':user-' || (i %% 2000)
            ELSE 'provider:anthropic:cost' END,
       CASE WHEN i %% 2 = 0 THEN 'platform:revenue' ELSE 'provider:anthropic:payable' END,
       1000 + (i::bigint * 7919) %% 5000000, 'USD',
       CASE WHEN i %% 2 = 0 THEN 'usage_charge' ELSE 'provider_cost' END,
       md5('e' || (i / 2))::uuid, %(period)s,
       timestamptz '2026-10-01' + (i * interval '2 seconds')
FROM generate_series(1, %(usage)s) AS i
"""
CREDITS = """
INSERT INTO transfers (id, debit_account_id, credit_account_id, amount_nanos, currency, kind, idempotency_key,
                       idempotency_tenant_id, memo, created_at)
SELECT md5('c' || i)::uuid, 'platform:topups', 'user:tenant-' || (i %% 50) || ':user-' || (i %% 2000),
       25000000000, 'USD', 'credit', 'key-' || i, 'tenant-' || (i %% 50), '=welcome, "friend" ' || i,
       timestamptz '2026-10-01' + (i * interval '3 minutes')
FROM generate_series(1, %(credits)s) AS i
"""


def fill(conninfo: str, transfers: int) -> None:
    credits = min(5_000, transfers // 100)
    with psycopg.connect(conninfo) as conn:
        conn.execute(FILL, {"period": PERIOD, "usage": transfers - credits})
        conn.execute(CREDITS, {"credits": credits})
        conn.commit()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE transfers")


def child(variant: str, url: str) -> dict[str, Any]:
    """One variant in this (child) process: its output's size and digest, its time."""
    from sqlalchemy import select, text

    from metering.billing import export, invoice_store
    from metering.db.engine import make_engine, make_session_factory
    from metering.db.models import TransferRow

    engine = make_engine(url)
    digest, size = hashlib.sha256(), 0
    with make_session_factory(engine)() as session:
        session.execute(text("SELECT 1")).one()
        start = time.perf_counter()
        if variant == "whole":
            stmt = select(TransferRow).where(invoice_store.in_period(PERIOD))
            rows = list(session.scalars(stmt.order_by(TransferRow.created_at, TransferRow.id)))
            chunks: Any = [export.transfers_csv(rows)]
        elif variant == "streamed":
            chunks = export.ledger_csv_chunks(session, PERIOD)
        else:
            chunks = []
        with open(os.devnull, "w", encoding="utf-8") as sink:
            for chunk in chunks:
                data = chunk.encode()
                digest.update(data)
                size += len(data)
                sink.write(chunk)
        seconds = time.perf_counter() - start
    engine.dispose()
    return {"bytes": size, "sha256": digest.hexdigest(), "seconds": seconds}


def run_child(variant: str, url: str) -> dict[str, Any]:
    """One variant in a fresh child process, with the peak resident memory the child reports of itself."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.ledger_csv", "--child", variant, "--url", url],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout)
    result["peak_rss_mib"] = _child_peak_mib(out.stderr)
    return result


def _child_peak_mib(stderr: str) -> float:
    for line in stderr.splitlines():
        if line.startswith("peak_rss_kib="):
            return int(line.split("=", 1)[1]) / 1024
    raise RuntimeError(f"the child did not report its peak memory: {stderr[-500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfers", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.url)
        print(json.dumps(result))
        print(f"peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
        return

    with database(f"bench_ledger_{os.getpid()}") as (url, conninfo):
        log(f"filling {args.transfers:,} transfers of {PERIOD}")
        fill(conninfo, args.transfers)
        samples: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for round_no in range(args.rounds):
            order = VARIANTS[round_no % 3 :] + VARIANTS[: round_no % 3]
            for variant in order:
                result = run_child(variant, url)
                samples[variant].append(result)
                log(f"round {round_no + 1} {variant}: {result['peak_rss_mib']:.0f} MiB, {result['seconds']:.2f} s")
    outputs = {(s["bytes"], s["sha256"]) for v in ("whole", "streamed") for s in samples[v]}
    if len(outputs) != 1:
        raise SystemExit(f"the variants exported different CSVs: {outputs}")
    summary = {
        v: {
            "peak_rss_mib_median": statistics.median(s["peak_rss_mib"] for s in samples[v]),
            "seconds_median": statistics.median(s["seconds"] for s in samples[v]),
        }
        for v in VARIANTS
    }
    floor = summary["floor"]["peak_rss_mib_median"]
    whole, streamed = summary["whole"], summary["streamed"]
    report = {
        "transfers": args.transfers,
        "csv_bytes": next(iter(outputs))[0],
        "rounds": args.rounds,
        "summary": summary,
        "above_floor_mib": {v: summary[v]["peak_rss_mib_median"] - floor for v in ("whole", "streamed")},
        "streamed_over_whole_memory_above_floor": (streamed["peak_rss_mib_median"] - floor)
        / (whole["peak_rss_mib_median"] - floor),
        "streamed_over_whole_time": streamed["seconds_median"] / whole["seconds_median"],
        "samples": samples,
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
