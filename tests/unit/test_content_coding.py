"""gunzip_bounded: the gzip decoding of request bodies, pure."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from metering.api import content_coding
from metering.api.body_limit import DECODED_IN_FLIGHT, BodyLimitMiddleware
from metering.api.content_coding import InvalidContentCodingError, gunzip_bounded
from metering.errors import PayloadTooLargeError


def test_many_empty_members_are_decoded_in_time_linear_in_the_body(monkeypatch):
    """A body of empty gzip members (20 bytes each, nothing decoded: no limit reached) was decoded by handing each
    member's decoder the whole rest of the body, which zlib copies into ``unused_data``: quadratic, ~30 s of the
    event loop for 8 MiB (420,000 members) sent without a token. Each decoder is now fed the body in pieces."""
    fed: list[int] = []
    real = zlib.decompressobj

    class Spy:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._decoder = real(*args, **kwargs)  # type: ignore[arg-type]

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            fed.append(len(data))
            return self._decoder.decompress(data, max_length)

        def __getattr__(self, name: str) -> object:
            return getattr(self._decoder, name)

    monkeypatch.setattr(content_coding.zlib, "decompressobj", Spy)
    body = gzip.compress(b"", mtime=0) * 5_000
    assert gunzip_bounded(body, 1024) == b""
    assert sum(fed) <= 300 * 5_000  # was 250 million bytes (each member given the ~50 KB left)


@pytest.mark.parametrize("size", [1, 255, 256, 257, 70_000, 300_000])
def test_members_of_any_size_decode_whole_and_the_limit_is_exact(size):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    body = gzip.compress(data[: size // 2], compresslevel=0) + gzip.compress(b"") + gzip.compress(data[size // 2 :])
    assert gunzip_bounded(body, size) == data
    with pytest.raises(PayloadTooLargeError):
        gunzip_bounded(body, size - 1)
    with pytest.raises(InvalidContentCodingError):
        gunzip_bounded(body[:-1], size)
    with pytest.raises(InvalidContentCodingError):
        gunzip_bounded(body + b"\x1f", size)


def test_gzip_bodies_decoded_at_once_are_bounded_however_many_requests_send_them():
    """A gzip body of 8 KB decodes to 8 MiB and was held until its request was answered (a 401 after FastAPI read
    it): 100 such requests at once, 800 KB sent without a token, took a server from 120 MB to 1.8 GB. The bytes
    decoded and not yet answered are now at most DECODED_IN_FLIGHT bodies of the limit; the other requests wait."""
    limit = 64 * 1024
    held = {"now": 0, "most": 0}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = (await receive())["body"]
        held["now"] += len(body)
        held["most"] = max(held["most"], held["now"])
        await asyncio.sleep(0.01)  # the app at work (a token looked up, events ingested)
        held["now"] -= len(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    bomb = gzip.compress(b" " * limit)
    small = gzip.compress(b"{}")

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=BodyLimitMiddleware(app, max_bytes=limit))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"Content-Encoding": "gzip"}
            sent = [client.post("/", content=bomb if i % 5 else small, headers=headers) for i in range(40)]
            return [response.status_code for response in await asyncio.gather(*sent)]

    assert asyncio.run(main()) == [200] * 40
    assert held["now"] == 0
    assert limit * 2 <= held["most"] <= (limit + 1) * DECODED_IN_FLIGHT
