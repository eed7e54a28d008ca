"""`lightning-ood test` runs relation, weiper, reweightood, cfood, adascale and core from YAML: a
LeNet trained for one epoch on 2,000 FashionMNIST images (`lightning-ood fit`, no detectors),
then `test` with the six detectors in the OOD callback's config, fitted on the training slice
(WeiPer's and CORE's second passes included) and scored on 500 FashionMNIST vs 500 MNIST test
images.

About a minute on 2 shared cores (two in-process CLI runs): ``integration``
(``pytest -m integration tests/detectors/test_recent_cli.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from _cli import fit_then_test

DETECTORS: dict[str, dict[str, Any]] = {
    "relation": {"type": "relation", "bank_fraction": 0.5, "store_bank": True},
    "weiper": {"type": "weiper", "n_repeats": 20},
    "reweightood": {"type": "reweightood"},
    "cfood": {"type": "cfood", "bank_fraction": 0.5, "store_bank": True},
    # fitted inside the shared training pass on the perturbed training inputs
    "adascale": {"type": "adascale", "num_samples": 500},
    "core": {"type": "core"},  # two passes: class means, then the score statistics
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("recent_cli")
    return fit_then_test(tmp, shared_data, "recent", DETECTORS, val_size=0)[0]


@pytest.mark.integration
def test_every_recent_detector_runs_from_yaml(results: dict[str, Any]) -> None:
    metrics = results["metrics"]
    aurocs = {name: metrics[name]["mnist"]["auroc"] for name in DETECTORS}
    assert all(math.isfinite(a) for a in aurocs.values()), aurocs
    # FashionMNIST vs MNIST with a one-epoch LeNet (measured: relation 0.866, weiper 0.657,
    # reweightood 0.983, cfood 0.976, adascale 0.824, core 0.907). WeiPer's defaults are the
    # authors' ResNet values: on this LeNet (80 % zero activations) its perturbed-logit KL term
    # ranks MNIST as *more* ID (AUROC 0.34 alone) while MSP_W alone gives 0.85 (MSP 0.79), so
    # the sum lands at 0.66; tuning (λ₁ 0.1, λ₂ 5 are in its search space) is the remedy.
    # Bounds leave BLAS margin.
    floor = {"relation": 0.8, "weiper": 0.6, "reweightood": 0.95, "cfood": 0.93, "adascale": 0.77,
             "core": 0.87}  # fmt: skip
    assert all(aurocs[k] > floor[k] for k in DETECTORS), sorted(aurocs.items())
