"""The composition root: settings → database, secrets, spool, flusher, providers, runtime.

Used by the edges (CLI now, the API later). Nothing here runs at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from metering.config import Settings
from metering.crypto import SecretBox, secret_box_from_settings
from metering.db import migrate
from metering.db.engine import make_engine, make_session_factory
from metering.llm.pool import ProviderPool
from metering.llm.providers import make_provider
from metering.llm.providers.base import Provider, ProviderConfig
from metering.llm.resolution import PlatformLLM
from metering.llm.settings_source import CachedSettings
from metering.llm.settings_store import DatabaseSettings
from metering.runtime import Runtime
from metering.spool import DatabaseSink, Flusher, Sink, Spool
from metering.spool.http_sink import HttpSink


def platform_llm(settings: Settings) -> PlatformLLM:
    return PlatformLLM(
        provider=settings.platform.provider,
        model=settings.platform.model,
        base_url=settings.platform.base_url,
        timeout_s=settings.platform.timeout_s,
        max_retries=settings.platform.max_retries,
        api_keys={p: settings.platform_api_key(p) for p in ("anthropic", "openai")},
        keyed_base_urls=settings.platform.keyed_base_urls,
    )


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    box: SecretBox
    llm_settings: CachedSettings
    providers: ProviderPool
    spool: Spool
    flusher: Flusher
    runtime: Runtime
    drain_on_close: bool = True  # False once a flush has failed: waiting again at exit would not help

    async def aclose(self, *, drain: bool = True) -> None:
        await self.providers.aclose()
        self.close(drain=drain)

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        self.flusher.stop(drain=drain, timeout=timeout)
        self.spool.close()
        self.engine.dispose()


def make_sink(settings: Settings, sessions: sessionmaker[Session] | None) -> Sink:
    """The spool's sink from settings: the database (ingest in-process, through ``sessions``) or a metering
    service over HTTP (no sessions needed)."""
    spool = settings.spool
    if spool.sink == "http":
        assert spool.http_url is not None and spool.http_token is not None  # the settings validator checked
        return HttpSink(
            spool.http_url, spool.http_token.get_secret_value(), timeout_s=spool.http_timeout_s, gzip=spool.http_gzip
        )
    if sessions is None:
        raise ValueError("the database sink needs sessions")
    return DatabaseSink(sessions, markup_pct=settings.billing.markup_pct)


def open_drainer(settings: Settings) -> tuple[Flusher, Engine | None]:
    """A flusher for every slot of the spool directory, run as its own process (``metering spool drain``). With
    the HTTP sink, the database is not touched (no engine: it may be unreachable from this host, or absent)."""
    if settings.spool.sink == "http":
        engine = None
        sink = make_sink(settings, None)
    else:
        url = settings.resolved_database_url
        migrate.upgrade(url)
        engine = make_engine(url)
        sink = make_sink(settings, make_session_factory(engine))
    flusher = Flusher(
        settings.spool_dir,
        sink,
        batch_size=settings.spool.batch_size,
        interval_s=settings.spool.flush_interval_s,
        max_backoff_s=settings.spool.max_backoff_s,
    )
    return flusher, engine


def open_services(settings: Settings, *, run_migrations: bool = True) -> Services:
    url = settings.resolved_database_url
    if run_migrations:
        migrate.upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    box = secret_box_from_settings(settings)
    llm_settings = CachedSettings(DatabaseSettings(sessions, box), ttl_s=settings.settings_cache_ttl_s)

    def factory(config: ProviderConfig) -> Provider:
        return make_provider(config, settings.simulated)

    providers = ProviderPool(factory, max_adapters=settings.provider_pool_size)
    llm_settings.on_key_replaced = providers.retire_key  # a key changed by another process, too
    spool = Spool(settings.spool_dir, segment_bytes=settings.spool.segment_bytes, fsync=settings.spool.fsync).open()
    flusher = Flusher(
        spool,
        make_sink(settings, sessions),
        batch_size=settings.spool.batch_size,
        interval_s=settings.spool.flush_interval_s,
        max_backoff_s=settings.spool.max_backoff_s,
    )
    if settings.spool.flusher == "thread":
        flusher.start()
    runtime = Runtime(settings=llm_settings, platform=platform_llm(settings), providers=providers, recorder=spool)
    return Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        box=box,
        llm_settings=llm_settings,
        providers=providers,
        spool=spool,
        flusher=flusher,
        runtime=runtime,
    )
