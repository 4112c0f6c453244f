"""What the HTTP sink sends: each event as its spool line says it, fields added to the event since the first release
(``cache_write_1h_tokens``, ``web_searches``) only when they are not 0, as the metered client writes its lines.

A service that does not know those fields yet (``UsageEvent`` forbids unknown keys) then still takes every event that
does not use them, so producers can be upgraded before the service. The sink used to send every field of the
validated event, zeros included: such a service rejected every event of an upgraded producer, and the spool
dead-lettered them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from metering.events import UsageEvent
from metering.spool import Flusher, Spool
from metering.spool.http_sink import HttpSink
from tests.fakes.events import record
from tests.fakes.local_http import QuietHandler, local_service

ADDED = {"cache_write_1h_tokens", "web_searches"}
KNOWN_BEFORE = set(UsageEvent.model_fields) - ADDED  # what a service of the previous release accepts


class _PreviousService(QuietHandler):
    """POST /v1/events of a service from before these fields: an event with a key it does not know is rejected."""

    bodies: ClassVar[list[list[dict[str, Any]]]] = []
    codings: ClassVar[list[str]] = []  # the content codings it refused

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding"):  # it read bodies as sent: any content coding was a 415
            self.answer(415)
            self.codings.append(self.headers["Content-Encoding"])
            return
        events = orjson.loads(raw)["events"]
        self.bodies.append(events)
        rejected = [
            {"index": i, "event_id": e.get("event_id"), "reason": f"{sorted(set(e) - KNOWN_BEFORE)}: extra_forbidden"}
            for i, e in enumerate(events)
            if set(e) - KNOWN_BEFORE
        ]
        body = orjson.dumps({"inserted": len(events) - len(rejected), "duplicates": 0, "rejected": rejected})
        self.answer(200, body)


@pytest.fixture
def previous_service() -> Iterator[str]:
    _PreviousService.bodies = []
    _PreviousService.codings = []
    with local_service(_PreviousService) as url:
        yield url


def test_events_reach_a_service_without_the_new_fields_as_their_spool_lines_say(
    tmp_path: Path, previous_service: str
) -> None:
    plain = [record(i) for i in range(3)]
    searched = record(3, input_tokens=200, cache_write_tokens=100, cache_write_1h_tokens=60, web_searches=2)
    with Spool(tmp_path / "spool") as spool:
        for rec in [*plain, searched]:
            spool.append(orjson.dumps(rec))
        flusher = Flusher(spool, HttpSink(previous_service, "mtr_any"), interval_s=0.01).start()
        assert flusher.flush(timeout=30)
        stats = flusher.stats
        flusher.stop()
    sent = {e["event_id"]: e for body in _PreviousService.bodies for e in body}
    for rec in [*plain, searched]:
        assert set(sent[rec["event_id"]]) == set(rec)  # the fields the spool line has, no more
    assert sent[searched["event_id"]]["web_searches"] == 2
    assert sent[searched["event_id"]]["cache_write_1h_tokens"] == 60
    # the events that use neither are taken; the one that uses them waits for the new service as a dead letter
    assert (stats.delivered, stats.rejected, stats.pending) == (3, 1, 0)
    assert _PreviousService.codings == [
        "gzip"
    ]  # it refused the first gzipped batch: the sink sent it plain, and later ones
