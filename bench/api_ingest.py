"""POST /v1/events throughput through ONE uvicorn worker (issue 4), against direct in-process ingest.

A fresh PostgreSQL database (``bench_api_<pid>``, dropped afterwards) migrated to head; an API token with the
``ingest`` scope from ``metering tokens create``; ``metering serve --workers 1 --no-migrate`` as a subprocess
on a free loopback port (``METERING_BILLING__MARKUP_PCT=20``). Variants, in interleaved rounds (order rotated
each round), on the same database, every batch ``--batch-size`` fresh realistic events from bench/ingest.py's
``EventFactory`` (the two variants of a round get the same events, with distinct event and invocation ids):
  http        ``--concurrency`` client threads, one httpx keep-alive connection each, pulling the round's
              pre-serialized bodies (``orjson.dumps({"events": [...]})`` before the clock starts) and POSTing
              them; events/s = the round's events / the round's wall time. Each request's latency is recorded.
  http_serial the same with one connection (info: the cost of HTTP at equal concurrency with ``direct``)
  direct      the baseline: ``ingest(session, <the JSON-decoded dicts>, markup_pct=20)`` + ``commit()`` in this
              process, one batch after the other (what the endpoint does, without HTTP, JSON parsing, auth
              and FastAPI)
Every response must be 200 with every event inserted. Then, unless ``--no-profile``, where the server's time
goes: the same app factory with stage timers (and cProfile for a second pass) patched in by this module
(``profiled_app``), run by uvicorn exactly as ``metering serve`` runs it, one request at a time. The CPU used
by other processes on the machine is sampled throughout (``other_processes``: a shared box skews every number).

Run:  .venv/bin/python -m bench.api_ingest [--rounds 10] [--batches 24] [--concurrency 4]
                                           [--out bench/out/api_ingest.json]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import os
import platform
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from bench.ingest import PG_ADMIN_URL, EventFactory, pg_conninfo
from bench.report import emit
from metering.billing.ingest import ingest
from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory
from metering.events import uuid7_str

ROOT = Path(__file__).resolve().parents[1]
MARKUP = Decimal(20)
TARGET_RATE = 20_000
VARIANTS = ("http", "http_serial", "direct")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- database, token, server (shared with bench/usage_query.py) --------------------------------------------


@contextmanager
def database(name: str, keep: bool = False) -> Iterator[tuple[str, str]]:
    """(SQLAlchemy URL, psycopg conninfo) of a fresh PostgreSQL database migrated to head; dropped afterwards."""
    with psycopg.connect(pg_conninfo(PG_ADMIN_URL), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
        text = url.render_as_string(hide_password=False)
        migrate.upgrade(text)
        yield text, pg_conninfo(PG_ADMIN_URL, name)
    finally:
        if not keep:
            with psycopg.connect(pg_conninfo(PG_ADMIN_URL), autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_env(db_url: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERING_", "ANTHROPIC_", "OPENAI_"))}
    env.update(
        METERING_DATABASE_URL=db_url,
        METERING_DATA_DIR=str(data_dir),
        METERING_BILLING__MARKUP_PCT=str(MARKUP),
        PYTHONPATH=str(ROOT),
    )
    return env


def metering_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "metering.cli.main", *args]


def create_token(env: dict[str, str], name: str, scopes: tuple[str, ...], tenant: str | None = None) -> str:
    """``metering tokens create`` (the secret is its stdout)."""
    args = ["tokens", "create", "--name", name]
    for scope in scopes:
        args += ["--scope", scope]
    if tenant:
        args += ["--tenant", tenant]
    done = subprocess.run(metering_cmd(*args), env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"metering tokens create failed: {done.stderr}")
    return done.stdout.strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(cmd: list[str], env: dict[str, str], port: int, log_path: Path) -> Iterator[str]:
    """A server subprocess on ``port``; yields its base URL once /readyz answers 200; SIGTERM afterwards."""
    base = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, cwd=ROOT)
        try:
            deadline = time.monotonic() + 90
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{base}/readyz not ready after 90 s")
                time.sleep(0.1)
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_cmd(port: int) -> list[str]:
    return metering_cmd(
        "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--no-migrate", "--log-level", "warning"
    )


class ContentionMonitor:
    """Samples, every ``interval`` s, the CPU used by processes outside this benchmark's process tree (other than
    PostgreSQL's, which serve this benchmark too): on a shared 2-core box, other work skews every number."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.samples: list[float] = []  # foreign CPU, % of one core
        self.top: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.tick = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _processes() -> dict[int, tuple[int, str, int]]:
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2 :].split()
            out[int(entry)] = (int(fields[1]), comm, int(fields[11]) + int(fields[12]))  # ppid, comm, utime+stime
        return out

    def _foreign(self, procs: dict[int, tuple[int, str, int]]) -> dict[int, tuple[str, int]]:
        mine = {os.getpid()}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _, _) in procs.items():
                if ppid in mine and pid not in mine:
                    mine.add(pid)
                    changed = True
        return {
            pid: (comm, ticks)
            for pid, (_, comm, ticks) in procs.items()
            if pid not in mine and not comm.startswith("postgres")
        }

    def _run(self) -> None:
        before = self._foreign(self._processes())
        while not self.stop_event.wait(self.interval):
            now = self._foreign(self._processes())
            used = 0.0
            for pid, (comm, ticks) in now.items():
                delta = (ticks - before[pid][1]) if pid in before else 0
                used += delta
                if delta:
                    self.top[comm] = self.top.get(comm, 0.0) + delta / self.tick
            self.samples.append(100.0 * used / self.tick / self.interval)
            before = now

    def __enter__(self) -> ContentionMonitor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()

    def summary(self) -> dict[str, Any]:
        samples = self.samples or [0.0]
        return {
            "samples": len(self.samples),
            "foreign_cpu_pct_of_a_core_mean": round(statistics.fmean(samples), 1),
            "foreign_cpu_pct_of_a_core_max": round(max(samples), 1),
            "samples_above_20pct": sum(1 for x in samples if x > 20),
            "top_foreign_cpu_s": {k: round(v, 1) for k, v in sorted(self.top.items(), key=lambda kv: -kv[1])[:5]},
        }


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def environment(conninfo: str) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "metering"], cwd=ROOT, capture_output=True, text=True)
        env["git_head"] = head.stdout.strip()
        env["metering_uncommitted_files"] = len(dirty.stdout.splitlines())
    except OSError:
        pass
    # Others may be editing the code: pin which code these numbers belong to.
    for name in ("events.py", "billing/ingest.py", "billing/store.py", "billing/usage_queries.py", "api/deps.py"):
        digest = hashlib.sha256((ROOT / "metering" / name).read_bytes()).hexdigest()[:12]
        env[f"sha256_{name.replace('/', '_').removesuffix('.py')}"] = digest
    env["loadavg"] = os.getloadavg()
    import fastapi
    import pydantic
    import uvicorn

    env.update(fastapi=fastapi.__version__, pydantic=pydantic.__version__, uvicorn=uvicorn.__version__)
    env["httpx"] = httpx.__version__
    with psycopg.connect(conninfo) as conn:
        env["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        for setting in ("shared_buffers", "work_mem", "synchronous_commit", "max_parallel_workers_per_gather"):
            env[f"pg_{setting}"] = conn.execute(f"SHOW {setting}").fetchone()[0]  # type: ignore[index]
    return env


# -- events ---------------------------------------------------------------------------------------------


def twin(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same events with fresh event ids and invocation ids (one per original invocation)."""
    invocations: dict[str, str] = {}
    out = []
    for rec in records:
        copy = dict(rec)
        copy["event_id"] = uuid7_str()
        copy["invocation_id"] = invocations.setdefault(rec["invocation_id"], uuid7_str())
        out.append(copy)
    return out


def make_round(factory: EventFactory, batches: int, size: int) -> tuple[list[bytes], list[list[dict[str, Any]]]]:
    """(HTTP bodies, direct batches as JSON-decoded dicts): the same events, distinct ids. Built untimed."""
    bodies, dicts = [], []
    for _ in range(batches):
        records = factory.records(size, datetime.now(UTC))
        bodies.append(orjson.dumps({"events": records}))
        dicts.append(orjson.loads(orjson.dumps(twin(records))))
    return bodies, dicts


# -- the variants -----------------------------------------------------------------------------------------


class HttpDriver:
    """``concurrency`` threads, each with its own keep-alive httpx client, POSTing pre-serialized bodies."""

    def __init__(self, base: str, secret: str, concurrency: int) -> None:
        self.base = base
        self.concurrency = concurrency
        self.headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        self.pool = ThreadPoolExecutor(concurrency)
        self.local = threading.local()

    def client(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = httpx.Client(base_url=self.base, headers=self.headers, timeout=120)
        return client

    def run(self, bodies: list[bytes], expect: int) -> tuple[float, list[float]]:
        """(wall seconds for all bodies, each request's latency in seconds)."""
        lock = threading.Lock()
        pending = list(reversed(bodies))
        latencies: list[float] = []

        def worker() -> None:
            client = self.client()
            while True:
                with lock:
                    if not pending:
                        return
                    body = pending.pop()
                start = time.perf_counter()
                response = client.post("/v1/events", content=body)
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    raise RuntimeError(f"POST /v1/events answered {response.status_code}: {response.text[:500]}")
                answer = orjson.loads(response.content)
                if answer["inserted"] != expect or answer["rejected"]:
                    raise RuntimeError(f"unexpected ingest result {str(answer)[:500]}")
                with lock:
                    latencies.append(elapsed)

        start = time.perf_counter()
        futures = [self.pool.submit(worker) for _ in range(self.concurrency)]
        for future in futures:
            future.result()
        return time.perf_counter() - start, latencies

    def close(self) -> None:
        def close_client() -> None:
            client = getattr(self.local, "client", None)
            if client is not None:
                client.close()

        for future in [self.pool.submit(close_client) for _ in range(self.concurrency)]:
            future.result()
        self.pool.shutdown()


def run_direct(factory: sessionmaker[Session], batches: list[list[dict[str, Any]]], expect: int) -> list[float]:
    """Each batch: ingest + commit, one after the other; returns each batch's seconds."""
    times = []
    for items in batches:
        with factory() as session:
            start = time.perf_counter()
            result = ingest(session, items, markup_pct=MARKUP)
            session.commit()
            times.append(time.perf_counter() - start)
        if result.inserted != expect or result.rejected:
            raise RuntimeError(f"direct ingest: {result.as_dict()}")
    return times


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": round(percentile(ordered, 0.50) * 1000, 1),
        "p90_ms": round(percentile(ordered, 0.90) * 1000, 1),
        "p99_ms": round(percentile(ordered, 0.99) * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 1),
    }


# -- the profiled server (stage timers + optional cProfile), started by --serve-profiled -------------------


class _Probe:
    """Stage wall times (ns, count) and per-thread cProfile profilers of the server process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stages: dict[str, list[int]] = {}
        self.profiling = False
        self.profilers: dict[int, cProfile.Profile] = {}
        self.local = threading.local()

    def add(self, stage: str, ns: int) -> None:
        with self.lock:
            entry = self.stages.setdefault(stage, [0, 0])
            entry[0] += ns
            entry[1] += 1

    def enter(self) -> None:
        depth = getattr(self.local, "depth", 0)
        self.local.depth = depth + 1
        if depth == 0 and self.profiling:
            ident = threading.get_ident()
            with self.lock:
                profiler = self.profilers.setdefault(ident, cProfile.Profile())
            self.local.profiler = profiler
            profiler.enable()

    def leave(self) -> None:
        self.local.depth -= 1
        if self.local.depth == 0:
            profiler = getattr(self.local, "profiler", None)
            if profiler is not None:
                profiler.disable()
                self.local.profiler = None

    def sync_stage(self, stage: str, func: Callable[..., Any], flag: str | None = None) -> Callable[..., Any]:
        clock = time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            if flag is not None and getattr(self.local, "skip_commit", False):
                return func(*args, **kwargs)
            self.enter()
            start = clock()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(stage, clock() - start)
                self.leave()

        return timed

    def async_stage(self, stage: str, func: Callable[..., Any]) -> Callable[..., Any]:
        clock = time.perf_counter_ns

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return await func(*args, **kwargs)
            finally:
                self.add(stage, clock() - start)

        return timed

    def top(self, n: int, requests: int, events: int) -> dict[str, Any]:
        stats: pstats.Stats | None = None
        for profiler in self.profilers.values():
            if stats is None:
                stats = pstats.Stats(profiler, stream=io.StringIO())
            else:
                stats.add(profiler)
        if stats is None:
            return {}
        rows = []
        for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            where = f"{Path(filename).name}:{line}" if line else filename
            rows.append((tottime, cumtime, ncalls, f"{func} ({where})"))
        total = sum(r[0] for r in rows)

        def fmt(r: tuple[float, float, int, str]) -> dict[str, Any]:
            return {
                "function": r[3],
                "calls_per_request": round(r[2] / requests, 2),
                "self_us_per_event": round(r[0] * 1e6 / events, 2),
                "cum_us_per_event": round(r[1] * 1e6 / events, 2),
                "self_share": round(r[0] / total, 3) if total else 0.0,
            }

        return {
            "profiled_self_us_per_event": round(total * 1e6 / events, 2),
            "top_self": [fmt(r) for r in sorted(rows, reverse=True)[:n]],
            "top_cumulative": [fmt(r) for r in sorted(rows, key=lambda r: r[1], reverse=True)[:n]],
        }


def profiled_app() -> Any:
    """``metering.api.app.create_app()`` with stage timers patched in, wrapped in an ASGI timer, plus the
    /__bench/* routes (stats, reset, profile on/off). Only for this benchmark's profiling pass."""
    import fastapi.dependencies.utils as fastapi_utils
    import fastapi.routing as fastapi_routing
    from sqlalchemy.orm import Session as OrmSession

    from metering.api import deps, tenancy
    from metering.api.app import create_app
    from metering.api.event_body import EventsRequest
    from metering.billing import ingest as ingest_module

    probe = _Probe()
    # POST /v1/events reads its body with EventsRequest.json: one pass of pydantic-core (parse + validate) for a
    # valid batch, else Starlette's Request.json (json.loads) inside it: one stage either way.
    EventsRequest.json = probe.async_stage("json_parse_validate", EventsRequest.json)  # type: ignore[method-assign]
    fastapi_utils.request_body_to_args = probe.async_stage("body_model_validation", fastapi_utils.request_body_to_args)
    fastapi_routing.serialize_response = probe.async_stage("response_serialization", fastapi_routing.serialize_response)
    principal = deps._principal

    def auth(*args: Any, **kwargs: Any) -> Any:
        probe.local.skip_commit = True  # its own commit counts as auth
        try:
            return principal(*args, **kwargs)
        finally:
            probe.local.skip_commit = False

    deps._principal = probe.sync_stage("auth", auth)
    tenancy.ingest = probe.sync_stage("ingest", tenancy.ingest)
    ingest_module.validate = probe.sync_stage("ingest.validate_pydantic", ingest_module.validate)
    OrmSession.commit = probe.sync_stage("commit", OrmSession.commit, flag="commit")  # type: ignore[method-assign]

    app = create_app()
    counters = {"requests": 0}

    async def stats() -> dict[str, Any]:
        return {"requests": counters["requests"], "stages": {k: list(v) for k, v in probe.stages.items()}}

    async def reset() -> dict[str, Any]:
        probe.stages.clear()
        counters["requests"] = 0
        return {"ok": True}

    async def profile_on() -> dict[str, Any]:
        probe.profilers.clear()
        probe.profiling = True
        return {"ok": True}

    async def profile_off(requests: int, events: int) -> dict[str, Any]:
        probe.profiling = False
        return probe.top(40, requests, events)

    app.add_api_route("/__bench/stats", stats, methods=["GET"])
    app.add_api_route("/__bench/reset", reset, methods=["POST"])
    app.add_api_route("/__bench/profile/on", profile_on, methods=["POST"])
    app.add_api_route("/__bench/profile/off", profile_off, methods=["POST"])

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/events":
            await app(scope, receive, send)
            return
        clock = time.perf_counter_ns
        waited = [0]

        async def timed_receive() -> Any:
            start = clock()
            try:
                return await receive()
            finally:
                waited[0] += clock() - start

        probe.enter()
        start = clock()
        try:
            await app(scope, timed_receive, send)
        finally:
            probe.add("request", clock() - start)
            probe.add("body_receive", waited[0])
            probe.leave()
            counters["requests"] += 1

    return asgi


def serve_profiled(port: int) -> None:
    import uvicorn

    # As `metering serve` runs the app (serve_cmd.py), with this module's factory.
    uvicorn.run(
        "bench.api_ingest:profiled_app", factory=True, host="127.0.0.1", port=port, workers=1, log_level="warning"
    )


STAGE_ORDER = (
    "body_receive",
    "json_parse_validate",
    "body_model_validation",
    "auth",
    "ingest",
    "commit",
    "response_serialization",
)


def breakdown(stats: dict[str, Any], events: int) -> dict[str, Any]:
    """Stage wall times per event and per request (serial: a clean split; concurrent: includes GIL waits)."""
    stages = stats["stages"]
    us = {name: stages.get(name, [0, 0])[0] / 1000 / events for name in (*STAGE_ORDER, "ingest.validate_pydantic")}
    total = stages["request"][0] / 1000 / events
    out = {name: us[name] for name in STAGE_ORDER}
    out["ingest.validate_pydantic (inside ingest)"] = us["ingest.validate_pydantic"]
    out["ingest without validation"] = us["ingest"] - us["ingest.validate_pydantic"]
    out["framework/other"] = total - sum(us[name] for name in STAGE_ORDER)
    out["request total"] = total
    requests = max(1, stats["requests"])
    return {
        "requests": stats["requests"],
        "us_per_event": {k: round(v, 2) for k, v in out.items()},
        "ms_per_request": {k: round(v * events / requests / 1000, 3) for k, v in out.items()},
        "share": {k: round(v / total, 3) for k, v in out.items() if k != "request total"},
    }


def profile_pass(
    env: dict[str, str], workdir: Path, secret: str, factory: EventFactory, args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.api_ingest", "--serve-profiled", str(port)]
    size = args.batch_size
    with server(cmd, env, port, workdir / "serve-profiled.log") as base:
        driver = HttpDriver(base, secret, 1)
        try:
            with httpx.Client(base_url=base, timeout=60) as control:
                bodies, _ = make_round(factory, 4, size)
                driver.run(bodies, size)  # warm-up
                result: dict[str, Any] = {}
                for label, concurrency in (("serial", 1), (f"concurrency_{args.concurrency}", args.concurrency)):
                    control.post("/__bench/reset")
                    bodies, _ = make_round(factory, args.profile_batches, size)
                    gc.collect()
                    run_driver = driver if concurrency == 1 else HttpDriver(base, secret, concurrency)
                    wall, _lat = run_driver.run(bodies, size)
                    if run_driver is not driver:
                        run_driver.close()
                    events = len(bodies) * size
                    result[label] = breakdown(control.get("/__bench/stats").json(), events)
                    result[label]["events_per_s_while_timed"] = round(events / wall)
                # The fixed cost of a request: 1-event batches, serial.
                control.post("/__bench/reset")
                bodies, _ = make_round(factory, args.profile_batches, 1)
                driver.run(bodies, 1)
                tiny = breakdown(control.get("/__bench/stats").json(), len(bodies))
                result["one_event_requests_serial"] = {
                    "requests": tiny["requests"],
                    "ms_per_request": tiny["ms_per_request"],
                }
                # cProfile: serial, its own batches
                bodies, _ = make_round(factory, args.profile_batches, size)
                control.post("/__bench/profile/on")
                driver.run(bodies, size)
                events = len(bodies) * size
                top = control.post("/__bench/profile/off", params={"requests": len(bodies), "events": events}).json()
                result["cprofile_serial"] = {"requests": len(bodies)} | top
        finally:
            driver.close()
    return result


# -- the run ----------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    name = f"bench_api_{os.getpid()}"
    with database(name) as (db_url, conninfo):
        env = server_env(db_url, workdir)
        environment_info = environment(conninfo)
        secret = create_token(env, "api-bench", ("ingest", "read"))
        engine = make_engine(db_url)
        sessions = make_session_factory(engine)
        factory = EventFactory(seed=4)
        size, batches = args.batch_size, args.batches
        port = free_port()
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}  # per-round wall seconds
        latencies: dict[str, list[float]] = {v: [] for v in VARIANTS}
        started = time.perf_counter()
        with server(serve_cmd(port), env, port, workdir / "serve.log") as base:
            drivers = {"http": HttpDriver(base, secret, args.concurrency), "http_serial": HttpDriver(base, secret, 1)}
            try:
                log(f"server up at {base}; warm-up")
                for _ in range(args.warmup_rounds):
                    bodies, dicts = make_round(factory, args.concurrency * 2, size)
                    drivers["http"].run(bodies, size)
                    bodies, _ = make_round(factory, 2, size)
                    drivers["http_serial"].run(bodies, size)
                    run_direct(sessions, dicts[:4], size)
                gc.collect()
                for r in range(args.rounds):
                    order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
                    for variant in order:
                        bodies, dicts = make_round(factory, batches, size)
                        gc.collect()
                        if variant == "direct":
                            per_batch = run_direct(sessions, dicts, size)
                            times[variant].append(sum(per_batch))
                            latencies[variant] += per_batch
                        else:
                            wall, lat = drivers[variant].run(bodies, size)
                            times[variant].append(wall)
                            latencies[variant] += lat
                    rates = {v: round(batches * size / times[v][-1]) for v in VARIANTS}
                    log(f"round {r + 1}/{args.rounds}: events/s {rates}")
            finally:
                for driver in drivers.values():
                    driver.close()
        wall = time.perf_counter() - started
        with psycopg.connect(conninfo) as conn:
            stored = conn.execute("SELECT count(*) FROM usage_events").fetchone()[0]  # type: ignore[index]
            rollup_calls = conn.execute("SELECT coalesce(sum(calls), 0) FROM usage_rollups").fetchone()[0]  # type: ignore[index]
            balance = conn.execute("SELECT coalesce(sum(balance_nanos), 0) FROM accounts").fetchone()[0]  # type: ignore[index]
        profile = None if args.no_profile else profile_pass(env, workdir, secret, factory, args)
        engine.dispose()

    events = args.rounds * batches * size
    variants: dict[str, Any] = {}
    for v in VARIANTS:
        total = sum(times[v])
        variants[v] = {
            "events": events,
            "events_per_s": round(events / total),
            "round_events_per_s_min": round(batches * size / max(times[v])),
            "round_events_per_s_max": round(batches * size / min(times[v])),
            ("request_latency" if v != "direct" else "batch_latency"): latency_summary(latencies[v]),
        }
    variants["http"]["concurrency"] = args.concurrency
    variants["http_serial"]["concurrency"] = 1
    rate = {v: variants[v]["events_per_s"] for v in VARIANTS}
    ratios = {
        "http_over_direct": round(rate["http"] / rate["direct"], 3),
        "http_serial_over_direct": round(rate["http_serial"] / rate["direct"], 3),
        "http_serial_overhead_us_per_event": round((1 / rate["http_serial"] - 1 / rate["direct"]) * 1e6, 2),
    }
    targets = [
        {
            "target": f"POST /v1/events >= {TARGET_RATE:,} events/s (one worker, {args.concurrency} connections)",
            "value": rate["http"],
            "result": "PASS" if rate["http"] >= TARGET_RATE else "FAIL",
        }
    ]
    # every measured event, warm-up and profiling batches were stored once (rollups count them all)
    checks = {
        "every_response_200_all_inserted": True,  # the drivers raise otherwise
        "rollup_calls_equal_stored_events": int(rollup_calls) == int(stored),
        "balances_sum_to_zero": int(balance) == 0,
    }
    return {
        "environment": environment_info,
        "batch_size": size,
        "batches_per_round": batches,
        "rounds": args.rounds,
        "measured_wall_s": round(wall, 1),
        "variants": variants,
        "ratios": ratios,
        "targets": targets,
        "stored_events_after_measurement": int(stored),
        "checks": checks,
        **({"server_breakdown": profile} if profile else {}),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batches", type=int, default=24, help="batches per variant per round")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4, help="client connections of the http variant")
    parser.add_argument("--warmup-rounds", type=int, default=2)
    parser.add_argument("--profile-batches", type=int, default=30, help="batches per profiling pass")
    parser.add_argument("--no-profile", action="store_true", help="skip the server-side breakdown")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--serve-profiled", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_profiled:
        serve_profiled(args.serve_profiled)
        return
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": "python -m bench.api_ingest " + " ".join(sys.argv[1:] if argv is None else argv)
    }
    with tempfile.TemporaryDirectory() as tmp, ContentionMonitor() as monitor:
        result |= measure(args, Path(tmp))
    result["other_processes"] = monitor.summary()
    result["total_wall_s"] = round(time.perf_counter() - started, 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
