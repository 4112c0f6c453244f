"""One ingesting process for the concurrency test: ingests a JSON-lines file of events in shuffled,
overlapping batches, waits for a start signal file so both processes race, prints its totals as JSON.

Usage: python -m tests.integration.ingest_child <database_url> <events.jsonl> <seed> <start-file>
"""

from __future__ import annotations

import json
import random
import sys
import time
from decimal import Decimal
from pathlib import Path

import orjson

from metering.billing.ingest import ingest
from metering.db.engine import make_engine, make_session_factory


def main(url: str, path: Path, seed: int, start_file: Path) -> None:
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    rng = random.Random(seed)
    sessions = make_session_factory(make_engine(url))
    batches = []
    for _ in range(3):  # every event three times, in different overlapping batches
        order = records[:]
        rng.shuffle(order)
        size = rng.randint(20, 80)
        batches += [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(batches)
    while not start_file.exists():
        time.sleep(0.005)
    inserted = duplicates = 0
    for batch in batches:
        for attempt in range(20):
            try:
                with sessions() as session:
                    result = ingest(session, batch, markup_pct=Decimal(20))
                    session.commit()
                break
            except Exception as exc:  # a serialization failure or deadlock would be a bug: report it
                print(json.dumps({"error": repr(exc), "attempt": attempt}), file=sys.stderr)
                time.sleep(0.05)
        else:
            raise SystemExit("gave up")
        inserted += result.inserted
        duplicates += result.duplicates
    print(json.dumps({"inserted": inserted, "duplicates": duplicates}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
