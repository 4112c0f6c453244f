"""``metering serve``: the HTTP service (uvicorn running the app factory)."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from enum import StrEnum
from typing import Annotated, Any

import typer

from metering.cli import demo_data
from metering.cli.common import fail
from metering.cli.demo import generate_with_progress
from metering.config import Settings
from metering.crypto import secret_box_from_settings
from metering.db import migrate as db_migrate
from metering.errors import MeteringError
from metering.metrics import MULTIPROCESS_DIR_ENV
from metering.spool.inspect import check_writable
from metering.wiring import open_services

APP_FACTORY = "metering.api.app:create_app"  # by name: the CLI never imports the API layer


def _public_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _seed_demo(host: str, port: int) -> None:
    """Generate the demo traffic into the database (spool drained), then print an admin token and the URLs."""
    settings = Settings()
    if settings.spool.sink != "database":  # the service is not up yet: the demo goes straight to the database
        settings = settings.model_copy(update={"spool": settings.spool.model_copy(update={"sink": "database"})})
    try:
        svc = open_services(settings)
    except MeteringError as exc:
        raise fail(exc.message) from None
    try:
        report = generate_with_progress(svc)
        secret = demo_data.create_admin_token(svc)
    except MeteringError as exc:
        raise fail(exc.message) from None
    finally:
        svc.close(drain=True)
    base = f"http://{_public_host(host)}:{port}"
    pending = "" if report.delivered else " (some events are still in the spool: they are delivered later)"
    rerun = f"{note}\n" if (note := report.rerun_note()) else ""
    typer.echo(
        f"Demo traffic: {report.summary()}{pending}.\n{rerun}"
        f"Database: {settings.resolved_database_url}\n\n"
        "Admin token (scopes ingest, read, admin; shown once, stored hashed):\n"
        f"  {secret}\n\n"
        f"  API docs  {base}/docs\n"
        f"  metrics   {base}/metrics\n"
        f"  usage     curl -H 'Authorization: Bearer {secret}' '{base}/v1/usage?{demo_data.usage_query()}'\n"
    )


class LogLevel(StrEnum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"


Address = tuple[socket.AddressFamily, tuple[Any, ...]]  # (family, the address bind() takes)


def _listen_addresses(host: str, port: int, workers: int) -> list[Address]:
    """The addresses uvicorn binds for ``host``:``port``. One worker: its event loop's ``create_server`` binds every
    address the host resolves to (``localhost`` is often ::1 and 127.0.0.1; ``""`` every interface). Several workers:
    ``Config.bind_socket`` binds one socket, IPv6 for a host with a ':' (a literal) and IPv4 otherwise, on the first
    address of that family (a ``localhost`` that resolves to ::1 first is bound on 127.0.0.1)."""
    if workers == 1:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        return list(dict.fromkeys((family, address) for family, _kind, _proto, _name, address in infos))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    first = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return [(first[0], first[4])]


def _check_port_free(host: str, port: int, workers: int) -> None:
    """Refuse at once a host that does not resolve or a port another process listens on (uvicorn would find out
    only after the demo's seeding), probing exactly the addresses uvicorn binds (``_listen_addresses``)."""
    try:
        addresses = _listen_addresses(host, port, workers)
    except OSError as exc:  # an unresolvable host: uvicorn failed on it only after the demo's seeding and token
        raise fail(f"cannot listen on {host}:{port}: {exc.strerror or exc} (check --host)") from None
    with ExitStack() as held:  # all bound at once, as uvicorn holds them
        for family, address in addresses:
            try:
                probe = held.enter_context(socket.socket(family, socket.SOCK_STREAM))
            except OSError:  # a family this machine lacks (IPv6 off): create_server skips it too
                continue
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            if family == socket.AF_INET6 and workers == 1:  # as create_server: beside an IPv4 socket on the port
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:  # in use (another --port), or no interface of this host has the address (--host)
                hint = "choose another with --port" if exc.errno == errno.EADDRINUSE else "check --host"
                raise fail(f"cannot listen on {host}:{port}: {exc.strerror or exc} ({hint})") from None


# With --workers > 1 uvicorn pings each worker every half second and kills (SIGKILL) one that does not answer within
# this; a worker answers once its interpreter has imported the app. uvicorn's default, 5 s, killed workers still
# starting on a busy host (and with slower imports no worker ever served): tests/integration/test_serve_slow_workers.py.
WORKER_HEALTHCHECK_TIMEOUT_S = 30


def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    migrate: Annotated[
        bool, typer.Option(help="Migrate the database to head first (use --no-migrate when a release step does).")
    ] = True,
    log_level: Annotated[LogLevel, typer.Option(help="uvicorn log level.")] = LogLevel.INFO,
    demo: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="First generate demo traffic into the database (bundled extensions through metered ctx.llm), "
            "create an admin token and print it with the URLs. Again adds more traffic.",
        ),
    ] = False,
) -> None:
    """Serve the HTTP API (POST /v1/events, /v1/usage, /healthz, /readyz, /metrics, /docs) with uvicorn."""
    import uvicorn  # only this command needs it

    # before migrating and seeding: never a token printed for a server that cannot start
    _check_port_free(host, port, workers)
    _check_metrics_dir()
    settings = Settings()
    try:
        # What the service reads on first use (an invoke, a BYOLLM key set): refused now, not by every such request.
        secret_box_from_settings(settings)
        check_writable(settings.spool_dir)
        if migrate:
            db_migrate.upgrade(settings.resolved_database_url)
    except MeteringError as exc:
        raise fail(exc.message) from None
    if demo:
        _seed_demo(host, port)
    with _shared_metrics(workers):
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level.value,
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_TIMEOUT_S,
        )


# prometheus_client's former name of the variable: it still reads it (deprecated) when the upper-case one is unset.
LEGACY_MULTIPROCESS_DIR_ENV = "prometheus_multiproc_dir"


def _check_metrics_dir() -> None:
    """The operator's own PROMETHEUS_MULTIPROC_DIR (or its former name) must be a directory this process can write
    its counters in: otherwise prometheus_client failed every /metrics and every POST /v1/events. The former name is
    then set under the current one, as prometheus_client does on first use, so that the app and the workers see it
    (only the current name was checked: a missing directory under the former one was a 500 for every batch)."""
    name = next((n for n in (MULTIPROCESS_DIR_ENV, LEGACY_MULTIPROCESS_DIR_ENV) if n in os.environ), None)
    if name is None:
        return
    shared = os.environ[name]
    if not os.path.isdir(shared):
        raise fail(f"{name}={shared} is not a directory: create it (empty) or unset the variable")
    if not os.access(shared, os.W_OK | os.X_OK):
        raise fail(f"{name}={shared} is not writable by this process: the counters are written there")
    os.environ[MULTIPROCESS_DIR_ENV] = shared


@contextmanager
def _shared_metrics(workers: int) -> Iterator[None]:
    """With several workers, a fresh directory for their ingest counters (prometheus_client's multiprocess mode,
    read by each worker from its start): whichever worker answers a scrape sums every worker's counts."""
    if workers == 1 or MULTIPROCESS_DIR_ENV in os.environ:  # one process; or the operator's own directory
        yield
        return
    with tempfile.TemporaryDirectory(prefix="metering-metrics-") as shared:
        os.environ[MULTIPROCESS_DIR_ENV] = shared  # the spawned workers inherit it
        try:
            yield
        finally:
            del os.environ[MULTIPROCESS_DIR_ENV]
