"""What each part of ingest's server-side posting costs on PostgreSQL, against the 40 % budget (issue 3).

bench/ingest.py measures ingest end to end. This bench splits the one statement ingest runs after the COPY
(``metering.billing.batch_sql.POST_BATCH``) into its parts by running variants of it with one part cut out,
each on a fresh batch of 1,000 events just COPYed into the same database, in a transaction that is then rolled
back (so every variant of every round sees the same database). A part's marginal cost = the full statement's
time - the time without that part (medians over the rounds). Parts:

  transfers       the ``usage_charge`` and ``provider_cost`` transfers (``posted``)
  hourly_rollups  the per-user hourly rollups (``rolled``, the issue's rollups)
  coarse_rollups  platform hourly / daily and user daily (``rollup.COARSE_ROLLUPS``, for GET /v1/usage)
  accounts        the account upserts with their cached balances (``balances``)
  read            what is left with every part cut: reading the batch's events back (``b``), planning

Also timed per round: the raw binary COPY of a batch's event rows alone (what the 40 % target divides by, here
without its commit); ingest's probe + COPY with each row priced as COPY takes it (as ingest runs it); and the
same three steps one after the other (probe, pricing and row building, COPY of the built rows). The last two
come out equal: a binary COPY buffers up to 1,000 rows on the server before inserting them, so pricing the
next rows never overlaps the server's work on the previous ones.

Run:  .venv/bin/python -m bench.post_batch_parts [--preload 1000000] [--rounds 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from bench.ingest import MARKUP, RAW_BATCH, EventFactory, RawInserter, database, environment, preload, price_rows
from bench.ingest import timed_ingest as _timed_ingest
from bench.report import emit
from metering.billing import batch_sql, store
from metering.billing import ingest as ingest_module
from metering.billing.rates import RateCards
from metering.db.engine import make_engine, make_session_factory
from metering.events import UsageEvent

BATCH = 1_000
TARGET_RATIO = 0.40
PARTS = ("transfers", "hourly_rollups", "coarse_rollups", "accounts")


def without(sql: str, cte: str) -> str:
    """``sql`` with the CTE ``, <cte> AS (...)`` removed (its parentheses matched)."""
    start = sql.index(f", {cte} AS (")
    depth = 0
    for end in range(sql.index("(", start), len(sql)):
        depth += {"(": 1, ")": -1}.get(sql[end], 0)
        if depth == 0:
            return sql[:start] + sql[end + 1 :]
    raise ValueError(f"unbalanced CTE {cte}")


def variants() -> dict[str, str]:
    full = batch_sql.POST_BATCH
    coarse = [r.table for r in batch_sql.COARSE_ROLLUPS]
    no_coarse = full
    for table in coarse:
        no_coarse = without(no_coarse, table)
    cuts = {
        "transfers": without(full, "posted"),
        "hourly_rollups": without(full, "rolled"),
        "coarse_rollups": no_coarse,
        "accounts": without(full, "balances"),
    }
    read_only = without(without(without(no_coarse, "posted"), "rolled"), "balances")
    statements = {"full": full, **{f"without_{k}": v for k, v in cuts.items()}, "read_only": read_only}
    if len(set(statements.values())) != len(statements):
        raise RuntimeError("a cut changed nothing: batch_sql.POST_BATCH's CTE names changed")
    return statements


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def copy_batch(
    session: Session, events: list[UsageEvent], now: datetime, streamed: bool
) -> tuple[set[str], dict[str, float]]:
    """Ingest's probe + COPY of ``events``, pricing each row as COPY takes it (``streamed``, as ingest does) or
    first pricing them all and then COPYing the list (so the parts can be timed apart); returns the ids."""
    cards = RateCards(store.load_price_book(session, MARKUP))
    batch = uuid.uuid4()
    start = time.perf_counter()
    new = store.unstored_events(session, events)
    probed = time.perf_counter()
    priced = (ingest_module._row(p, batch, now, False) for p in ingest_module.iter_priced(new, cards, set()))
    if streamed:
        ids = store.insert_new_events_postgresql(session, priced)
        end = time.perf_counter()
        return ids, {"ingest_probe_and_streamed_copy": end - start}
    rows = list(priced)
    built = time.perf_counter()
    ids = store.insert_new_events_postgresql(session, rows)
    end = time.perf_counter()
    return ids, {"probe": probed - start, "pricing_and_rows": built - probed, "copy_of_priced_rows": end - built}


def one_round(
    factory: sessionmaker[Session], raw: RawInserter, events: EventFactory, statements: dict[str, str]
) -> dict[str, float]:
    """Seconds per variant for one round (each on its own fresh batch, rolled back)."""
    seconds: dict[str, float] = {}
    now = datetime.now(UTC)
    with factory() as session:
        rows = price_rows(session, events.events(BATCH, now), RAW_BATCH, now)
    seconds["raw_copy"] = timed(lambda: raw.insert_without_commit(rows))
    raw.conn.rollback()
    for name, sql in statements.items():
        batch = events.events(BATCH, datetime.now(UTC))
        with factory() as session:
            now = datetime.now(UTC)
            ids, parts = copy_batch(session, batch, now, streamed=name == "full")
            if name in ("full", "read_only"):
                seconds.update(parts)
            connection: Any = session.connection().connection.driver_connection
            params = {"ids": batch_sql.uuid_array(sorted(ids)), "now": now}
            with connection.cursor() as cursor:
                seconds[name] = timed(lambda: cursor.execute(sql, params))  # noqa: B023
            session.rollback()
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preload", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup-batches", type=int, default=20, help="ingested (committed) before measuring")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    statements = variants()
    result: dict[str, Any] = {
        "command": "python -m bench.post_batch_parts " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(["postgresql"]),
    }
    with tempfile.TemporaryDirectory() as tmp, database("postgresql", Path(tmp)) as url:
        engine = make_engine(url)
        factory = make_session_factory(engine)
        events = EventFactory(seed=3)
        raw = RawInserter(engine, "postgresql")
        with factory() as session:
            result["preload"] = preload(session, raw, events, args.preload, datetime.now(UTC))
        for _ in range(args.warmup_batches):  # rollups, accounts and transfers exist, as in a running service
            _timed_ingest(factory, events.events(BATCH, datetime.now(UTC)))
        samples: dict[str, list[float]] = {}
        for i in range(args.rounds + 1):
            got = one_round(factory, raw, events, statements)
            if i:  # the first round warms the caches
                for name, value in got.items():
                    samples.setdefault(name, []).append(value)
        raw.close()
        engine.dispose()
    us = {name: statistics.median(v) * 1e6 / BATCH for name, v in samples.items()}
    parts = {
        part: us["full"] - us[f"without_{part}"]
        for part in ("transfers", "hourly_rollups", "coarse_rollups", "accounts")
    }
    parts["read"] = us["read_only"]
    budget = us["raw_copy"] / TARGET_RATIO
    result["us_per_event_median"] = {k: round(v, 1) for k, v in us.items()}
    result["marginal_us_per_event"] = {k: round(v, 1) for k, v in parts.items()}
    serial = us["probe"] + us["pricing_and_rows"] + us["copy_of_priced_rows"]
    result["budget"] = {
        "raw_copy_us_per_event": round(us["raw_copy"], 1),
        "at_40_percent_ingest_may_take_us_per_event": round(budget, 1),
        "ingest_probe_and_streamed_copy_us_per_event": round(us["ingest_probe_and_streamed_copy"], 1),
        "probe_plus_pricing_plus_copy_one_after_the_other": round(serial, 1),
        "post_batch_us_per_event": round(us["full"], 1),
        "left_for_post_batch_after_probe_and_copy": round(budget - us["ingest_probe_and_streamed_copy"], 1),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
