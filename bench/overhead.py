"""Metering overhead of ctx.llm.create_message, against an unwrapped call and an OpenTelemetry span.

Each variant calls the simulated provider at zero latency with the same request on one event loop:
  raw               provider.complete(request)                                (the baseline)
  metered_thread    MeteredLLM.create_message(...) appending every event to a real on-disk Spool, the
                    Flusher thread delivering to SQLite in this process (the embedded default)
  metered_external  the same, with `metering spool drain --follow` delivering from its own process
                    (METERING_SPOOL__FLUSHER=external)
  otel              provider.complete(request) inside an OpenTelemetry SDK span carrying the gen_ai.*
                    usage attributes, BatchSpanProcessor + InMemorySpanExporter
Variants are interleaved in rounds so drift hits all of them alike. Overhead = variant - raw, per
percentile. Then the throughput of 64 concurrent callers on one event loop (metered and raw).

Run:  .venv/bin/python -m bench.overhead [--calls 100000] [--out bench/out/overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.report import emit
from metering.config import SimulatedSettings
from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory
from metering.db.event_store import count_events
from metering.events import uuid7
from metering.llm.client import MeteredLLM
from metering.llm.event_record import CallScope
from metering.llm.pool import ProviderPool
from metering.llm.providers import make_provider
from metering.llm.providers.base import ProviderConfig
from metering.llm.resolution import PlatformLLM
from metering.llm.settings_source import InMemorySettings
from metering.llm.types import ProviderRequest
from metering.spool import DatabaseSink, Flusher, Spool
from metering.spool.segments import READER_LOCK_NAME, read_cursor
from metering.spool.writer import try_lock

SYSTEM = "Rewrite the following text in a casual, conversational tone. Preserve all factual content."
TEXT = "Per our previous conversation, attached please find the document for your perusal."
MESSAGES = [{"role": "user", "content": TEXT}]
MODEL = "claude-sonnet-4-6"
WARMUP = 2_000


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)
    return {
        "p50_us": ordered[n // 2] / 1000,
        "p99_us": ordered[min(n - 1, int(n * 0.99))] / 1000,
        "mean_us": statistics.fmean(ordered) / 1000,
    }


async def timed(call: Callable[[], Awaitable[Any]], n: int, out: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        await call()
        out.append(clock() - start)


def make_otel_call(
    provider: Any, request: ProviderRequest
) -> tuple[Callable[[], Awaitable[Any]], TracerProvider, InMemorySpanExporter]:
    tracer_provider = TracerProvider()
    exporter = InMemorySpanExporter()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = tracer_provider.get_tracer("bench")

    async def call() -> Any:
        with tracer.start_as_current_span("chat claude-sonnet-4-6") as span:
            span.set_attribute("gen_ai.operation.name", "chat")
            span.set_attribute("gen_ai.system", "anthropic")
            span.set_attribute("gen_ai.request.model", MODEL)
            span.set_attribute("gen_ai.request.max_tokens", 1500)
            result = await provider.complete(request)
            span.set_attribute("gen_ai.response.model", result.model)
            span.set_attribute("gen_ai.response.finish_reasons", [result.stop_reason or ""])
            span.set_attribute("gen_ai.usage.input_tokens", result.usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", result.usage.output_tokens)
            span.set_attribute("gen_ai.usage.cache_read.input_tokens", result.usage.cache_read_tokens)
            span.set_attribute("gen_ai.usage.cache_creation.input_tokens", result.usage.cache_write_tokens)
            span.set_attribute("app.purpose", "content_rewrite")
            span.set_attribute("app.extension", "rewrite")
            span.set_attribute("app.user_id", "user-1")
            span.set_attribute("app.tenant_id", "tenant-1")
            span.set_attribute("app.is_byollm", False)
        return result

    return call, tracer_provider, exporter


async def concurrent_throughput(call: Callable[[], Awaitable[Any]], callers: int, per_caller: int) -> float:
    async def worker() -> None:
        for _ in range(per_caller):
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(callers)))
    return callers * per_caller / (time.perf_counter() - start)


class MeteredSetup:
    """One metered ``ctx.llm`` over its own spool and SQLite database.

    ``thread``: the Flusher runs as a thread in this process (the embedded default).
    ``external``: ``metering spool drain --follow`` runs as a separate process and delivers the spool.
    """

    def __init__(self, workdir: Path, mode: str, provider: Any, interval_s: float) -> None:
        self.mode = mode
        self.db_url = f"sqlite:///{workdir / f'{mode}.db'}"
        migrate.upgrade(self.db_url)
        self.engine = make_engine(self.db_url)
        self.spool_dir = workdir / f"spool-{mode}"
        self.spool = Spool(self.spool_dir).open()
        self.flusher: Flusher | None = None
        self.drainer: subprocess.Popen[bytes] | None = None
        if mode == "thread":
            sink = DatabaseSink(make_session_factory(self.engine))
            self.flusher = Flusher(self.spool, sink, batch_size=1000, interval_s=interval_s).start()
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
            env.update(
                METERING_DATABASE_URL=self.db_url,
                METERING_SPOOL__DIR=str(self.spool_dir),
                METERING_SPOOL__BATCH_SIZE="1000",
                METERING_SPOOL__FLUSH_INTERVAL_S=str(interval_s),
            )
            cmd = [sys.executable, "-m", "metering.cli.main", "spool", "drain", "--follow"]
            self.drainer = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        self.llm = MeteredLLM(
            scope=CallScope("tenant-1", "user-1", "rewrite", "rewrite", uuid7()),
            settings=InMemorySettings(),
            platform=PlatformLLM(provider="anthropic", model=MODEL),  # no key: simulated, as embedded
            providers=ProviderPool(lambda cfg: provider),
            recorder=self.spool,
        )

    def call(self) -> Awaitable[Any]:
        return self.llm.create_message(system=SYSTEM, messages=MESSAGES, max_tokens=1500, purpose="content_rewrite")

    def wait_delivered(self, timeout: float = 300.0) -> bool:
        """Wait (untimed) until the spool's cursor passed every append, whoever delivers it."""
        if self.flusher is not None:
            return self.flusher.flush(timeout)
        assert self.spool.slot_dir is not None
        target, deadline = self.spool.position(), time.monotonic() + timeout
        while (cursor := read_cursor(self.spool.slot_dir)) and (cursor.segment, cursor.offset) < (
            target.segment,
            target.offset,
        ):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def wait_claimed(self, timeout: float = 60.0) -> None:
        """Wait until the drainer process holds the slot's reader lock."""
        assert self.spool.slot_dir is not None
        deadline = time.monotonic() + timeout
        while (fd := try_lock(self.spool.slot_dir / READER_LOCK_NAME)) is not None:
            os.close(fd)
            if time.monotonic() > deadline:
                raise RuntimeError("the drainer process did not claim the spool")
            time.sleep(0.05)

    def close(self) -> int:
        drained = self.wait_delivered()
        if self.flusher is not None:
            self.flusher.stop()
        if self.drainer is not None:
            self.drainer.send_signal(signal.SIGTERM)
            self.drainer.wait(timeout=120)
        self.spool.close()
        with make_session_factory(self.engine)() as session:
            stored = count_events(session)
        self.engine.dispose()
        return stored if drained else -1


