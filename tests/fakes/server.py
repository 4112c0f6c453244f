"""A scriptable fake HTTP server, speaking just enough HTTP/1.1 for the official provider SDKs.

Each test scripts what the next requests get (``server.script(Reply(...), Fail(...))``); an unscripted
request gets ``server.default``. Every request is recorded (method, path, headers, JSON body) so tests
can assert what the SDK sent. Streams use chunked transfer encoding, so a stream broken on purpose
(``Reply(break_after=n)``) is an incomplete body the client notices, not a clean end of file.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

DEFAULT = "default"  # Reply.usage: the server's provider-specific default usage


@dataclass(frozen=True)
class Reply:
    """A successful answer (JSON, or an SSE stream when the request asked for one)."""

    text: str = "Hello from the fake server."
    usage: Mapping[str, Any] | str | None = DEFAULT  # provider-native usage; None: report none
    stop_reason: str | None = None  # None: the provider's normal "finished" reason
    model: str | None = None  # None: echo the requested model
    delay_s: float = 0.0  # before the status line (longer than the client timeout → timeout)
    chunks: tuple[str, ...] | None = None  # stream deltas; None: the text split after each space
    break_after: int | None = None  # stream: close the connection abruptly after this many deltas
    end_cleanly: bool = False  # with break_after: end the body properly instead (a truncated stream)
    frame_before: tuple[int, bytes] | None = None  # stream: (n, frame) sends this raw SSE frame before delta n
    break_before_end: bool = False  # stream: break the connection just before the last frame (message_stop, [DONE])
    final_usage: bool = True  # Anthropic stream: False sends message_delta without usage (some compatible gateways)
    arrived: threading.Event | None = None  # set once the request is read (a test knows the call is in flight)
    proceed: threading.Event | None = None  # waited for before answering (a test decides when the call ends)
    refusal: str | None = None  # OpenAI: the model refused; this is its message.refusal (content null), in a stream
    # its delta.refusal chunks (split after each space) instead of the text's

    def refusal_deltas(self) -> list[str]:
        words = (self.refusal or "").split(" ")
        return [word + " " for word in words[:-1]] + [words[-1]]

    def extra_frame(self, n: int) -> bytes | None:
        """The raw frame scripted to go before delta ``n``, if any."""
        return self.frame_before[1] if self.frame_before is not None and self.frame_before[0] == n else None

    def deltas(self) -> list[str]:
        if self.chunks is not None:
            return list(self.chunks)
        words = self.text.split(" ")
        return [word + " " for word in words[:-1]] + [words[-1]]


@dataclass(frozen=True)
class Fail:
    """An HTTP error answer in the provider's error format."""

    status: int
    error_type: str = "api_error"
    message: str = "scripted failure"
    headers: Mapping[str, str] = field(default_factory=dict)
    echo_api_key: bool = False  # put the api key the server received in the error message


@dataclass(frozen=True)
class Raw:
    """A 200 answer with this body as it is: what a proxy or a misconfigured endpoint may send."""

    body: bytes
    content_type: str = "text/html"


Behaviour = Reply | Fail | Raw


def rate_limited(retry_after_s: float = 0.01) -> Fail:
    headers = {"retry-after": str(max(int(retry_after_s), 0)), "retry-after-ms": str(int(retry_after_s * 1000))}
    return Fail(429, "rate_limit_error", "rate limited (scripted)", headers=headers)


def server_error() -> Fail:
    return Fail(500, "api_error", "internal error (scripted)")


def unauthorized() -> Fail:
    return Fail(401, "authentication_error", echo_api_key=True)


def hang(delay_s: float = 5.0) -> Reply:
    return Reply(delay_s=delay_s)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # the parsed JSON body (None when not JSON)
    peer: tuple[str, int] | None = None  # the client's address: its port tells its connections apart


