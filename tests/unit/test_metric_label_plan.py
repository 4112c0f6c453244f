"""The admission plan of /metrics' label values and label sets (pure logic; the database side is covered by
tests/integration/test_metrics_stable_labels.py)."""

from __future__ import annotations

from metering.db.metric_label_plan import Admitted, SetKey, plan_admission
from metering.db.usage_totals import OTHER

CAPS = {"top_models": 2, "top_labels": 2, "max_label_sets": 3}


def _set(model: str, extension: str = "x", *, byollm: bool = False) -> SetKey:
    return ("openai", model, "p", extension, byollm, "ok")


def test_values_are_admitted_most_calls_first_ties_by_code_point_after_the_positions_taken():
    calls = [(_set("b"), 5), (_set("a"), 5), (_set("B"), 5), (_set("c"), 9)]
    plan = plan_admission(calls, Admitted(values={"model": {"c": 1}}, sets={}), **CAPS)
    assert [v for v in plan.values if v[0] == "model"] == [("model", "B", 2)]  # "B" < "a" < "b" by code point
    assert ("provider", "openai", 1) in plan.values


def test_a_full_label_admits_nothing_and_its_other_values_are_reported_as_other():
    calls = [(_set("a"), 1), (_set("b"), 1), (_set("z"), 100)]
    admitted = Admitted(values={"model": {"a": 1, "b": 2}}, sets={})
    plan = plan_admission(calls, admitted, **CAPS)
    assert not [v for v in plan.values if v[0] == "model"]
    assert [key for key, _position in plan.sets] == [_set(OTHER), _set("a"), _set("b")]  # other: 100 calls


def test_sets_are_reported_by_the_values_admitted_in_the_same_plan_and_the_cap_is_kept():
    calls = [(_set("a", "e1"), 4), (_set("a", "e2"), 3), (_set("a", "e3"), 2)]
    admitted = Admitted(values={"model": {"a": 1}, "extension": {"e1": 1}}, sets={_set("a", "e1"): 1})
    plan = plan_admission(calls, admitted, top_models=2, top_labels=3, max_label_sets=2)
    # e2 and e3 are admitted now (extension has room); one set is left under the cap: e2's, the bigger
    assert ("extension", "e2", 2) in plan.values and ("extension", "e3", 3) in plan.values
    assert plan.sets == [(_set("a", "e2"), 2)]
    folded = plan_admission(calls, admitted, top_models=2, top_labels=1, max_label_sets=5)
    assert [key for key, _position in folded.sets] == [_set("a", OTHER)]  # extension full: e2, e3 are other


def test_a_full_set_cap_plans_no_set():
    admitted = Admitted(values={}, sets={_set("a"): 1, _set("b"): 2, _set("c"): 3})
    assert plan_admission([(_set("d"), 1)], admitted, **CAPS).sets == []


def test_ties_are_broken_as_the_sql_broke_them_code_points_then_byollm_false_first_then_status():
    """The ranking the SQL made (ORDER BY calls DESC, each label by code point, is_byollm, status by code point),
    checked against it on SQLite and PostgreSQL when the plan replaced it: a locale's order ("é" next to "e", "a"
    next to "A") or True before False would admit other values and sets at a tie."""
    calls = [(_set(model), 1) for model in ("é", "f", "a", "Z", "e")]
    plan = plan_admission(calls, Admitted(values={}, sets={}), top_models=5, top_labels=2, max_label_sets=9)
    assert [value for label, value, _ in plan.values if label == "model"] == ["Z", "a", "e", "f", "é"]
    tied: list[tuple[SetKey, int]] = [
        (("openai", "m", "p", "x", True, "ok"), 2),
        (("openai", "m", "p", "x", False, "ok"), 2),
        (("openai", "m", "p", "x", True, "error"), 2),
        (("openai", "m", "p", "x", False, "error"), 2),
    ]
    plan = plan_admission(tied, Admitted(values={}, sets={}), top_models=1, top_labels=1, max_label_sets=3)
    assert plan.sets == [
        (("openai", "m", "p", "x", False, "error"), 1),
        (("openai", "m", "p", "x", False, "ok"), 2),
        (("openai", "m", "p", "x", True, "error"), 3),
    ]
