"""What a scrape's admission adds to ``metrics_label_values`` and ``metrics_label_sets``: pure logic over the calls
summed per raw label set (``metric_labels`` reads them, and what was admitted, and writes the plan).

The rules are those of ``metric_labels``: a value (a set) not admitted yet is admitted while its label has fewer than
N admitted (the set cap, fewer than ``max_label_sets``), most calls first, ties by code point, at the positions after
those taken. A set is a raw label set's values as reported (admitted within the top N: itself; its label full:
``OTHER``); one with a value not decided yet (its label not full, the value not admitted) is not a candidate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from metering.db.usage_totals import LABEL_NAMES, OTHER, top_n

VALUE_LABELS = LABEL_NAMES[:4]
# (provider, model, purpose, extension, byollm, status): a raw label set (provider lowercased) or an admitted one
SetKey = tuple[str, str, str, str, bool, str]


@dataclass(frozen=True, slots=True)
class Admitted:
    """What is admitted: each label's values with their positions, and the label sets with theirs."""

    values: Mapping[str, Mapping[str, int]]
    sets: Mapping[SetKey, int]


@dataclass(frozen=True, slots=True)
class Plan:
    values: list[tuple[str, str, int]]  # (label, value, position)
    sets: list[tuple[SetKey, int]]  # (set, position)


def plan_admission(
    calls: Iterable[tuple[SetKey, int]], admitted: Admitted, *, top_models: int, top_labels: int, max_label_sets: int
) -> Plan:
    """The values then the sets to admit, given ``calls`` (the calls summed per raw label set) and ``admitted``."""
    sums = list(calls)
    values: list[tuple[str, str, int]] = []
    after: dict[str, dict[str, int]] = {}
    for index, label in enumerate(VALUE_LABELS):
        n = top_n(label, top_models, top_labels)
        taken = dict(admitted.values.get(label, {}))
        if len(taken) < n:
            per_value: dict[str, int] = {}
            for key, count in sums:
                value = key[:4][index]
                per_value[value] = per_value.get(value, 0) + count
            fresh = sorted((v for v in per_value if v not in taken), key=lambda v: (-per_value[v], v))
            for position, value in enumerate(fresh[: n - len(taken)], start=len(taken) + 1):
                values.append((label, value, position))
                taken[value] = position
        after[label] = taken
    return Plan(values=values, sets=_plan_sets(sums, after, admitted.sets, top_models, top_labels, max_label_sets))


def _plan_sets(
    sums: list[tuple[SetKey, int]],
    values: Mapping[str, Mapping[str, int]],
    admitted: Mapping[SetKey, int],
    top_models: int,
    top_labels: int,
    cap: int,
) -> list[tuple[SetKey, int]]:
    if len(admitted) >= cap:
        return []
    reported: list[tuple[set[str], bool]] = []  # per label: the values within its top N, whether it is full
    for label in VALUE_LABELS:
        n = top_n(label, top_models, top_labels)
        within = {value for value, position in values.get(label, {}).items() if position <= n}
        reported.append((within, len(within) >= n))
    per_set: dict[SetKey, int] = {}
    for key, count in sums:
        labels: list[str] = []
        for value, (within, full) in zip(key[:4], reported, strict=True):
            if value in within:
                labels.append(value)
            elif full:
                labels.append(OTHER)
            else:
                break  # a value not decided yet: the set waits for the next scrape
        else:
            reported_key: SetKey = (labels[0], labels[1], labels[2], labels[3], key[4], key[5])
            per_set[reported_key] = per_set.get(reported_key, 0) + count
    fresh = sorted((key for key in per_set if key not in admitted), key=lambda key: (-per_set[key], key))
    return list(zip(fresh[: cap - len(admitted)], range(len(admitted) + 1, cap + 1), strict=False))
