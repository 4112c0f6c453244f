"""Engine settings on PostgreSQL: the session options the usage queries rely on, with the URL's own kept."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import make_url

from metering.db.engine import make_engine


def test_postgresql_sessions_plan_each_query_for_its_values_without_jit(pg_url: str) -> None:
    url = make_url(pg_url).update_query_dict({"options": "-c work_mem=8MB -c jit=on"})
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            settings = [conn.execute(text(f"SHOW {name}")).scalar() for name in ("plan_cache_mode", "work_mem", "jit")]
    finally:
        engine.dispose()
    assert settings == ["force_custom_plan", "8MB", "on"]  # the URL's options come last and win
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW jit")).scalar() == "off"
    finally:
        engine.dispose()
