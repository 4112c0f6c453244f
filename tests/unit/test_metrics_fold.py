"""metering.metrics without a database: label folding (pure) and a registry per app."""

from __future__ import annotations

from metering.db.usage_totals import LabelTotals
from metering.metrics import OTHER, AppMetrics, fold


def _row(model: str, calls: int, extension: str = "rewrite", byollm: bool = False) -> LabelTotals:
    return LabelTotals("anthropic", model, "content_rewrite", extension, byollm, "ok", (calls, 1, 1, 0, 0, 0, 10, 0))


def test_models_beyond_the_top_n_fold_into_other_with_ties_broken_by_name() -> None:
    rows = [_row("b", 3), _row("a", 3), _row("c", 1), _row("d", 2, "chatty", byollm=True)]
    folded = fold(rows, top_models=2, top_labels=1)
    assert folded == {
        ("anthropic", "a", "content_rewrite", "rewrite", "false", "ok"): [3, 1, 1, 0, 0, 0, 10, 0],
        ("anthropic", "b", "content_rewrite", "rewrite", "false", "ok"): [3, 1, 1, 0, 0, 0, 10, 0],
        ("anthropic", OTHER, "content_rewrite", "rewrite", "false", "ok"): [1, 1, 1, 0, 0, 0, 10, 0],
        ("anthropic", OTHER, "content_rewrite", OTHER, "true", "ok"): [2, 1, 1, 0, 0, 0, 10, 0],
    }


def test_folding_sums_rows_that_become_one_label_set() -> None:
    folded = fold([_row("x", 2), _row("y", 1), _row("z", 1)], top_models=1, top_labels=10)
    assert folded[("anthropic", OTHER, "content_rewrite", "rewrite", "false", "ok")] == [2, 2, 2, 0, 0, 0, 20, 0]
    assert sum(v[0] for v in folded.values()) == 4


def test_each_app_has_its_own_registry_and_no_database_means_no_usage_samples() -> None:
    first, second = AppMetrics(lambda: None), AppMetrics(lambda: None)
    first.record_ingest(inserted=3, duplicates=1, rejected=0)
    body, content_type = second.render()
    assert content_type.startswith("text/plain")
    assert b'metering_ingest_events_total{result="inserted"} 0.0' in body
    assert b"metering_llm_calls_total" not in body
    assert b'metering_ingest_events_total{result="inserted"} 3.0' in first.render()[0]
