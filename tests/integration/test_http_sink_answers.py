"""The HTTP sink believes a 200 only when it accounts for every event sent: each one inserted, a duplicate, or
rejected at an index of the batch. A 200 that does not (a proxy or another service at the URL, a bug) used to
acknowledge the batch: the spool moved past events nothing had stored."""

from __future__ import annotations

import email.utils
import gzip
import logging
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from metering.spool import Flusher, Spool
from metering.spool.decode import DeadLetters
from metering.spool.held import HELD_NAME, MAX_HELD_AHEAD, HeldEvents
from metering.spool.http_sink import HttpSink
from tests.fakes.events import record
from tests.fakes.local_http import QuietHandler, local_service


class _Answering(QuietHandler):
    """Answers each POST with the next scripted answer (a function of the batch's size: a 200's body, or a status,
    headers and body), then with a true one."""

    script: ClassVar[list[Any]] = []

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        count = len(orjson.loads(raw)["events"])
        answer = self.script.pop(0)(count) if self.script else {"inserted": count, "duplicates": 0, "rejected": []}
        status, headers, answer = answer if isinstance(answer, tuple) else (200, {}, answer)
        body = answer if isinstance(answer, bytes) else orjson.dumps(answer)
        self.answer(status, body, headers)


@pytest.fixture
def service() -> Iterator[str]:
    with local_service(_Answering) as url:
        yield url


@pytest.mark.parametrize(
    "answer",
    [
        lambda n: {"inserted": 0, "duplicates": 0, "rejected": []},  # nothing stored, nothing said
        lambda n: {"inserted": n - 2, "duplicates": 1, "rejected": []},  # one event unaccounted for
        lambda n: {"inserted": n - 1, "duplicates": 0, "rejected": [{"index": n, "event_id": None, "reason": "x"}]},
    ],
)
def test_a_200_that_does_not_account_for_every_event_keeps_the_batch(
    tmp_path: Path, service: str, answer: Callable[[int], dict[str, Any]]
) -> None:
    _Answering.script = [answer] * 3
    with Spool(tmp_path / "spool") as spool:
        for i in range(10):
            spool.append(orjson.dumps(record(i)))
        flusher = Flusher(spool, HttpSink(service, "mtr_any"), interval_s=0.01, max_backoff_s=0.05)
        assert flusher.flush(timeout=30)  # the script runs out: a true answer takes the batch
        stats = flusher.stats
        flusher.stop()
    assert (stats.delivered, stats.rejected, stats.pending, stats.failures) == (10, 0, 0, 3)
    assert "does not account for" in (stats.last_error or "")


def test_a_redirect_is_kept_and_retried_and_says_where_it_points(tmp_path: Path, service: str) -> None:
    """A redirect is not followed (a POST with the token, maybe to another host): the batch is kept and retried, and
    the error names the Location (it said "answered 308: " and nothing else, e.g. for an http:// URL served on
    https://), so that the operator can fix the URL."""
    moved = f"{service.replace('http://', 'https://')}/v1/events"
    _Answering.script = [lambda n: (308, {"Location": moved}, {})]
    with Spool(tmp_path / "spool") as spool:
        spool.append(orjson.dumps(record(0)))
        flusher = Flusher(spool, HttpSink(service, "mtr_any"), interval_s=0.01, max_backoff_s=0.05)
        assert flusher.flush(timeout=30)
        stats = flusher.stats
        flusher.stop()
    assert (stats.delivered, stats.pending, stats.failures) == (1, 0, 1)
    assert f"answered 308 (Location: {moved})" in (stats.last_error or ""), stats.last_error


def _first_wait(caplog: pytest.LogCaptureFixture) -> float:
    """The wait the flusher chose after its first failure, as it logs it ("retrying in 7.0s")."""
    waits = [float(m.group(1)) for r in caplog.records if (m := re.search(r"retrying in ([0-9.]+)s", r.getMessage()))]
    assert waits, caplog.text
    return waits[0]


