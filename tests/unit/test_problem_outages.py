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
        # A failover's demoted primary, or a database made read-only: InternalErrors, yet retrying later helps.
        psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"),
        sqlalchemy.exc.InternalError("INSERT", {}, psycopg.errors.ReadOnlySqlTransaction("read-only transaction")),
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


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.StringDataRightTruncation("value too long"),
        # PostgreSQL's program limits are OperationalErrors to psycopg, but the same request exceeds them again: a
        # 503 had the spool's HTTP sink retry the batch forever instead of isolating the event at fault.
        psycopg.errors.ProgramLimitExceeded("index row size 3248 exceeds btree version 4 maximum 2704"),
        sqlalchemy.exc.OperationalError("INSERT", {}, psycopg.errors.ProgramLimitExceeded("index row size")),
        # Another InternalError is a bug (e.g. a statement run after an error in the same transaction).
        sqlalchemy.exc.InternalError("SELECT", {}, psycopg.errors.InFailedSqlTransaction("transaction is aborted")),
    ],
)
def test_a_refusal_stays_a_500(error: Exception) -> None:
    app = FastAPI()
    problems.install(app)

    @app.get("/x")
    def fail() -> None:
        raise error

    response = TestClient(app, raise_server_exceptions=False).get("/x")
    assert response.status_code == 500 and response.json()["code"] == "internal_error"
