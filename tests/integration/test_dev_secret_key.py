"""The dev key (``<data_dir>/secret.key``, no METERING_SECRET_KEYS) is generated once, whoever asks first: processes
asking at the same moment (``serve --workers``, a CLI command meanwhile) all get the same, whole key."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from metering.config import Settings
from metering.crypto import secret_box_from_settings


def _ask(data_dir: str, start_at: float, answers: multiprocessing.Queue) -> None:
    while time.time() < start_at:  # every process starts at the same moment
        pass
    try:
        secret_box_from_settings(Settings(data_dir=Path(data_dir), env="dev", secret_keys=None))
        answers.put((Path(data_dir) / "secret.key").read_text())
    except Exception as exc:  # FileExistsError, or an invalid (empty) key read before it was written
        answers.put(repr(exc))


def test_processes_generating_the_dev_key_at_once_all_get_the_same_key(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for attempt in range(25):
        data_dir = tmp_path / str(attempt)
        answers = context.Queue()
        start_at = time.time() + 0.2
        children = [context.Process(target=_ask, args=(str(data_dir), start_at, answers)) for _ in range(6)]
        for child in children:
            child.start()
        got = [answers.get(timeout=30) for _ in children]
        for child in children:
            child.join()
        assert len(set(got)) == 1 and got[0].endswith("="), got  # one key, a whole one (Fernet keys end with =)
        assert [p.name for p in data_dir.iterdir()] == ["secret.key"]  # no draft left behind
