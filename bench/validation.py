"""Per-event validation cost of ``POST /v1/events`` bodies, in-process (no HTTP, no database).

``--events`` (5,000) realistic events from bench/ingest.py's ``EventFactory``, serialized with orjson as one body
``{"events": [...]}``. Variants, interleaved (each pass times every variant once, in turn), µs per event, median
of ``--passes`` (7) after 2 untimed warm-up passes:
  model_validate      ``UsageEvent.model_validate`` of each JSON-decoded dict (decoding not timed; each event is
                      dropped at once, as in bench/RESULTS.md's table: keeping 5,000 of them costs ≈ 3 µs more
                      per event in allocation and GC, which the three variants below pay alike)
  per_item            the per-item path: ``json.loads(body)`` + ``EventBatch`` (items not validated) +
                      ``event_from_record`` per item, as FastAPI + ingest's ``validate`` did before the one-pass path
  one_pass            ``EventsRequest.json()`` on the body (``model_validate_json`` of the whole batch in
                      pydantic-core) + ``EventBatch``
  one_pass_invalid    the same body with its last event invalid: the one-pass attempt fails on it, then the
                      per-item path (``json.loads`` + ``EventBatch`` + ``event_from_record`` per item) runs
With ``--baseline-rev REV``, ``model_validate`` and ``per_item`` are also timed with ``metering/events.py`` as of
that git revision (``model_validate@REV``, ``per_item@REV``), loaded as a separate module: e.g. 1a461d1, before
the text constraints were reordered (``per_item@1a461d1`` is then the endpoint's validation as it was).

Run:  .venv/bin/python -m bench.validation [--events 5000] [--passes 7] [--baseline-rev 1a461d1]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.ingest import EventFactory
from metering.api.event_body import EventsRequest
from metering.api.schemas import EventBatch
from metering.events import UsageEvent, event_from_record


def _request(body: bytes) -> EventsRequest:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return EventsRequest({"type": "http", "method": "POST", "path": "/v1/events", "headers": []}, receive)


_loop = asyncio.new_event_loop()


def _one_pass(body: bytes) -> list[Any]:
    """What the endpoint gets: ``EventsRequest.json()``, then FastAPI's ``EventBatch`` (items not validated)."""
    return EventBatch.model_validate(_loop.run_until_complete(_request(body).json())).events


def _per_item(body: bytes, model: type[UsageEvent] = UsageEvent) -> list[Any]:
    return [model.model_validate(item) for item in EventBatch.model_validate(json.loads(body)).events]


def _one_pass_invalid(body: bytes) -> list[Any]:
    out: list[Any] = []
    for item in _one_pass(body):  # the one-pass attempt failed: the JSON items, validated one by one by ingest
        try:
            out.append(event_from_record(item))
        except ValueError:  # pydantic's ValidationError
            out.append(None)
    return out


def _model_at(rev: str) -> type[UsageEvent]:
    source = subprocess.run(["git", "show", f"{rev}:metering/events.py"], capture_output=True, text=True, check=True)
    path = Path(tempfile.mkdtemp()) / f"events_{rev}.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location(f"events_{rev}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    model: type[UsageEvent] = module.UsageEvent
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--baseline-rev", help="also time UsageEvent.model_validate of metering/events.py at REV")
    args = parser.parse_args()

    records = EventFactory(args.seed).records(args.events, datetime.now(UTC))
    body = orjson.dumps({"events": records})
    dicts = orjson.loads(body)["events"]
    invalid = orjson.dumps({"events": [*records[:-1], records[-1] | {"input_tokens": -1}]})

    def validate_each(model: type[UsageEvent]) -> None:
        for d in dicts:
            model.model_validate(d)

    variants: dict[str, Callable[[], Any]] = {"model_validate": lambda: validate_each(UsageEvent)}
    if args.baseline_rev:
        old = _model_at(args.baseline_rev)
        variants[f"model_validate@{args.baseline_rev}"] = lambda: validate_each(old)
        variants[f"per_item@{args.baseline_rev}"] = lambda: _per_item(body, old)
    variants |= {
        "per_item": lambda: _per_item(body),
        "one_pass": lambda: _one_pass(body),
        "one_pass_invalid": lambda: _one_pass_invalid(invalid),
    }

    # The paths must agree before they are timed.
    assert _one_pass(body) == _per_item(body), "one-pass and per-item events differ"
    assert not _request(invalid).events_validated and _one_pass_invalid(invalid)[-1] is None

    timings: dict[str, list[float]] = {name: [] for name in variants}
    for n in range(2 + args.passes):
        for name, run in variants.items():
            gc.collect()
            start = time.perf_counter_ns()
            run()
            elapsed = time.perf_counter_ns() - start
            if n >= 2:
                timings[name].append(elapsed / 1000 / args.events)
    print(f"{args.events} events, {len(body) / 1e6:.2f} MB body, median of {args.passes} passes, µs per event")
    for name, values in timings.items():
        print(f"  {name:32s} {statistics.median(values):6.2f}   (min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
