"""A handler class served over HTTP on 127.0.0.1 (a free port, its own thread), for tests of the spool's HTTP sink;
``QuietHandler``, a base for such handlers: ``answer`` sends a whole response, and nothing is logged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """``body`` (JSON unless ``headers`` say otherwise) with its length."""
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def local_service(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Its base URL while it serves; stopped, its socket closed, at the end."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
