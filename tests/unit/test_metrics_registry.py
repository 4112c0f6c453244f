"""metering.metrics without a database: a registry per app (the label folding is the database's:
tests/integration/test_metrics_folding.py)."""

from __future__ import annotations

from metering.metrics import AppMetrics


def test_each_app_has_its_own_registry_and_no_database_means_no_usage_samples() -> None:
    first, second = AppMetrics(lambda: None), AppMetrics(lambda: None)
    first.record_ingest(inserted=3, duplicates=1, rejected=0)
    body, content_type = second.render()
    assert content_type.startswith("text/plain")
    assert b'metering_ingest_events_total{result="inserted"} 0.0' in body
    assert b"metering_llm_calls_total" not in body
    assert b'metering_ingest_events_total{result="inserted"} 3.0' in first.render()[0]
