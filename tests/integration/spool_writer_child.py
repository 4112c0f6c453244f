"""A bare spool writer to be killed: claims a slot and appends events in a loop, as fast as it can.

Prints ``ack <event_id>`` once ``Spool.append`` has returned (the event must survive a SIGKILL from then on).
With a database URL it also runs a flusher thread (``METERING_SPOOL__FLUSHER=thread``), which drains its own
slot and the slots of dead writers, racing the external drainers.

Usage: python -m tests.integration.spool_writer_child <spool_dir> <seed> [<database_url>]
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import orjson

from metering.spool import Flusher, Spool
from tests.fakes.events import record


def main(spool_dir: Path, seed: int, url: str | None) -> None:
    rng = random.Random(seed)
    spool = Spool(spool_dir, segment_bytes=4096).open()
    flusher = None
    if url is not None:
        from metering.db.engine import make_engine, make_session_factory
        from metering.spool import DatabaseSink

        flusher = Flusher(spool, DatabaseSink(make_session_factory(make_engine(url))), batch_size=7, interval_s=0.005)
        flusher.start()
    out = sys.stdout.fileno()
    os.write(out, f"slot {spool.slot_dir}\n".encode())
    n = 0
    while True:
        rec = record(n, user_id=f"seed-{seed}")
        spool.append(orjson.dumps(rec))
        os.write(out, f"ack {rec['event_id']}\n".encode())
        n += 1
        time.sleep(rng.random() * 0.02)  # ~100 events a second: a backlog the drainers keep up with
        if flusher is not None and rng.random() < 0.01:
            flusher.wake()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