@pytest.mark.parametrize(
    ("status", "retry_after", "max_backoff_s", "wait"),
    [
        (429, "7", 60.0, 7.0),  # honoured: the flusher's own backoff would have retried after 0.01 s
        (503, "86400", 2.0, 2.0),  # a day: capped by max_backoff_s, never a stalled spool
    ],
)
def test_a_retry_after_is_waited_at_least_capped_by_the_flusher_s_max_backoff(
    tmp_path: Path,
    service: str,
    caplog: pytest.LogCaptureFixture,
    status: int,
    retry_after: str,
    max_backoff_s: float,
    wait: float,
) -> None:
    """A 429 or 503 with Retry-After was retried on the flusher's own backoff (0.01 s here), as if the service had
    not asked. Now the wait is at least what it asks (up to max_backoff_s); the batch is kept, then delivered once."""
    _Answering.script = [lambda n: (status, {"Retry-After": retry_after}, {})]
    caplog.set_level(logging.WARNING, logger="metering.spool")
    with Spool(tmp_path / "spool") as spool:
        for i in range(10):
            spool.append(orjson.dumps(record(i)))
        flusher = Flusher(spool, HttpSink(service, "mtr_any"), interval_s=0.01, max_backoff_s=max_backoff_s)
        assert not flusher.flush(timeout=0.5)  # the wait chosen is past this deadline: the flush gives up at once
        assert _first_wait(caplog) == wait
        kept = flusher.stats
        assert flusher.flush(timeout=30)  # a new flush, a fresh backoff: the script ran out, a true answer takes it
        stats = flusher.stats
        flusher.stop()
    assert (kept.delivered, kept.pending, kept.failures) == (0, 10, 1)
    assert f"answered {status} (Retry-After: {retry_after})" in (kept.last_error or ""), kept.last_error
    assert (stats.delivered, stats.duplicates, stats.rejected, stats.pending, stats.failures) == (10, 0, 0, 0, 1)


