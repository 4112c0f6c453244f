"""The CLI's audit entries: who is ``cli:<os user>@<host>`` (no API token, no request id).

A command records its entry in the session of its change, after the change and before ``admin_session``
commits, so both commit together and a failed command leaves none. What an entry says of the change comes
from ``metering.audit_snapshots``, as for the API.
"""

from __future__ import annotations

import getpass
import os
import platform
import socket
from typing import Any

from sqlalchemy.orm import Session

from metering import audit

UNKNOWN_USER = "unknown"
UNKNOWN_HOST = "unknown-host"


def _os_user() -> str:
    try:
        name = getpass.getuser()  # LOGNAME, USER, LNAME, USERNAME, then the password database
    except (KeyError, OSError, ImportError):  # a uid with no passwd entry (containers), no pwd module
        name = ""
    if not name and hasattr(os, "getuid"):
        name = f"uid{os.getuid()}"
    return name.strip() or UNKNOWN_USER


def _host() -> str:
    try:
        name = socket.gethostname()
    except OSError:
        name = ""
    return (name or platform.node()).strip() or UNKNOWN_HOST


def cli_actor() -> audit.LocalActor:
    """``cli:alice@build-1``, at most as long as the column (the host is cut first, the prefix kept)."""
    return audit.LocalActor(name=f"cli:{_os_user()}@{_host()}"[: audit.MAX_ACTOR_NAME])


def record(
    session: Session,
    action: str,
    target: str,
    *,
    before: Any,
    after: Any,
    tenant_id: str | None = None,
    secret_changed: bool = False,
) -> None:
    """One entry in ``session``'s transaction (flushed; the command's ``admin_session`` commits it); none for a change
    that changed nothing (``before`` equals ``after``, unless ``secret_changed``: see ``audit.record``)."""
    audit.record(
        session,
        actor=cli_actor(),
        action=action,
        target=target,
        before=before,
        after=after,
        tenant_id=tenant_id,
        secret_changed=secret_changed,
    )
