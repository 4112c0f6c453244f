"""Options the CLI bounds or checks before it acts (in-process, on both databases)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from metering.billing.ingest import ingest
from metering.events import event_from_record
from tests.fakes.events import record


@pytest.mark.parametrize("last", ["-1", "0", "10001", "99999999999999999999"])
def test_usage_last_is_bounded(run, last) -> None:
    """-1 was a PostgreSQL traceback (LIMIT must not be negative) and every event on SQLite; 1e20 an OverflowError."""
    done = run("usage", "--last", last)
    assert done.exit_code == 2 and isinstance(done.exception, SystemExit), (done.output, done.exception)
    assert "Invalid value for '--last'" in done.output
    assert run("usage", "--last", "10000").exit_code == 0


def test_ledger_export_into_a_missing_directory_is_a_clear_error(run, tmp_path) -> None:
    out = tmp_path / "nodir" / "x.csv"
    done = run("billing", "ledger-export", "2026-11", "-o", str(out))  # was a FileNotFoundError traceback
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), (done.output, done.exception)
    assert done.stderr == f"error: cannot write {out}: No such file or directory\n"
    assert not out.parent.exists()


def test_invoice_export_into_a_missing_directory_is_a_clear_error(run, tmp_path, session_factory) -> None:
    now = datetime.now(UTC)
    with session_factory() as session:
        event = event_from_record(record(0, tenant_id="acme", user_id="alice", occurred_at=now - timedelta(minutes=5)))
        ingest(session, [event], markup_pct=Decimal(20), now=now)
        session.commit()
    out = tmp_path / "nodir" / "inv.csv"
    done = run("billing", "invoices", "export", "acme", "alice", now.strftime("%Y-%m"), "-o", str(out))
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), (done.output, done.exception)
    assert done.stderr == f"error: cannot write {out}: No such file or directory\n"


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_serve_refuses_a_port_outside_1_to_65535(run, monkeypatch, port) -> None:
    import uvicorn

    served: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: served.append(kwargs))  # 99999 used to listen
    done = run("serve", "--no-migrate", "--port", port)
    assert done.exit_code == 2 and "Invalid value for '--port'" in done.output, done.output
    assert served == []
    assert run("serve", "--no-migrate", "--port", "65535").exit_code == 0 and served[0]["port"] == 65535
