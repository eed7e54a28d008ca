"""Per-group averages of per-OOD-set metrics: OpenOOD v1.5's near-OOD / far-OOD rows.

An OOD set may carry a group (``{name: cifar100, group: near}`` in ``ood_sets``; the datamodule
exposes ``groups() -> {set: group}``). A group's row is the plain mean over its sets of each
metric, the way OpenOOD v1.5 reports "near-OOD" and "far-OOD" beside the per-set rows (every
set weighs the same whatever its size). Pure Python on the per-set result dicts: no scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightning_ood.metrics.functional import CCR_NAMES, METRIC_NAMES

__all__ = ["AVERAGED_METRICS", "group_averages"]

#: The keys averaged by default, in table order, where the per-set results hold them.
AVERAGED_METRICS: tuple[str, ...] = (*METRIC_NAMES, *CCR_NAMES)


def group_averages(
    per_set: Mapping[str, Mapping[str, float]],
    groups: Mapping[str, str],
    metrics: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean of each metric over the OOD sets of each group.

    Args:
        per_set: ``{ood_set: {metric: value}}``, e.g. one detector's row of the results
            (other keys, such as an overall ``"average"`` row or sample counts, are ignored).
        groups: ``{ood_set: group}``; sets without a group are left out of every group.
        metrics: the keys to average; default: those of :data:`AVERAGED_METRICS` that the
            member sets hold (every member must then hold each of them).

    Returns:
        ``{group: {metric: mean}}``, groups in order of first appearance in ``groups``. A mean
        is NaN as soon as one member is NaN (a broken set must not vanish from an average, as
        for the overall average); sums use ``math.fsum`` (correctly rounded).

    Raises:
        ValueError: a grouped set has no results, a member lacks a metric, or a group is named
            like a set of ``per_set`` (its row would be ambiguous).
    """
    members: dict[str, list[str]] = {}
    for ood_set, group in groups.items():
        if not isinstance(group, str) or not group:
            raise ValueError(
                f"the group of OOD set {ood_set!r} must be a non-empty name, got {group!r}"
            )
        if ood_set not in per_set:
            raise ValueError(
                f"OOD set {ood_set!r} is in group {group!r} but has no results (results hold "
                f"{sorted(per_set)}); groups must name reported sets only"
            )
        members.setdefault(group, []).append(ood_set)
    clash = sorted(set(members) & set(per_set))
    if clash:
        raise ValueError(f"groups {clash} are named like rows of the results; rename the group(s)")
    out: dict[str, dict[str, float]] = {}
    for group, sets in members.items():
        keys = metrics
        if keys is None:
            held = set().union(*(per_set[s] for s in sets))
            keys = [k for k in AVERAGED_METRICS if k in held]
        row: dict[str, float] = {}
        for key in keys:
            lacking = [s for s in sets if key not in per_set[s]]
            if lacking:
                raise ValueError(
                    f"group {group!r}: OOD set(s) {lacking} have no {key!r}, which the other "
                    f"sets of the group have; compute it for every set or pass metrics="
                )
            values = [float(per_set[s][key]) for s in sets]
            row[key] = math.fsum(values) / len(values)
        out[group] = row
    return out