async def run(calls: int, rounds: int, workdir: Path, interval_s: float) -> dict[str, Any]:
    provider = make_provider(ProviderConfig(provider="simulated", model=MODEL), SimulatedSettings())
    request = ProviderRequest(model=MODEL, system=SYSTEM, messages=MESSAGES, max_tokens=1500)
    setups = {"metered_thread": MeteredSetup(workdir, "thread", provider, interval_s)}
    setups["metered_external"] = MeteredSetup(workdir, "external", provider, interval_s)
    await asyncio.to_thread(setups["metered_external"].wait_claimed)

    def raw() -> Awaitable[Any]:
        return provider.complete(request)

    otel, tracer_provider, exporter = make_otel_call(provider, request)
    variants: dict[str, Callable[[], Awaitable[Any]]] = {
        "raw": raw,
        "metered_thread": setups["metered_thread"].call,
        "metered_external": setups["metered_external"].call,
        "otel": otel,
    }
    samples: dict[str, list[int]] = {name: [] for name in variants}
    per_round = calls // rounds
    for call in variants.values():  # warm-up
        await timed(call, WARMUP, [])
    for setup in setups.values():
        setup.wait_delivered()
    gc.collect()
    for _ in range(rounds):
        for name, call in variants.items():
            await timed(call, per_round, samples[name])
            # Untimed: let background delivery catch up so it never bleeds into another variant's round.
            if name in setups:
                setups[name].wait_delivered()
            tracer_provider.force_flush()
            exporter.clear()

    stats = {name: percentiles(s) | {"calls": len(s)} for name, s in samples.items()}
    base = stats["raw"]
    for name in ("metered_thread", "metered_external", "otel"):
        for key in ("p50_us", "p99_us", "mean_us"):
            stats[name][f"overhead_{key}"] = round(stats[name][key] - base[key], 3)
    otel_p50 = stats["otel"]["overhead_p50_us"]
    ratios = {name: round(stats[name]["overhead_p50_us"] / otel_p50, 3) for name in setups}

    throughput = {"raw_calls_per_s": round(await concurrent_throughput(raw, 64, 500))}
    for name, setup in setups.items():
        start = time.perf_counter()
        throughput[f"{name}_calls_per_s"] = round(await concurrent_throughput(setup.call, 64, 500))
        setup.wait_delivered()
        # Sustained: until every one of those events is in the database (what the host can keep up).
        throughput[f"{name}_delivered_per_s"] = round(64 * 500 / (time.perf_counter() - start))
    tracer_provider.shutdown()
    metered_calls = WARMUP + per_round * rounds + 64 * 500
    stored = {name: setup.close() for name, setup in setups.items()}
    return {
        "calls_per_variant": calls,
        "rounds": rounds,
        "variants": stats,
        "p50_overhead_ratio_to_otel": ratios,
        "throughput_64_callers": throughput,
        "events_metered_per_variant": metered_calls,
        "events_stored": stored,
        "every_event_stored_once": all(n == metered_calls for n in stored.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=0.2,
        help="flusher/drainer interval (s); 0.2 delivers during the timed rounds, e.g. 5 mostly between them",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args.calls, args.rounds, Path(tmp), args.flush_interval))
        result["flush_interval_s"] = args.flush_interval
    emit(result, args.out)


if __name__ == "__main__":
    main()
