"""Directories an operator configured that cannot be used (a path under a regular file: unusable even by root) are
one error line at once, through the real CLI: never a traceback, never a service started that fails later."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from metering.crypto import generate_key
from tests.integration.test_cli import bare_env, metering, one_error_line

pytestmark = pytest.mark.slow


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize("command", [["spool", "status"], ["spool", "drain", "--timeout", "1"], ["spool", "redrive"]])
@pytest.mark.parametrize("under", [False, True])
def test_a_spool_dir_that_is_no_directory_is_one_error_line(tmp_path, a_file, command, under) -> None:
    """`spool status`, `drain` and `redrive` listed the spool directory unguarded: a traceback
    (NotADirectoryError), `drain` after a retry loop of its flusher first."""
    spool_dir = a_file / "spool" if under else a_file
    env = bare_env(tmp_path, METERING_SPOOL__DIR=str(spool_dir))
    error = one_error_line(metering(command, env))
    assert f"cannot read the spool at {spool_dir}" in error, error


def test_a_data_dir_the_dev_key_cannot_be_written_to_is_one_error_line(tmp_path, a_file) -> None:
    """In env=dev without METERING_SECRET_KEYS the key is generated into the data dir: a data dir that cannot be
    created was a traceback (NotADirectoryError) from every command that needs the key."""
    env = bare_env(tmp_path, METERING_DATA_DIR=str(a_file / "data"), METERING_DATABASE_URL=f"sqlite:///{tmp_path}/m.db")
    for command in (["byollm", "show", "--user", "u1"], ["keys", "rotate"]):
        error = one_error_line(metering(command, env))
        assert "cannot write the dev secret key" in error and "METERING_SECRET_KEYS" in error, error


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`metering serve` that must refuse to start: one that started anyway is stopped by the timeout (a failure)."""
    args = [sys.executable, "-m", "metering.cli.main", "serve", "--port", str(free_port())]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # Which key and what a key is (was ": ValueError"), never the value.
        ({"METERING_SECRET_KEYS": "not-a-fernet-key"}, "invalid Fernet key in METERING_SECRET_KEYS: key 1 of 1 is not"),
        ({"METERING_SECRET_KEYS": f"{generate_key()},short"}, "METERING_SECRET_KEYS: key 2 of 2 is not 32 url-safe"),
        ({"METERING_SPOOL__DIR": "{a_file}/spool"}, "cannot open the spool at"),
        # prometheus_client's directory (the operator's own): every /metrics and, after its batch committed, every
        # POST /v1/events was a 500 ('env PROMETHEUS_MULTIPROC_DIR is not set or not a directory').
        ({"PROMETHEUS_MULTIPROC_DIR": "{tmp_path}/no-such-dir"}, "PROMETHEUS_MULTIPROC_DIR={tmp_path}/no-such-dir"),
        ({"PROMETHEUS_MULTIPROC_DIR": "{a_file}"}, "PROMETHEUS_MULTIPROC_DIR={a_file} is not a directory"),
        # its former name, which prometheus_client still reads: only the current one was checked
        ({"prometheus_multiproc_dir": "{tmp_path}/no-such-dir"}, "prometheus_multiproc_dir={tmp_path}/no-such-dir"),
    ],
)
def test_serve_refuses_to_start_with_unusable_keys_or_spool(db_url, tmp_path, a_file, setting, message) -> None:
    """The service started, answered /healthz and /readyz, and only failed each invoke (500 config_error: the keys
    are read on first use; 503 spool_error) or scrape: a half-started service. Checked before it listens now."""
    settings = {name: value.format(a_file=a_file, tmp_path=tmp_path) for name, value in setting.items()}
    env = bare_env(tmp_path, METERING_DATABASE_URL=db_url, **settings)
    error = one_error_line(serve(env))
    assert message.format(a_file=a_file, tmp_path=tmp_path) in error, error
    assert "not-a-fernet-key" not in error  # a key is never echoed


@pytest.fixture
def read_only_spool(tmp_path: Path) -> Iterator[Path]:
    """A spool of 30 events, then on a read-only filesystem (a bind mount remounted read-only: root only), as after
    ext4 remounted its disk read-only on an error."""
    import orjson

    from metering.spool import Spool
    from tests.fakes.events import record

    spooled = tmp_path / "spooled"
    with Spool(spooled) as spool:
        for i in range(30):
            spool.append(orjson.dumps(record(i)))
    mount = tmp_path / "data" / "spool"
    mount.mkdir(parents=True)
    for args in (["--bind", str(spooled)], ["-o", "remount,ro,bind"]):
        done = subprocess.run(["mount", *args, str(mount)], capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
            pytest.skip(f"cannot mount the spool read-only here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_read_only_spool_is_shown_by_status_and_refused_by_drain_in_one_error_line(
    tmp_path: Path, read_only_spool: Path
) -> None:
    """`spool status` probed each slot's writer lock by opening it for writing (creating it if absent): on a
    read-only filesystem, or as a user who may only read the spool, a traceback (OSError: Read-only file system)
    instead of the table; `spool drain` could take no slot, waited to its timeout and ended in the same traceback.
    Status now probes the lock read-only; a drain says at once that it cannot write the spool."""
    env = bare_env(
        tmp_path, METERING_DATA_DIR=str(tmp_path / "data"), METERING_DATABASE_URL=f"sqlite:///{tmp_path}/m.db"
    )
    status = metering(["spool", "status"], env)
    assert status.returncode == 0, status.stderr
    assert "writer-0" in status.stdout and "pending=30 rejected=0" in status.stdout, status.stdout
    error = one_error_line(metering(["spool", "drain", "--timeout", "5"], env))
    assert f"cannot deliver the spool at {read_only_spool}" in error and "Read-only file system" in error, error


def test_a_spool_another_user_wrote_is_one_error_line_from_status(tmp_path: Path) -> None:
    """A writer creates every file of its slot 0600 (its lock, segments and cursor): `spool status` run by another user
    (an operator's own account next to a service running as its own user) ended in a traceback (PermissionError on
    the slot's lock, or its cursor), though a user who may only read the spool was said to be shown it. It is now one
    error line saying why. Run as root without the capabilities that bypass file permissions, the files owned by
    nobody: root then reads them as another user would."""
    import os
    import shutil

    import orjson

    from metering.spool import Spool
    from tests.fakes.events import record

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to read the spool as another user would")
    spool_dir = tmp_path / "data" / "spool"
    with Spool(spool_dir) as spool:
        spool.append(orjson.dumps(record(0)))
    for path in [spool_dir, *spool_dir.rglob("*")]:
        os.chown(path, 65534, 65534)
    env = bare_env(
        tmp_path, METERING_DATA_DIR=str(tmp_path / "data"), METERING_DATABASE_URL=f"sqlite:///{tmp_path}/m.db"
    )
    no_override = "-dac_override,-dac_read_search,-fowner"
    done = subprocess.run(
        ["setpriv", f"--inh-caps={no_override}", f"--bounding-set={no_override}", "--",
         sys.executable, "-m", "metering.cli.main", "spool", "status"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    error = one_error_line(done)
    assert f"cannot read the spool at {spool_dir}" in error and "Permission denied" in error, error
