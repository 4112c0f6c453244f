"""A TCP proxy between the code under test and PostgreSQL that reads the protocol's messages, so a test can cut the
connection at an exact statement: before the server sees it, or after the server ran it but before its reply
reaches the client (a COMMIT that committed while the client only sees its connection die). Or it holds a statement
until the test releases it: a barrier with the connection idle in its transaction (e.g. to terminate its backend
there). Connections must not use TLS or GSS encryption (``sslmode=disable&gssencmode=disable``, added by ``url``).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from sqlalchemy.engine import make_url


class Cut(Enum):
    BEFORE = "before"  # the statement never reaches the server: both sides are closed
    AFTER_REPLY = "after_reply"  # the server runs it to its ReadyForQuery; the client gets no reply, its socket closes
    HOLD = "hold"  # the statement waits until ``Trap.release`` (then goes on, to a server that may be gone)


@dataclass
class Trap:
    """One statement to catch: the first message whose SQL ``matches`` (a Query or a Parse) on any connection; with
    ``after``, only on a connection whose current transaction ran a statement containing ``after``."""

    matches: Callable[[str], bool]
    cut: Cut
    after: str | None = None
    reached: threading.Event = field(default_factory=threading.Event)  # the statement arrived at the proxy
    done: threading.Event = field(default_factory=threading.Event)  # the cut was made (both sides closed)
    _released: threading.Event = field(default_factory=threading.Event)
    sql: str | None = None

    def release(self) -> None:
        self._released.set()


# COPY FROM STDIN's messages, as the "SQL" a trap matches: the rows, and their end.
COPY_DATA, COPY_DONE = "<copy data>", "<copy done>"
COPY_MESSAGES = {b"d": COPY_DATA, b"c": COPY_DONE}


def is_commit(sql: str) -> bool:
    return sql.strip().upper() == "COMMIT"


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _message(sock: socket.socket, typed: bool = True) -> bytes | None:
    """One protocol message, whole (type byte, length, body): the startup message has no type byte."""
    head = _read_exactly(sock, 5 if typed else 4)
    if head is None:
        return None
    (length,) = struct.unpack("!I", head[1:5] if typed else head)
    body = _read_exactly(sock, length - 4)
    return None if body is None else head + body


def _sql_of(message: bytes) -> str | None:
    kind, body = message[:1], message[5:]
    if kind == b"Q":
        return body.rstrip(b"\0").decode(errors="replace")
    if kind == b"P":  # statement name \0 query \0 ...
        parts = body.split(b"\0")
        return parts[1].decode(errors="replace") if len(parts) > 1 else None
    if kind in COPY_MESSAGES:
        return COPY_MESSAGES[kind]
    return None


class PgProxy:
    def __init__(self, upstream_host: str = "127.0.0.1", upstream_port: int = 5432) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._traps: list[Trap] = []
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True, name="pg-proxy")
        self._thread.start()

    def url(self, database_url: str) -> str:
        """``database_url`` through this proxy, without encryption (the proxy reads the messages)."""
        parsed = make_url(database_url).set(host="127.0.0.1", port=self.port)
        parsed = parsed.update_query_dict({"sslmode": "disable", "gssencmode": "disable"})
        return parsed.render_as_string(hide_password=False)

    def trap(self, matches: Callable[[str], bool], cut: Cut, *, after: str | None = None) -> Trap:
        trap = Trap(matches, cut, after)
        with self._lock:
            self._traps.append(trap)
        return trap

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            for trap in self._traps:
                trap.release()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets |= {client, server}
            pair = _Pair(client, server)
            threading.Thread(target=self._frontend, args=(pair,), daemon=True).start()
            threading.Thread(target=self._backend, args=(pair,), daemon=True).start()

    def _take(self, sql: str, pair: _Pair) -> Trap | None:
        with self._lock:
            for trap in self._traps:
                if trap.after is not None and not any(trap.after in seen for seen in pair.transaction):
                    continue
                if not trap.reached.is_set() and trap.matches(sql):
                    trap.sql = sql
                    trap.reached.set()
                    return trap
        return None

    def _frontend(self, pair: _Pair) -> None:
        message = _message(pair.client, typed=False)
        while message is not None:
            sql = _sql_of(message)
            trap = self._take(sql, pair) if sql is not None else None
            if sql is not None:
                ends = sql.strip().upper() in ("COMMIT", "ROLLBACK")
                pair.transaction = [] if ends else [*pair.transaction, sql]
            if trap is not None and trap.cut is Cut.BEFORE:
                pair.cut(trap)
                return
            if trap is not None and trap.cut is Cut.HOLD:
                trap._released.wait()
            if trap is not None and trap.cut is Cut.AFTER_REPLY:
                pair.cut_after_reply = trap
            try:
                pair.server.sendall(message)
            except OSError:
                pair.cut(None)
                return
            message = _message(pair.client)
        pair.cut(None)

    def _backend(self, pair: _Pair) -> None:
        # Until the client's startup is answered, the server may send a single byte (no SSL/GSS): messages after.
        message = _message(pair.server)
        while message is not None:
            trap = pair.cut_after_reply
            if trap is not None:
                if message[:1] == b"Z":  # the statement is done on the server: the client never hears of it
                    pair.cut(trap)
                    return
            else:
                try:
                    pair.client.sendall(message)
                except OSError:
                    break
            message = _message(pair.server)
        pair.cut(None)


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.cut_after_reply: Trap | None = None
        self.transaction: list[str] = []  # the statements since the connection's last COMMIT or ROLLBACK

    def cut(self, trap: Trap | None) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        if trap is not None:
            trap.done.set()


@contextlib.contextmanager
def pg_proxy() -> Iterator[PgProxy]:
    proxy = PgProxy()
    try:
        yield proxy
    finally:
        proxy.close()
