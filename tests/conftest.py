"""Shared fixtures: the read-only data folder, and ONE trained, fitted LeNet checkpoint.

The session checkpoint (``lenet_fitted``) is trained once per test session in a fresh
``lightning-ood fit`` process (the demo recipe: LeNet, Adadelta, one epoch on every 6th
FashionMNIST training image) with every detector kind fitted and calibrated after training.
The hand-off, bad-input and end-to-end tests read it instead of training their own models;
tests that write next to it use their own ``tmp_path``, so it is never modified.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (PROJECT_ROOT / ".." / "shared" / "data").resolve()

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/_cli.py for every module
from _cli import LENET_DETECTORS, base_config, ood_callback, run_cli  # noqa: E402


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests use real data and fail loudly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data folder {SHARED_DATA} is missing; clone the project beside shared/")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lenet_fitted(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Any]:
    """``lightning-ood fit`` once: ``{"dir", "ckpt", "config", "detectors"}``.

    LeNet trained for one epoch on 10,000 FashionMNIST training images (every 6th), test
    slices of every 20th image (500 ID, 500 MNIST); every detector of
    :data:`LENET_DETECTORS` fitted on the training slice after training and calibrated at
    95 % TPR on the 500 ID test images (the datamodule's ``val_size`` is 0, as in the
    reference scripts). ``ckpt`` is ``last.ckpt``; the monitor's pre-fit ``epoch*.ckpt`` lies
    beside it.
    """
    tmp = tmp_path_factory.mktemp("lenet_fitted")
    cfg = base_config(shared_data, train_every=6, test_every=20, ood_every=20, ood_sets=["mnist"])
    cfg["trainer"]["callbacks"] = [ood_callback(LENET_DETECTORS, per_set_holdout=100)]
    run_cli(tmp, "lenet", "fit", cfg)
    ckpt = tmp / "ckpt" / "lenet" / "last.ckpt"
    return {"dir": tmp, "ckpt": ckpt, "config": cfg, "detectors": dict(LENET_DETECTORS)}


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
