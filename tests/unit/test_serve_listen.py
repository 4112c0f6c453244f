"""``metering serve``'s check before uvicorn starts probes exactly what uvicorn binds for a host name."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import typer

from metering.cli.serve_cmd import _check_port_free, _listen_addresses

_REAL_GETADDRINFO = socket.getaddrinfo


@pytest.fixture
def dual_host(monkeypatch: pytest.MonkeyPatch) -> str:
    """A host name that resolves to ::1 first, then 127.0.0.1 (a common /etc/hosts ``localhost``)."""

    def getaddrinfo(host: object, port: object, family: int = 0, *args: object, **kwargs: object) -> list:  # type: ignore[type-arg]
        if host != "dual.test":
            return _REAL_GETADDRINFO(host, port, family, *args, **kwargs)  # type: ignore[arg-type]
        wanted = [a for a, f in (("::1", socket.AF_INET6), ("127.0.0.1", socket.AF_INET)) if family in (0, f)]
        return [info for a in wanted for info in _REAL_GETADDRINFO(a, port, family, *args, **kwargs)]  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return "dual.test"


def _listening(family: socket.AddressFamily, host: str) -> Iterator[int]:
    with socket.socket(family, socket.SOCK_STREAM) as busy:
        busy.bind((host, 0))
        busy.listen()
        yield busy.getsockname()[1]


@pytest.fixture
def ipv4_port_in_use() -> Iterator[int]:
    yield from _listening(socket.AF_INET, "127.0.0.1")


@pytest.fixture
def ipv6_port_in_use() -> Iterator[int]:
    try:
        yield from _listening(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")


def test_one_worker_binds_every_address_and_several_bind_the_first_ipv4_one(dual_host: str) -> None:
    """uvicorn: one worker is the loop's create_server (each address); several are Config.bind_socket (AF_INET for a
    name, so 127.0.0.1 even when ::1 comes first)."""
    assert _listen_addresses(dual_host, 8000, workers=1) == [
        (socket.AF_INET6, ("::1", 8000, 0, 0)),
        (socket.AF_INET, ("127.0.0.1", 8000)),
    ]
    assert _listen_addresses(dual_host, 8000, workers=2) == [(socket.AF_INET, ("127.0.0.1", 8000))]
    assert _listen_addresses("::1", 8000, workers=2) == [(socket.AF_INET6, ("::1", 8000, 0, 0))]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_on_the_ipv4_address_is_refused_though_ipv6_comes_first(
    dual_host: str, ipv4_port_in_use: int, workers: int
) -> None:
    """The check probed only the first address (::1), free, and let uvicorn fail on 127.0.0.1 after the demo."""
    with pytest.raises(typer.Exit):
        _check_port_free(dual_host, ipv4_port_in_use, workers)


def test_several_workers_are_not_refused_for_an_ipv6_address_uvicorn_does_not_bind(
    dual_host: str, ipv6_port_in_use: int
) -> None:
    """The check refused the port in use on ::1, which uvicorn's bind_socket never binds for a host name."""
    _check_port_free(dual_host, ipv6_port_in_use, workers=2)
    with pytest.raises(typer.Exit):  # one worker binds ::1 too
        _check_port_free(dual_host, ipv6_port_in_use, workers=1)


def test_an_address_family_this_machine_lacks_is_skipped_as_create_server_skips_it(
    dual_host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With IPv6 off, socket(AF_INET6) fails (EAFNOSUPPORT): asyncio's create_server skips that address and serves
    on the others, so the check must not refuse the host (it raised the OSError: a traceback)."""
    real_socket = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object, **kwargs: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", no_ipv6)
    with real_socket(socket.AF_INET, socket.SOCK_STREAM) as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    _check_port_free(dual_host, port, workers=1)  # no exception: 127.0.0.1 is free
