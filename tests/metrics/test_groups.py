"""group_averages: hand-computed near/far means, NaN propagation, default keys, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_ood.metrics import AVERAGED_METRICS, CCR_NAMES, METRIC_NAMES, group_averages

PER_SET = {
    "cifar100": {"auroc": 0.80, "fpr95": 0.60, "n_id": 10_000},
    "tin": {"auroc": 0.90, "fpr95": 0.40, "n_id": 10_000},
    "mnist": {"auroc": 0.99, "fpr95": 0.05, "n_id": 10_000},
    "svhn": {"auroc": 0.95, "fpr95": 0.25, "n_id": 10_000},
    "textures": {"auroc": 0.92, "fpr95": 0.30, "n_id": 10_000},
    "average": {"auroc": 0.912, "fpr95": 0.32},
}
GROUPS = {"cifar100": "near", "tin": "near", "mnist": "far", "svhn": "far"}  # textures: none


def test_near_far_means_by_hand() -> None:
    got = group_averages(PER_SET, GROUPS)
    assert list(got) == ["near", "far"]  # order of first appearance
    # near: (0.80 + 0.90) / 2, (0.60 + 0.40) / 2; far: (0.99 + 0.95) / 2, (0.05 + 0.25) / 2.
    # Only the known metric keys, in table order: counts are not averaged; textures has no
    # group and joins neither.
    want = {"near": {"fpr95": 0.5, "auroc": 0.85}, "far": {"fpr95": 0.15, "auroc": 0.97}}
    assert {g: list(row) for g, row in got.items()} == {g: list(row) for g, row in want.items()}
    for g, row in want.items():
        for key, value in row.items():
            assert got[g][key] == pytest.approx(value, abs=1e-15), (g, key)
    assert group_averages(PER_SET, GROUPS, metrics=["n_id"]) == {
        "near": {"n_id": 10_000.0},
        "far": {"n_id": 10_000.0},
    }
    assert group_averages(PER_SET, {}) == {}


def test_one_group_of_every_set_is_the_overall_mean() -> None:
    rng = np.random.default_rng(0)
    per_set = {
        f"set{i}": dict(zip(AVERAGED_METRICS, rng.random(11), strict=True)) for i in range(7)
    }
    got = group_averages(per_set, dict.fromkeys(per_set, "all"))["all"]
    assert list(got) == [*METRIC_NAMES, *CCR_NAMES]
    for key in AVERAGED_METRICS:
        assert got[key] == pytest.approx(np.mean([v[key] for v in per_set.values()]), abs=1e-15)


def test_nan_member_makes_the_group_nan_only() -> None:
    per_set = {k: dict(v) for k, v in PER_SET.items()}
    per_set["tin"]["auroc"] = math.nan  # e.g. non-finite scores on that set
    got = group_averages(per_set, GROUPS)
    assert math.isnan(got["near"]["auroc"]) and got["near"]["fpr95"] == 0.5
    assert got["far"] == group_averages(PER_SET, GROUPS)["far"]


def test_errors_name_the_set_and_fix() -> None:
    with pytest.raises(ValueError, match=r"'places365' is in group 'far' but has no results"):
        group_averages(PER_SET, {**GROUPS, "places365": "far"})
    with pytest.raises(ValueError, match=r"groups \['tin'\] are named like rows"):
        group_averages(PER_SET, {"cifar100": "tin"})
    with pytest.raises(ValueError, match=r"group 'near': OOD set\(s\) \['tin'\] have no 'auroc'"):
        group_averages({**PER_SET, "tin": {"fpr95": 0.4}}, GROUPS)
    with pytest.raises(ValueError, match="must be a non-empty name"):
        group_averages(PER_SET, {"cifar100": ""})
