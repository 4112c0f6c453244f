"""A concurrent write started while a paged correction (reprice, re-rate) is between its first and second page.

The correction's module ``lock_billing_periods`` runs at the start of every page: patched, it starts ``work`` in a
thread before the second page and gives it time to reach the rows (or accounts) the first page holds, past
PostgreSQL's ``deadlock_timeout`` (1 s). A lock-order bug then aborts one side as a deadlock; ``join`` returns what
``work`` raised, for the test to assert there is nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


class SecondPageRace:
    def __init__(self, module: ModuleType, monkeypatch: pytest.MonkeyPatch, work: Callable[[], None]) -> None:
        self.errors: list[BaseException] = []
        self._work = work
        self._thread = threading.Thread(target=self._run)
        lock = module.lock_billing_periods

        def second_page_after_the_work(session: Any, wanted: Any) -> Any:
            if self._thread.ident is None and session.info.setdefault("pages", 0) == 1:
                self._thread.start()
                time.sleep(1.5)  # the work reaches what the first page holds (deadlock_timeout is 1 s)
            session.info["pages"] += 1
            return lock(session, wanted)

        monkeypatch.setattr(module, "lock_billing_periods", second_page_after_the_work)

    def _run(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # surfaced by join()
            self.errors.append(exc)

    def join(self) -> list[BaseException]:
        """What the work raised (after it ended); the work must have run."""
        assert self._thread.ident is not None, "the correction never reached its second page"
        self._thread.join(30)
        return self.errors
