"""Engine and session factory. Nothing is built at import time."""

from __future__ import annotations

import os
import re
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import Pool

from metering.errors import ConfigError


def safe_url(url: str) -> str:
    """``url`` as it may be shown: its password as ``***`` (also when it cannot be parsed)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", url)


def database_problem(url: str, exc: BaseException) -> str:
    """One line naming the database (never its password) and why it cannot be used (the driver's own reason)."""
    cause = " ".join(str(getattr(exc, "orig", None) or exc).split())
    try:
        password = make_url(url).password
    except ArgumentError:
        password = None
    if password:
        cause = cause.replace(str(password), "***")
    return f"cannot use the database at {safe_url(url)}: {cause}"


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs. A URL that cannot be parsed is a ConfigError."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(database_problem(url, exc)) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_end_what_is_left_open(dbapi_connection: Any, _record: Any, _state: Any) -> None:
    """A connection back in the pool is in no transaction. After a COMMIT SQLite refused leaving the transaction
    open (``database is locked`` at COMMIT: SQLite keeps it active, to be retried), SQLAlchemy skips its rollback on
    return (it counts the transaction as ended by the COMMIT it attempted): the idle pooled connection held the
    write lock (every other writer waited out the busy timeout, then failed) and the next session given it committed
    the failed transaction's writes with its own."""
    if dbapi_connection.in_transaction:
        dbapi_connection.rollback()


_PG_SESSION_OPTIONS = "-c jit=off -c plan_cache_mode=force_custom_plan"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; a ConfigError (naming the URL without its password) when none can be made for it:
    an unknown dialect, a driver that is not installed, a SQLite directory that cannot be created. A process forked
    from this one starts with an empty pool of it (see ``_after_fork_in_child``)."""
    try:
        engine = _make_engine(normalise_url(url), **kwargs)
    except (ArgumentError, ImportError, OSError) as exc:
        raise ConfigError(database_problem(url, exc)) from None
    if not (engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:")):
        _ENGINES.add(engine)  # (a child's copy of an in-memory database is its own: a new pool would be empty)
    return engine


def _make_engine(url: str, **kwargs: Any) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "reset", _sqlite_end_what_is_left_open)
        return engine
    # Every session: no JIT (it costs 50-70 ms of compilation on each aggregate query that crosses its cost
    # threshold, more than the query itself) and a plan for each execution's values (psycopg prepares a
    # statement on its 5th run, and PostgreSQL's generic plan for a time window guesses 0.5 % of the rows:
    # 2-2.4x slower usage queries, bench/RESULTS.md). Options already in the URL come after, so they win.
    options = f"{_PG_SESSION_OPTIONS} {parsed.query.get('options', '')}".strip()
    connect_args = {**kwargs.pop("connect_args", {}), "options": options}
    return create_engine(
        parsed.difference_update_query(["options"]), pool_pre_ping=True, connect_args=connect_args, **kwargs
    )


# Engines made here, for the child of a fork (a prefork server, a task queue, multiprocessing's fork).
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
# The pools a forked child inherited, kept referenced there and never used: collecting them would close the
# parent's SQLite handles in the child (psycopg closes nothing in a process other than the one that connected).
_INHERITED_POOLS: list[Pool] = []


def _after_fork_in_child() -> None:
    """The connections pooled at the fork (a PostgreSQL socket, a SQLite handle) are the parent's: a child checking
    one out (its in-process DatabaseSink, its flush()) talked over the parent's socket, their messages interleaved.
    The child gets a new, empty pool instead: ``dispose(close=False)``, as SQLAlchemy documents for os.fork()."""
    for engine in list(_ENGINES):
        _INHERITED_POOLS.append(engine.pool)
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
