"""Probes: /healthz always answers; /readyz is 200 only when the database is reachable and at head."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from metering.api.app import create_app
from metering.config import Settings
from metering.db import migrate
from tests.conftest import temporary_pg_database
from tests.integration.api.conftest import assert_problem


def test_healthz(client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_at_head(client, db_url) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"database": "ok", "migrations": "head", "revision": migrate.head_revision(db_url)}


@pytest.fixture(params=["sqlite", "postgresql"])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    with temporary_pg_database() as url:
        yield url


def test_readyz_is_503_on_a_database_that_is_not_migrated(unmigrated_url, tmp_path) -> None:
    settings = Settings(env="test", database_url=unmigrated_url, data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        body = assert_problem(client.get("/readyz"), 503, "not_ready")
        assert "not migrated" in body["detail"] and "metering migrate" in body["detail"]
        assert client.get("/healthz").status_code == 200
        migrate.upgrade(unmigrated_url)
        assert client.get("/readyz").json()["migrations"] == "head"


def test_readyz_is_503_when_the_database_is_unreachable(tmp_path) -> None:
    settings = Settings(env="test", database_url="postgresql://postgres@127.0.0.1:9/none", data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        body = assert_problem(client.get("/readyz"), 503, "not_ready")
        assert body["detail"] == "the database is unreachable"
        assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_is_503_when_the_sqlite_file_is_deleted_while_serving(tmp_path) -> None:
    """Open connections keep writing to a deleted file that nothing will read again: not ready (it said 200)."""
    path = tmp_path / "gone.db"
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    with TestClient(create_app(Settings(env="test", database_url=url, data_dir=tmp_path))) as client:
        assert client.get("/readyz").status_code == 200
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        body = assert_problem(client.get("/readyz"), 503, "not_ready")
        assert "gone" in body["detail"]
