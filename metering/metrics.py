"""Prometheus metrics of one app (``GET /metrics``): usage read from the hourly rollups at scrape time, and
ingest counters incremented only after the ingest transaction commits.

Nothing happens at import: each app builds its own ``CollectorRegistry`` on first use (``metrics_for``), so
tests and several apps in one process never share series. Labels carry only bounded sets: provider, model,
purpose, extension, byollm, status (never a tenant or user id, a prompt or a key); only N models, N values of each
other label and a cap of label sets have series of their own, admitted by scrapes and kept (``metric_labels``:
no series ever takes a sum out of ``other``, so none steps down when the ranking changes); the rest are folded into
``other`` by the database (``folded_usage_totals``): a scrape reads a bounded number of rows.

Money is stored in integer nano-USD; it becomes a float only here, in the exposition.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from metering.billing.ingest import IngestResult
from metering.db.metric_labels import admit_label_values
from metering.db.snapshot import read_snapshot
from metering.db.usage_totals import TOTAL_COLUMNS, FoldedTotals, folded_usage_totals, unpriced_events

# prometheus_client's own variable, set by `metering serve --workers N` (N > 1) for its workers: a directory where
# every worker's counters live (one mmap file each), so that the worker answering a scrape sums them all.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

LABELS = ("provider", "model", "purpose", "extension", "byollm", "status")
NANOS_PER_USD = 1_000_000_000
# (label value of ``kind``, index in LabelTotals.counters)
TOKEN_KINDS = tuple(
    (kind, TOTAL_COLUMNS.index(f"{kind}_tokens"))
    for kind in ("input", "output", "cache_read", "cache_write", "cache_write_1h", "reasoning")
)
CALLS, BILLED, SHADOW, SEARCHES = (
    TOTAL_COLUMNS.index(c) for c in ("calls", "billed_nanos", "shadow_nanos", "web_searches")
)
INGEST_RESULTS = ("inserted", "duplicate", "rejected")

SessionsGetter = Callable[[], "sessionmaker[Session] | None"]
log = logging.getLogger("metering.metrics")


def _families() -> tuple[CounterMetricFamily, ...]:
    return (
        CounterMetricFamily("metering_llm_calls", "Metered LLM provider calls.", labels=LABELS),
        CounterMetricFamily(
            "metering_llm_tokens",
            "Tokens of metered LLM calls by kind (input includes cache_read and cache_write; cache_write includes "
            "cache_write_1h; output includes reasoning).",
            labels=(*LABELS, "kind"),
        ),
        CounterMetricFamily(
            "metering_llm_web_searches",
            "Web searches providers ran for metered LLM calls (charged per search, on top of tokens).",
            labels=LABELS,
        ),
        CounterMetricFamily(
            "metering_billed_usd", "Amount billed to users (USD; BYOLLM calls are never billed).", labels=LABELS
        ),
        CounterMetricFamily(
            "metering_shadow_usd",
            "What BYOLLM calls would have cost at platform prices (USD; not billed).",
            labels=LABELS,
        ),
    )


def _unpriced_family() -> GaugeMetricFamily:
    return GaugeMetricFamily("metering_unpriced_events", "Usage events held unpriced (no known price for the model).")


class UsageCollector(Collector):
    """Reads the rollups at scrape time; ``sessions`` returns None before the app has a database (no samples)."""

    def __init__(self, sessions: SessionsGetter, *, top_models: int, top_labels: int, max_label_sets: int) -> None:
        self._sessions = sessions
        self._top_models = top_models
        self._top_labels = top_labels
        self._max_label_sets = max_label_sets

    def describe(self) -> Iterable[Metric]:
        # Registering calls describe(): no database query then.
        return [*_families(), _unpriced_family()]

    def collect(self) -> Iterator[Metric]:
        factory = self._sessions()
        if factory is None:
            return
        totals, unpriced = self._read(factory)
        if totals.undecided and self._admit(factory):  # values or label sets stored since the last admission
            totals, unpriced = self._read(factory)
        # Not admitted (another scrape is admitting them, or the database refuses the write): this scrape leaves
        # them out. Counted as ``other`` instead, they would leave it once admitted (a step down, a counter reset).
        calls, tokens, searches, billed, shadow = _families()
        for row in totals.rows:
            values = [row.provider, row.model, row.purpose, row.extension, str(row.is_byollm).lower(), row.status]
            sums = row.counters
            calls.add_metric(values, sums[CALLS])
            for kind, index in TOKEN_KINDS:
                tokens.add_metric([*values, kind], sums[index])
            searches.add_metric(values, sums[SEARCHES])
            billed.add_metric(values, sums[BILLED] / NANOS_PER_USD)
            shadow.add_metric(values, sums[SHADOW] / NANOS_PER_USD)
        gauge = _unpriced_family()
        gauge.add_metric([], unpriced)
        yield from (calls, tokens, searches, billed, shadow, gauge)

    def _read(self, factory: sessionmaker[Session]) -> tuple[FoldedTotals, int]:
        with factory() as session:
            read_snapshot(session)  # the counters and the gauge from one state of the database
            totals = folded_usage_totals(
                session,
                top_models=self._top_models,
                top_labels=self._top_labels,
                max_label_sets=self._max_label_sets,
            )
            return totals, unpriced_events(session)

    def _admit(self, factory: sessionmaker[Session]) -> bool:
        """True when admitted; False when another scrape is admitting, or the database refused (read-only, or any
        error: logged): this scrape then answers without the values and sets not admitted, never fails."""
        try:
            with factory() as session:
                done = admit_label_values(
                    session,
                    top_models=self._top_models,
                    top_labels=self._top_labels,
                    max_label_sets=self._max_label_sets,
                )
                session.commit()
        except SQLAlchemyError as exc:
            log.warning(
                "metrics: cannot record the label values first seen (%s); left out until a scrape can",
                " ".join(str(getattr(exc, "orig", None) or exc).split()),
            )
            return False
        return done


class AppMetrics:
    """One app's registry: the rollup collector and the ingest counters (with workers, summed over all of them)."""

    def __init__(
        self, sessions: SessionsGetter, *, top_models: int = 20, top_labels: int = 50, max_label_sets: int = 500
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        collector = UsageCollector(
            sessions, top_models=top_models, top_labels=top_labels, max_label_sets=max_label_sets
        )
        self.registry.register(collector)
        shared = os.environ.get(MULTIPROCESS_DIR_ENV)  # set before the worker started (it imported prometheus_client)
        self.ingest_events = Counter(
            "metering_ingest_events",
            "Events received by POST /v1/events (every worker's), counted after the batch committed.",
            ["result"],
            registry=None if shared else self.registry,  # with workers, each writes its file and scrapes sum them
        )
        if shared:
            MultiProcessCollector(self.registry, path=shared)
        for result in INGEST_RESULTS:
            self.ingest_events.labels(result)  # every series exists from the start, at 0

    def record_ingest(self, *, inserted: int, duplicates: int, rejected: int) -> None:
        for result, count in zip(INGEST_RESULTS, (inserted, duplicates, rejected), strict=True):
            if count:
                self.ingest_events.labels(result).inc(count)

    def count_after_commit(self, session: Session, result: IngestResult) -> None:
        """Count ``result`` once ``session`` commits; never if it rolls back first (side effects after commit)."""
        counts = {"inserted": result.inserted, "duplicates": result.duplicates, "rejected": len(result.rejected)}
        state = {"rolled_back": False}

        def committed(_session: Session) -> None:
            if not state["rolled_back"]:
                self.record_ingest(**counts)

        def rolled_back(_session: Session) -> None:
            state["rolled_back"] = True

        event.listen(session, "after_commit", committed, once=True)
        event.listen(session, "after_rollback", rolled_back, once=True)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type (OpenMetrics when the scraper asks for it)."""
        encoder, content_type = encoder_for(accept)
        return encoder(self.registry), content_type


def encoder_for(accept: str | None) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """prometheus_client's encoder for the ``Accept`` header; the classic text format when it cannot read the
    header: a ``version=`` that is not dotted numbers (``abc``, ``1.x``) raised a TypeError there (a 500 for any
    client of a public endpoint)."""
    try:
        return choose_encoder(accept or "")
    except (TypeError, ValueError):
        return choose_encoder("")


_build_lock = threading.Lock()


def metrics_for(state: Any) -> AppMetrics:
    """The app's metrics, built on first use and kept on its ``state`` (reads ``state.settings`` and, at scrape
    time, ``state.sessions``)."""
    metrics: AppMetrics | None = getattr(state, "metrics", None)
    if metrics is None:
        with _build_lock:
            metrics = getattr(state, "metrics", None)
            if metrics is None:
                api = state.settings.api
                metrics = AppMetrics(
                    lambda: getattr(state, "sessions", None),
                    top_models=api.metrics_top_models,
                    top_labels=api.metrics_top_labels,
                    max_label_sets=api.metrics_max_label_sets,
                )
                state.metrics = metrics
    return metrics
