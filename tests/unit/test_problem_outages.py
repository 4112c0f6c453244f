"""A database outage is a 503 however it surfaces (SQLAlchemy's wrapped errors, or the driver's own from the raw
connection ingest writes through); a 500 stays for bugs (a spool's HTTP sink isolates events on a 500)."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
import sqlalchemy.exc
from fastapi import FastAPI
from fastapi.testclient import TestClient

from metering.api import problems


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.DeadlockDetected("deadlock detected"),
        psycopg.errors.SerializationFailure("could not serialize access"),
        psycopg.OperationalError("server closed the connection unexpectedly"),
        psycopg.InterfaceError("the connection is closed"),
        sqlite3.OperationalError("database is locked"),
        sqlalchemy.exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"),
    ],
)
def test_outages_are_503(error: Exception) -> None:
    app = FastAPI()
    problems.install(app)

    @app.get("/x")
    def fail() -> None:
        raise error

    response = TestClient(app, raise_server_exceptions=False).get("/x")
    assert response.status_code == 503 and response.json()["code"] == "database_unavailable"


def test_a_refusal_stays_a_500() -> None:
    app = FastAPI()
    problems.install(app)

    @app.get("/x")
    def fail() -> None:
        raise psycopg.errors.StringDataRightTruncation("value too long")

    response = TestClient(app, raise_server_exceptions=False).get("/x")
    assert response.status_code == 500 and response.json()["code"] == "internal_error"
