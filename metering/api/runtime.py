"""The extension runtime of the HTTP service, built on first use and closed (spool drained) at shutdown.

The same pieces as ``metering.wiring.open_services``, over the app's engine: LLM settings read from the
database (cached, invalidated after admin writes), a provider pool, this process's spool and its flusher
delivering to the same database. Nothing is built until an endpoint needs it, so an app that never invokes
an extension opens no spool.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from metering.config import Settings
from metering.crypto import SecretBox, secret_box_from_settings
from metering.db.engine import make_engine, make_session_factory
from metering.llm.pool import ProviderPool
from metering.llm.providers import make_provider
from metering.llm.providers.base import Provider, ProviderConfig
from metering.llm.settings_source import CachedSettings
from metering.llm.settings_store import DatabaseSettings
from metering.runtime import Runtime
from metering.spool import DatabaseSink, Flusher, Spool
from metering.spool.inspect import slot_states
from metering.wiring import platform_llm

log = logging.getLogger("metering.api")
_SETTINGS_POOL = {"pool_size": 2, "max_overflow": 2}


class LazyRuntime:
    """The app's secret box and extension runtime, each built once, on first use (thread-safe)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._lock = threading.Lock()
        self._box: SecretBox | None = None
        self._runtime: Runtime | None = None
        self.llm_settings: CachedSettings | None = None
        self.providers: ProviderPool | None = None
        self.spool: Spool | None = None
        self.flusher: Flusher | None = None
        self.settings_engine: Engine | None = None

    @property
    def box(self) -> SecretBox:
        with self._lock:
            if self._box is None:
                self._box = secret_box_from_settings(self.settings)
            return self._box

    @property
    def built(self) -> bool:
        return self._runtime is not None

    def get(self) -> Runtime:
        box = self.box
        with self._lock:
            if self._runtime is None:
                self._runtime = self._build(box)
            return self._runtime

    def _build(self, box: SecretBox) -> Runtime:
        settings = self.settings
        # The metered ctx.llm reads LLM settings and budgets on the event loop (cache misses). From the requests' pool,
        # that read could wait on the event loop itself: sessions of sync endpoints are closed by the loop, so with
        # the pool exhausted the worker hung for good (found under concurrent invokes and event batches). Its own
        # small pool is only ever used by those short reads, one at a time per event loop, so it never waits on it.
        self.settings_engine = make_engine(settings.resolved_database_url, **_SETTINGS_POOL)
        reads = make_session_factory(self.settings_engine)
        self.llm_settings = CachedSettings(DatabaseSettings(reads, box), ttl_s=settings.settings_cache_ttl_s)

        def factory(config: ProviderConfig) -> Provider:
            return make_provider(config, settings.simulated)

        self.providers = ProviderPool(factory, max_adapters=settings.provider_pool_size)
        self.llm_settings.on_key_replaced = self.providers.retire_key  # a key changed by another process, too
        spool = Spool(settings.spool_dir, segment_bytes=settings.spool.segment_bytes, fsync=settings.spool.fsync)
        self.spool = spool.open()
        self.flusher = Flusher(
            self.spool,
            DatabaseSink(self.sessions, markup_pct=settings.billing.markup_pct),
            batch_size=settings.spool.batch_size,
            interval_s=settings.spool.flush_interval_s,
            max_backoff_s=settings.spool.max_backoff_s,
        )
        if settings.spool.flusher == "thread":
            self.flusher.start()
        return Runtime(
            settings=self.llm_settings, platform=platform_llm(settings), providers=self.providers, recorder=self.spool
        )

    def resume_pending(self) -> bool:
        """At startup: when the spool holds events an earlier run left undelivered (a crash, a database that was
        down at shutdown), build the runtime now so its flusher delivers them, instead of waiting for the first
        invoke. True when it did."""
        if self.settings.spool.flusher != "thread" or not self.settings.spool_dir.exists():
            return False
        if not any(state.pending for state in slot_states(self.settings.spool_dir)):
            return False
        log.info("the spool holds undelivered events from an earlier run: delivering them")
        self.get()
        return True

    def invalidate_settings(self) -> None:
        """Forget cached LLM settings (call after an admin change has committed)."""
        if self.llm_settings is not None:
            self.llm_settings.invalidate()

    async def retire_key(self, api_key: str) -> None:
        """Close the provider adapters of a BYOLLM key that was replaced or deleted (each once no call uses it). Runs
        on the event loop that makes the calls (an async background task): the pool takes no lock."""
        if self.llm_settings is not None:
            self.llm_settings.forget_key(api_key)  # retired here: no reload need compare it
        providers = self.providers
        if providers is not None and providers.retire_key(api_key):
            await providers.wait_closed()

    def flush(self, timeout: float = 30.0) -> bool:
        """Deliver every event spooled so far to the database. True when done (or nothing was built)."""
        return self.flusher.flush(timeout) if self.flusher is not None else True

    async def aclose(self, *, drain: bool = True, drain_timeout_s: float = 30.0) -> None:
        """Close providers, then stop the flusher (delivering what is spooled first) and close the spool."""
        with self._lock:
            providers, flusher, spool = self.providers, self.flusher, self.spool
            settings_engine = self.settings_engine
            self._runtime = self.providers = self.flusher = self.spool = self.llm_settings = None
            self.settings_engine = None
        if providers is not None:
            await providers.aclose()
        if flusher is not None:
            drained = await asyncio.to_thread(flusher.stop, drain=drain, timeout=drain_timeout_s)
            if drain and not drained:
                log.warning("the spool was not fully delivered at shutdown; it stays on disk for the next start")
        if spool is not None:
            spool.close()
        if settings_engine is not None:
            settings_engine.dispose()
