"""The `metering` command and `metering serve` as subprocesses, for the tests that need the real thing: a clean
environment, free loopback ports, tokens from `metering tokens create`, readiness, and a stop that always runs
(SIGTERM, then SIGKILL after a timeout)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metering_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "metering.cli.main", *args]


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without metering settings or provider keys, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERING_", "ANTHROPIC_", "OPENAI_"))}
    env.update(settings)
    return env


def metering(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(metering_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def create_token(env: dict[str, str], *scopes: str, name: str = "test") -> str:
    """``metering tokens create`` with these scopes; its secret (stdout)."""
    done = metering(env, "tokens", "create", "--name", name, *(arg for s in scopes for arg in ("--scope", s)))
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip()
    assert secret.startswith("mtr_"), done.stdout
    return secret


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL to its whole process group (``serving`` starts one per server, so uvicorn's workers
    go too) if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the group id is still ours
        proc.wait()


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    """Until ``url`` answers 200; fails with the log's tail if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout}s:\n{log.read_text()[-4000:]}")


@dataclass(frozen=True)
class Server:
    base: str
    proc: subprocess.Popen[bytes]
    out: Path  # stdout
    err: Path  # stderr (uvicorn's log)


@contextmanager
def serving(
    env: dict[str, str], log_dir: Path, *args: str, name: str = "serve", port: int | None = None, timeout: float = 90
) -> Iterator[Server]:
    """``metering serve --port <port, default a free one> *args``; yields once ``/readyz`` answers 200; stops it on
    exit."""
    port = port or free_port()
    out, err = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            metering_cmd("serve", "--host", "127.0.0.1", "--port", str(port), *args),
            env=env, stdout=stdout, stderr=stderr, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        try:
            server = Server(f"http://127.0.0.1:{port}", proc, out, err)
            wait_ready(f"{server.base}/readyz", proc, err, timeout)
            yield server
        finally:
            stop(proc)


def assert_clean_shutdown(server: Server) -> None:
    """uvicorn shut down gracefully (recent uvicorn re-raises SIGTERM afterwards, so -SIGTERM is clean too)."""
    log = server.err.read_text()
    assert server.proc.returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log and "Traceback" not in log
