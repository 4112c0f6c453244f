"""metering.metrics without a database: label folding (pure) and a registry per app."""

from __future__ import annotations

from metering.db.usage_totals import LabelTotals
from metering.metrics import OTHER, AppMetrics, cap_label_sets, fold


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


def test_label_sets_beyond_the_cap_are_summed_into_other_per_byollm_and_status() -> None:
    """Each label was capped on its own, not their combinations: 20 models x 50 extensions x 50 purposes x ..."""
    rows = [_row(f"m{i}", 10 - i, extension=f"e{i % 3}", byollm=i % 2 == 1) for i in range(8)]
    uncapped = fold(rows, top_models=20, top_labels=50)
    assert len(uncapped) == 8
    capped = fold(rows, top_models=20, top_labels=50, max_label_sets=3)
    kept = [key for key in capped if key[1] != OTHER]
    assert sorted(key[1] for key in kept) == ["m0", "m1", "m2"]  # the most calls
    assert set(capped) - set(kept) == {
        (OTHER, OTHER, OTHER, OTHER, "false", "ok"),
        (OTHER, OTHER, OTHER, OTHER, "true", "ok"),
    }
    for column in range(8):  # every total exact
        assert sum(v[column] for v in capped.values()) == sum(v[column] for v in uncapped.values())
    assert capped[(OTHER, OTHER, OTHER, OTHER, "false", "ok")][0] == 6 + 4  # m4 and m6
    before = {key: list(sums) for key, sums in uncapped.items()}
    cap_label_sets(uncapped, 1)
    assert uncapped == before  # its input unchanged
    assert fold(rows, top_models=20, top_labels=50, max_label_sets=8) == uncapped
