"""A process forked with an HttpSink whose client keeps a connection open (a prefork server, a task queue): the
child's deliveries must not go over the parent's connection (one TCP stream written by two processes: their
requests interleave, and each may read the other's answer)."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from metering.events import event_from_record
from metering.spool.http_sink import HttpSink
from tests.fakes.events import record
from tests.fakes.local_http import QuietHandler, local_service
from tests.integration.test_spool_fork import _in_child


class _Recording(QuietHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connection
    peers: list[tuple[str, int]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).peers.append(self.client_address)
        body = orjson.dumps({"inserted": 1, "duplicates": 0, "rejected": []})
        self.answer(200, body)


@pytest.fixture
def server() -> Iterator[str]:
    _Recording.peers = []
    with local_service(_Recording) as url:
        yield url


def test_a_forked_childs_http_sink_opens_a_connection_of_its_own(server: str) -> None:
    sink = HttpSink(server, "mtr_token")
    try:
        assert sink.deliver([event_from_record(record(0))]).inserted == 1  # the parent's connection, kept open
        report = _in_child(lambda: sink.deliver([event_from_record(record(1))]).inserted)
        assert report == "ok 1"
        assert sink.deliver([event_from_record(record(2))]).inserted == 1
    finally:
        sink.close()
    parent, child, parent_again = _Recording.peers
    assert parent == parent_again  # the parent's connection still serves it
    assert child != parent  # the child connected on its own