class FakeProviderServer:
    """Base: one provider's endpoint on 127.0.0.1, a random free port, served by a background thread."""

    endpoint: ClassVar[str]
    default_usage: ClassVar[Mapping[str, Any]]

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.default: Behaviour = Reply()
        # The model's output limit: a request asking for more is refused (400, in the provider's wording), like
        # models that cap their output (4,096 tokens for many OpenAI-compatible servers and older models).
        self.max_output_tokens: int | None = None
        self._script: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- provider-specific ----------------------------------------------------------------------

    def api_key_of(self, headers: Mapping[str, str]) -> str | None:
        raise NotImplementedError

    def json_body(self, request: Any, reply: Reply) -> dict[str, Any]:
        raise NotImplementedError

    def stream_frames(self, request: Any, reply: Reply) -> Iterator[bytes | None]:
        """SSE frames; a ``None`` frame means: stop here (see ``Reply.break_after``)."""
        raise NotImplementedError

    def error_body(self, fail: Fail, api_key: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def requested_output(self, request: Any) -> int | None:
        """The output tokens a request asks for (its ``max_tokens``)."""
        return request.get("max_tokens") if isinstance(request, dict) else None

    def output_limit_error(self, request: Any, requested: int, limit: int) -> Fail:
        """The 400 the provider answers a request asking for more output tokens than the model allows."""
        raise NotImplementedError

    def refusal(self, request: Any) -> Fail | None:
        """The error the endpoint answers a request it does not take at all (a parameter it does not know), if any."""
        return None

    @property
    def base_url(self) -> str:
        """What the SDK is given as ``base_url``."""
        return self.url

    # -- scripting and records ------------------------------------------------------------------

    def script(self, *behaviours: Behaviour) -> None:
        with self._lock:
            self._script.extend(behaviours)

    def next_behaviour(self) -> Behaviour:
        with self._lock:
            return self._script.popleft() if self._script else self.default

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    def usage_of(self, reply: Reply) -> Mapping[str, Any] | None:
        return self.default_usage if reply.usage == DEFAULT else reply.usage  # type: ignore[return-value]

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> FakeProviderServer:
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in a scripted delay
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wait(self, seconds: float) -> None:
        self._stopping.wait(seconds)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeProviderServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # a client that went away (timeout test) is expected, not an error


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked streams; persistent connections like the real APIs
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {name.lower(): value for name, value in self.headers.items()}
        fake.record(RecordedRequest("POST", self.path, headers, body, self.client_address))
        if self.path != fake.endpoint:
            self._send_json(404, {"error": {"type": "not_found_error", "message": f"no route {self.path}"}})
            return
        if (refused := fake.refusal(body)) is not None:
            self._send_json(refused.status, fake.error_body(refused, None))
            return
        requested = fake.requested_output(body)
        limit = fake.max_output_tokens
        if limit is not None and isinstance(requested, int) and requested > limit:
            fail = fake.output_limit_error(body, requested, limit)
            self._send_json(fail.status, fake.error_body(fail, None))
            return
        behaviour = fake.next_behaviour()
        if isinstance(behaviour, Fail):
            self._send_json(behaviour.status, fake.error_body(behaviour, fake.api_key_of(headers)), behaviour.headers)
            return
        if isinstance(behaviour, Raw):
            self._send(200, behaviour.body, behaviour.content_type)
            return
        if behaviour.arrived is not None:
            behaviour.arrived.set()
        if behaviour.proceed is not None:
            behaviour.proceed.wait(10.0)  # bounded: a test that failed before setting it does not hang the server
        if behaviour.delay_s:
            fake.wait(behaviour.delay_s)
        try:
            if isinstance(body, dict) and body.get("stream"):
                self._send_stream(fake.stream_frames(body, behaviour), behaviour)
            else:
                self._send_json(200, fake.json_body(body, behaviour))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", "req_fake")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_stream(self, frames: Iterator[bytes | None], reply: Reply) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for frame in frames:
            if frame is None and reply.end_cleanly:
                break
            if frame is None:  # break the stream: no terminating chunk, the socket just goes away
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def unused_port() -> int:
    """A port nothing listens on (bound, then released): connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
