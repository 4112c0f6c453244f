"""gunzip_bounded: the gzip decoding of request bodies, pure."""

from __future__ import annotations

import gzip
import zlib

import pytest

from metering.api import content_coding
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
