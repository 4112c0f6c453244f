"""``usage`` orders its rows by the group values, in code point order on both databases: on PostgreSQL whatever the
database's collation (SQLite compares text by its bytes, so does PostgreSQL's C collation; a database created with
an ICU or glibc locale, e.g. ``en_US.UTF-8``, the default of Debian's and Docker's PostgreSQL, sorts by language)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
from sqlalchemy.orm import Session

from metering.billing.ingest import ingest
from metering.billing.usage_queries import GROUPS, usage
from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory
from metering.events import event_from_record
from tests.conftest import temporary_pg_database
from tests.fakes.events import record

NAMES = ("ann", "Bob", "a b", "a_b", "Émile", "zed", "ann-2", "Ann")
START = datetime(2026, 5, 1, tzinfo=UTC)
NOW = START + timedelta(days=5)
ICU_ENGLISH = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"


def _seed(session: Session) -> None:
    records = [
        record(
            i,
            tenant_id=NAMES[i % len(NAMES)],
            user_id=NAMES[(i + 3) % len(NAMES)],
            extension_id=NAMES[(i + 5) % len(NAMES)],
            function=NAMES[(i + 1) % len(NAMES)],
            purpose=NAMES[(i + 2) % len(NAMES)],
            model=NAMES[(i + 4) % len(NAMES)],
            provider=("openai", "anthropic", "open-ai")[i % 3],
            occurred_at=START + timedelta(hours=5 * i),
            **({"status": "error", "error_type": "server_error", "stop_reason": None} if i % 4 == 0 else {}),
        )
        for i in range(3 * len(NAMES))
    ]
    assert not ingest(session, [event_from_record(r) for r in records], markup_pct=Decimal(20), now=NOW).rejected


def _check_order(session: Session) -> None:
    text_groups = [name for name in GROUPS if name not in ("byollm", "hour", "day")]
    windows = [(START, NOW), (START + timedelta(hours=7), NOW - timedelta(hours=3))]  # whole days + edges, or not
    for start, end in windows:
        for name in text_groups:
            personal = ["tenant", "user"] if name == "tenant" else ["tenant", name]  # the per-user rollups
            for group_by in ([name], [name, "day"], ["hour", name], personal):
                keys = [tuple(g.key.values()) for g in usage(session, start, end, group_by)]
                assert len(keys) > 1 and keys == sorted(keys), (group_by, keys)


def test_rows_are_in_code_point_order(session_factory) -> None:
    with session_factory() as session:
        _seed(session)
        session.commit()
        _check_order(session)


def test_rows_are_in_code_point_order_whatever_the_database_collation() -> None:
    try:
        database = temporary_pg_database(ICU_ENGLISH)
        url = database.__enter__()
    except psycopg.errors.FeatureNotSupported as exc:  # PostgreSQL built without ICU
        pytest.skip(str(exc))
    try:
        migrate.upgrade(url)
        engine = make_engine(url)
        try:
            with make_session_factory(engine)() as session:
                _seed(session)
                session.commit()
                _check_order(session)
        finally:
            engine.dispose()
    finally:
        database.__exit__(None, None, None)
