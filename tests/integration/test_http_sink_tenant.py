"""A spool's HTTP sink whose token is bound to another tenant than some of its events: the service refuses those
events one by one (`tenant mismatch`). That is the operator's misconfiguration, not the events' fault: they are kept
in the spool and retried, like a batch a wrong token (401) keeps, and delivered once the token is fixed. They were
dead-lettered, out of billing until someone noticed and redrove them."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from metering.db.models import UsageEventRow
from metering.spool import Flusher, Spool
from metering.spool.http_sink import HttpSink
from tests.fakes.events import record
from tests.integration.serving import clean_env, create_token, metering, serving

pytestmark = pytest.mark.slow


def _token_of(env: dict[str, str], tenant: str) -> str:
    done = metering(env, "tokens", "create", "--name", f"spool-{tenant}", "--scope", "ingest", "--tenant", tenant)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_events_of_another_tenant_than_the_token_s_are_kept_until_the_token_is_fixed(
    tmp_path: Path, db_url: str, session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    env = clean_env(METERING_DATABASE_URL=db_url, METERING_DATA_DIR=str(tmp_path / "data"))
    bound = _token_of(env, "tenant-2")
    records = [record(i, tenant_id="tenant-1" if i % 2 else "tenant-2") for i in range(10)]
    caplog.set_level(logging.WARNING, logger="metering.spool")
    with serving(env, tmp_path) as server, Spool(tmp_path / "spool") as spool:
        for rec in records:
            spool.append(orjson.dumps(rec))
        wrong = Flusher(spool, HttpSink(server.base, bound), interval_s=0.01, max_backoff_s=0.05)
        assert not wrong.flush(timeout=1)  # the token is wrong for half of them: kept, retried
        kept = wrong.stats
        wrong.stop(drain=False)
        fixed = Flusher(spool, HttpSink(server.base, create_token(env, "ingest", name="any-tenant")), interval_s=0.01)
        assert fixed.flush(timeout=30)
        stats = fixed.stats
        fixed.stop()
    assert (kept.rejected, kept.pending) == (0, 10), kept
    assert "tenant mismatch" in (kept.last_error or "") and "tenant-1" in (kept.last_error or ""), kept.last_error
    assert "tenant mismatch" in caplog.text and bound not in caplog.text
    # The token's own tenant's events went in at the first try: a duplicate on each retry, never a second row.
    assert (stats.delivered, stats.duplicates, stats.rejected, stats.pending) == (5, 5, 0, 0), stats
    assert not (tmp_path / "spool" / "rejected.jsonl").exists()
    with session_factory() as session:
        stored = sorted(str(e) for e in session.scalars(select(UsageEventRow.event_id)))
    assert stored == sorted(r["event_id"] for r in records)
