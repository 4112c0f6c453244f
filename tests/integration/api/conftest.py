"""The HTTP API in-process (FastAPI TestClient, lifespan run), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy.orm import Session, sessionmaker

from metering.api.app import create_app
from metering.auth import Scope, create_token
from metering.config import ApiSettings, Settings

PROBLEM = "application/problem+json"


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def post_events(client: TestClient, records: Sequence[Any], secret: str | None) -> Response:
    headers = {"Content-Type": "application/json", **(bearer(secret) if secret else {})}
    return client.post("/v1/events", content=orjson.dumps({"events": list(records)}), headers=headers)


def assert_problem(response: Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["code"] == code
    assert body["type"] == f"https://metering.dev/problems/{code}"
    assert body["title"] and body["detail"]
    return body


def app_settings(db_url: str, tmp_path: Path, **api: Any) -> Settings:
    return Settings(env="test", database_url=db_url, data_dir=tmp_path, api=ApiSettings(**api))


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return app_settings(db_url, tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def make_token(session_factory: sessionmaker[Session]) -> Callable[..., str]:
    """A committed token with these scopes (default: ingest); returns its secret."""

    def make(*scopes: Scope, tenant: str | None = None, name: str = "test") -> str:
        with session_factory() as session:
            _row, secret = create_token(session, name, scopes or (Scope.INGEST,), tenant_id=tenant)
            session.commit()
        return secret

    return make
