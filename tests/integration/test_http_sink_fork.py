"""A process forked with an HttpSink whose client keeps a connection open (a prefork server, a task queue): the
child's deliveries must not go over the parent's connection (one TCP stream written by two processes: their
requests interleave, and each may read the other's answer)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest

from metering.events import event_from_record
from metering.spool.http_sink import HttpSink
from tests.fakes.events import record
from tests.integration.test_spool_fork import _in_child


class _Recording(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connection
    peers: list[tuple[str, int]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).peers.append(self.client_address)
        body = orjson.dumps({"inserted": 1, "duplicates": 0, "rejected": []})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    _Recording.peers = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_a_forked_childs_http_sink_opens_a_connection_of_its_own(server: ThreadingHTTPServer) -> None:
    sink = HttpSink(f"http://127.0.0.1:{server.server_address[1]}", "mtr_token")
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
