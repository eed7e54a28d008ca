"""`lightning-ood test` runs relation, weiper, reweightood and cfood from YAML: a LeNet trained
for one epoch on 2,000 FashionMNIST images (`lightning-ood fit`, no detectors), then `test`
with the four detectors in the OOD callback's config, fitted on the training slice (WeiPer's
second pass included) and scored on 500 FashionMNIST vs 500 MNIST test images.

About a minute on 2 shared cores (two in-process CLI runs): ``integration``
(``pytest -m integration tests/detectors/test_recent_cli.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _cli import base_config, ood_callback

from lightning_ood.callbacks import evaluation as ood_evaluation
from lightning_ood.cli import main

DETECTORS: dict[str, dict[str, Any]] = {
    "relation": {"type": "relation", "bank_fraction": 0.5, "store_bank": True},
    "weiper": {"type": "weiper", "n_repeats": 20},
    "reweightood": {"type": "reweightood"},
    "cfood": {"type": "cfood", "bank_fraction": 0.5, "store_bank": True},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("recent_cli")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = base_config(shared_data, train_every=30, test_every=20, ood_every=20,
                      ood_sets=["mnist"], val_size=0)  # fmt: skip
    common = ["--checkpoint_root", str(tmp / "ckpt"), "--log_root", str(tmp / "logs"),
              "--experiment", "recent"]  # fmt: skip
    (tmp / "fit.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp / "fit.yaml"), *common])
    cfg["trainer"]["callbacks"] = [ood_callback(DETECTORS, validation_size=100, tune=None)]
    (tmp / "test.yaml").write_text(yaml.safe_dump(cfg))
    ckpt = tmp / "ckpt" / "recent" / "last.ckpt"
    try:
        cli = main(["test", "--config", str(tmp / "test.yaml"), *common, "--ckpt_path", str(ckpt)])
    finally:
        torch.set_num_threads(threads)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, ood_evaluation.OODEvaluation))
    return cb.results


@pytest.mark.integration
def test_every_recent_detector_runs_from_yaml(results: dict[str, Any]) -> None:
    metrics = results["metrics"]
    aurocs = {name: metrics[name]["mnist"]["auroc"] for name in DETECTORS}
    assert all(math.isfinite(a) for a in aurocs.values()), aurocs
    # FashionMNIST vs MNIST with a one-epoch LeNet (measured: relation 0.866, weiper 0.657,
    # reweightood 0.983, cfood 0.976). WeiPer's defaults are the authors' ResNet values: on this
    # LeNet (80 % zero activations) its perturbed-logit KL term ranks MNIST as *more* ID
    # (AUROC 0.34 alone) while MSP_W alone gives 0.85 (MSP 0.79), so the sum lands at 0.66;
    # tuning (λ₁ 0.1, λ₂ 5 are in its search space) is the remedy. Bounds leave BLAS margin.
    floor = {"relation": 0.8, "weiper": 0.6, "reweightood": 0.95, "cfood": 0.93}
    assert all(aurocs[k] > floor[k] for k in DETECTORS), aurocs