def test_a_retry_after_as_an_http_date_is_waited_until_that_date(
    tmp_path: Path, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    _Answering.script = [lambda n: (503, {"Retry-After": when}, {})]
    caplog.set_level(logging.WARNING, logger="metering.spool")
    with Spool(tmp_path / "spool") as spool:
        spool.append(orjson.dumps(record(0)))
        flusher = Flusher(spool, HttpSink(service, "mtr_any"), interval_s=0.01, max_backoff_s=600)
        assert not flusher.flush(timeout=0.5)
        stats = flusher.stats
        flusher.stop(drain=False)
    assert 60 < _first_wait(caplog) <= 120  # until the date (less the time the answer took), not 0.01 s
    assert (stats.delivered, stats.pending, stats.failures) == (0, 1, 1)


_NGINX_500 = b"<html><head><title>500 Internal Server Error</title></head><body><center>nginx</center></body></html>"
_SERVICE_500 = {
    "type": "https://metering.dev/problems/internal_error",
    "title": "Internal error",
    "status": 500,
    "detail": "an unexpected error occurred",
    "code": "internal_error",
    "instance": "/v1/events",
}


def _taken(n: int) -> dict[str, Any]:
    return {"inserted": n, "duplicates": 0, "rejected": []}


def _isolating_two_events(tmp_path: Path, service: str, answer: tuple[int, dict[str, str], Any]) -> Any:
    """Two events delivered while the address answers ``answer``, then takes the first half of the split batch, then
    answers ``answer`` three times more: the flusher's stats once it has flushed."""
    _Answering.script = [lambda n: answer, _taken, lambda n: answer, lambda n: answer, lambda n: answer]
    stats = _two_events_flushed(tmp_path, service)
    _Answering.script = []
    return stats


def _two_events_flushed(tmp_path: Path, service: str) -> Any:
    """Two events spooled and flushed to ``service``: the flusher's stats once done."""
    with Spool(tmp_path / "spool") as spool:
        for i in range(2):
            spool.append(orjson.dumps(record(i)))
        flusher = Flusher(spool, HttpSink(service, "mtr_any"), interval_s=0.01, max_backoff_s=0.05)
        assert flusher.flush(timeout=30)
        stats = flusher.stats
        flusher.stop()
    return stats


@pytest.mark.parametrize(
    "answer",
    [
        (500, {"Content-Type": "text/html"}, _NGINX_500),  # a proxy's error page
        (500, {"Content-Type": "text/plain"}, b""),  # no body at all
        (500, {}, {"error": "upstream failed"}),  # a gateway's own JSON
        (500, {}, _SERVICE_500),  # the service's body, but not as its problem document (application/json)
        (200, {"Content-Type": "text/html"}, b"<html>maintenance</html>"),  # a 200 that is no answer
    ],
)
def test_a_500_or_200_that_is_not_the_service_s_answer_never_dead_letters_an_event(
    tmp_path: Path, service: str, answer: tuple[int, dict[str, str], Any]
) -> None:
    """A 500 was taken as the service refusing the batch for something in it, whoever answered it: a proxy flapping
    between 500 and the service while the flusher isolated the event at fault (the first half passed, then three
    500s to the second) dead-lettered a healthy event, as "rejected by the sink", out of billing until redriven.
    Only the service's own 500 (its problem document) is a refusal now; any other is an outage, retried as is."""
    stats = _isolating_two_events(tmp_path, service, answer)
    assert (stats.delivered, stats.rejected, stats.pending) == (2, 0, 0), stats
    assert not (tmp_path / "spool" / "rejected.jsonl").exists()


def test_the_service_s_own_500_still_isolates_the_event_at_fault(tmp_path: Path, service: str) -> None:
    """The service's 500 (its problem document, `internal_error`: ingest failed on some value) is met again by the
    same event: the batch is split, and the event refused on its own, while the other went in, is dead-lettered."""
    stats = _isolating_two_events(tmp_path, service, (500, {"Content-Type": "application/problem+json"}, _SERVICE_500))
    assert (stats.delivered, stats.rejected, stats.pending) == (1, 1, 0), stats
    assert "internal_error" in (tmp_path / "spool" / "rejected.jsonl").read_text()


class _Behind(QuietHandler):
    """A service whose clock is ``behind`` this host's: it refuses, as ingest does, an event more than 5 minutes
    ahead of its own now; the others are inserted (a replay counted as a duplicate)."""

    behind: ClassVar[timedelta] = timedelta(0)
    stored: ClassVar[set[str]] = set()

    def do_POST(self) -> None:
        events = orjson.loads(gzip.decompress(self.rfile.read(int(self.headers["Content-Length"]))))["events"]
        now = datetime.now(UTC) - self.behind
        answer: dict[str, Any] = {"inserted": 0, "duplicates": 0, "rejected": []}
        for index, event in enumerate(events):
            if datetime.fromisoformat(event["occurred_at"]) > now + timedelta(minutes=5):
                reason = f"occurred_at {event['occurred_at']} is in the future (now {now.isoformat()})"
                answer["rejected"].append({"index": index, "event_id": event["event_id"], "reason": reason})
            elif event["event_id"] in self.stored:
                answer["duplicates"] += 1
            else:
                self.stored.add(event["event_id"])
                answer["inserted"] += 1
        self.answer(200, orjson.dumps(answer))


def test_events_in_the_future_only_by_the_service_s_clock_are_kept_until_it_gets_there(tmp_path: Path) -> None:
    """A service whose clock is behind the producer's by more than 5 minutes refused its events as in the future, and
    the flusher dead-lettered them: every event of that host out of billing until redriven, though the service takes
    each once its clock gets there. They are kept and retried now; an event in the future by this host's clock too
    is held as with the database sink (this host's clock stepped back: ``spool.held``), or, more than
    ``MAX_HELD_AHEAD`` ahead (a bad occurred_at), still dead-lettered."""
    _Behind.behind, _Behind.stored = timedelta(minutes=10), set()
    records = [record(i) for i in range(5)]
    early = record(6, occurred_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    bad = record(5, occurred_at=(datetime.now(UTC) + MAX_HELD_AHEAD + timedelta(hours=1)).isoformat())
    with local_service(_Behind) as service, Spool(tmp_path / "spool") as spool:
        for rec in [*records, early, bad]:
            spool.append(orjson.dumps(rec))
        flusher = Flusher(spool, HttpSink(service, "mtr_any"), interval_s=0.01, max_backoff_s=0.05)
        assert not flusher.flush(timeout=1)  # kept: the service's clock is not there yet
        kept = flusher.stats
        _Behind.behind = timedelta(0)  # the service's clock synced (or time went by)
        assert flusher.flush(timeout=30)
        stats = flusher.stats
        flusher.stop()
    assert (kept.rejected, kept.pending) == (0, 7), kept
    assert "in the future though they are not by this host's clock" in (kept.last_error or ""), kept.last_error
    assert (stats.rejected, stats.held, stats.pending) == (1, 1, 0), stats
    assert _Behind.stored == {r["event_id"] for r in records}
    [dead] = DeadLetters(tmp_path / "spool" / "rejected.jsonl").read()
    assert dead["event_id"] == bad["event_id"] and "in the future" in dead["reason"]
    [held] = HeldEvents(tmp_path / "spool" / HELD_NAME).read()
    assert held["event_id"] == early["event_id"]


@pytest.mark.parametrize(
    "body",
    [b"<html>maintenance</html>", b"null", b"[]", b'{"ok": true}', b'{"inserted": 1, "duplicates": 0, "rejected": 3}'],
)
def test_a_200_that_is_not_the_service_s_answer_is_kept_and_says_who_answered(
    tmp_path: Path, service: str, body: bytes
) -> None:
    """A 200 whose body is not the service's answer was retried, but the error logged said only "Expecting value:
    line 1 column 1 (char 0)" or "KeyError: 'inserted'": neither the URL nor that the answer was a 200."""
    _Answering.script = [lambda n: (200, {"Content-Type": "text/html"}, body)]
    with Spool(tmp_path / "spool") as spool:
        spool.append(orjson.dumps(record(0)))
        flusher = Flusher(spool, HttpSink(service, "mtr_any"), interval_s=0.01, max_backoff_s=0.05)
        assert flusher.flush(timeout=30)
        stats = flusher.stats
        flusher.stop()
    assert (stats.delivered, stats.rejected, stats.failures) == (1, 0, 1), stats
    assert f"{service}/v1/events answered 200 but not with the service's answer" in (stats.last_error or "")
    assert body.decode() in (stats.last_error or "")


class _OtherReason(QuietHandler):
    """A service that rejects every event for a reason about another field, whose words include "is in the future"."""

    def do_POST(self) -> None:
        events = orjson.loads(gzip.decompress(self.rfile.read(int(self.headers["Content-Length"]))))["events"]
        reason = "deadline: 'the invoice is in the future' is not a valid value"
        rejected = [{"index": i, "event_id": e["event_id"], "reason": reason} for i, e in enumerate(events)]
        self.answer(200, orjson.dumps({"inserted": 0, "duplicates": 0, "rejected": rejected}))


def test_only_an_occurred_at_in_the_future_is_kept_not_any_reason_with_those_words(tmp_path: Path) -> None:
    """The sink kept (retried forever) any event whose refusal held the words "is in the future", wherever they
    were: a reason about another field that quoted them kept a bad event from its dead letter. Only the refusal of
    the event's occurred_at is the service's clock being behind."""
    with local_service(_OtherReason) as service:
        stats = _two_events_flushed(tmp_path, service)
    assert (stats.delivered, stats.rejected, stats.pending) == (0, 2, 0), stats
