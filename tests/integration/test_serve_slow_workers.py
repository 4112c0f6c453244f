"""`metering serve --workers N` on a busy host: a worker that takes more than 5 s to start (its interpreter importing
the app while other processes hold the CPUs) is given time to start. uvicorn pings each worker every half second and
kills one that has not answered within its health-check timeout, 5 s by default; a worker answers only once its
interpreter has imported what it needs, so on a loaded host (seen at a load average of 13 on 2 cores) uvicorn killed
starting workers and started new ones ("Child process [N] died"), and with imports slower than 5 s no worker ever
served."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.integration.serving import assert_clean_shutdown, clean_env, serving

pytestmark = pytest.mark.slow

STARTUP_DELAY_S = 8  # past uvicorn's default health-check timeout (5 s), well within the one serve gives (30 s)

# Run at interpreter start (sitecustomize) in every process of the test's `serve`: the workers uvicorn spawns
# (`python -c "from multiprocessing.spawn import spawn_main; …"`) sleep before they can answer a health check, as a
# worker does whose imports are slow.
SLOW_START = f"""
import sys, time
if any("spawn_main" in arg for arg in getattr(sys, "orig_argv", ())):
    time.sleep({STARTUP_DELAY_S})
"""


def test_workers_slow_to_start_are_not_killed(db_url: str, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_START)
    env = clean_env(METERING_DATABASE_URL=db_url, METERING_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(site))
    with serving(env, tmp_path, "--workers", "2", timeout=120) as server:  # one worker answers /readyz
        deadline = time.monotonic() + 60
        while server.err.read_text().count("Application startup complete.") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # the other one is still starting
        assert httpx.get(f"{server.base}/readyz", timeout=30).status_code == 200
        log = server.err.read_text()
    assert "died" not in log, log
    assert log.count("Application startup complete.") == 2, log  # the two first workers, none killed and replaced
    assert_clean_shutdown(server)
