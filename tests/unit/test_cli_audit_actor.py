"""Who the CLI's audit entries name: ``cli:<os user>@<host>``, bounded to the column, with fallbacks."""

from __future__ import annotations

import getpass
import os
import platform
import socket

import pytest

from metering import audit
from metering.cli import audit_trail


def test_the_actor_is_the_os_user_at_the_host_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getuser", lambda: "alice")
    monkeypatch.setattr(socket, "gethostname", lambda: "build-1")
    actor = audit_trail.cli_actor()
    assert (actor.name, actor.token_id) == ("cli:alice@build-1", None)


def test_a_user_or_host_that_cannot_be_read_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_user() -> str:
        raise KeyError("getpwuid(): uid not found: 4242")

    def no_host() -> str:
        raise OSError("no hostname")

    monkeypatch.setattr(getpass, "getuser", no_user)
    monkeypatch.setattr(socket, "gethostname", no_host)
    monkeypatch.setattr(os, "getuid", lambda: 4242, raising=False)
    monkeypatch.setattr(platform, "node", lambda: "")
    assert audit_trail.cli_actor().name == "cli:uid4242@unknown-host"
    monkeypatch.setattr(getpass, "getuser", lambda: " ")
    monkeypatch.delattr(os, "getuid", raising=False)
    monkeypatch.setattr(platform, "node", lambda: "node-7")
    assert audit_trail.cli_actor().name == "cli:unknown@node-7"


def test_the_name_is_bounded_to_the_column(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getuser", lambda: "bob")
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 500)
    name = audit_trail.cli_actor().name
    assert len(name) == audit.MAX_ACTOR_NAME and name.startswith("cli:bob@hhh")
