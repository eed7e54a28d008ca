"""Bad input gets an error naming what is wrong and how to fix it; nothing written is lost."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from _cli import ood_callback, run_cli

import lightning_ood
from lightning_ood.data import CorruptDataError, FashionMNISTDataModule
from lightning_ood.io import CheckpointError, safe_load
from lightning_ood.task import ClassificationTask


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, lenet_fitted: dict) -> dict:
    """The session's fitted LeNet checkpoint, tested once (energy only) into this module's
    own folder, so that an earlier run's result tables exist there."""
    tmp = tmp_path_factory.mktemp("bad")
    cfg = copy.deepcopy(lenet_fitted["config"])
    cfg["data"]["init_args"].update(test_every=50, ood_every=50)
    cfg["trainer"]["callbacks"] = [ood_callback({"energy": {}}, per_set_holdout=0)]
    ckpt = lenet_fitted["ckpt"]
    run_cli(tmp, "bad", "test", cfg, "--ckpt_path", str(ckpt))
    return {"tmp": tmp, "ckpt": ckpt, "config": cfg}


def test_missing_dataset_files(tmp_path: Path) -> None:
    (tmp_path / "FashionMNIST" / "raw").mkdir(parents=True)
    dm = FashionMNISTDataModule(root=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=r"FashionMNIST not found under .*raw.*missing"):
        dm.setup()


def test_corrupt_dataset_file(tmp_path: Path, shared_data: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    shutil.copytree(shared_data / "FashionMNIST" / "raw", raw)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1_000_000])
    with pytest.raises(
        CorruptDataError, match=r"reading FashionMNIST under .* truncated or corrupt"
    ):
        FashionMNISTDataModule(root=str(tmp_path)).setup()


def test_checkpoint_of_another_class_count_or_architecture(fitted: dict) -> None:
    ckpt = safe_load(fitted["ckpt"])
    other = ClassificationTask(model="lenet", num_classes=5, model_kwargs={"in_channels": 1})
    with pytest.raises(ValueError, match=r"model='lenet' with num_classes=10.*num_classes=5"):
        other.on_load_checkpoint(ckpt)
    arch = ClassificationTask(model="densenet100", num_classes=10)
    with pytest.raises(ValueError, match=r"model='lenet'.*this run builds model='densenet100'"):
        arch.on_load_checkpoint(ckpt)
    # same names, other shapes (e.g. a hand-edited config): the tensors are named
    renamed = {**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], "model": None}}
    rgb = ClassificationTask(model="lenet", num_classes=10, model_kwargs={"in_channels": 3})
    with pytest.raises(ValueError, match=r"conv1.weight: checkpoint \(32, 1, 3, 3\) vs model"):
        rgb.on_load_checkpoint(renamed)


def test_cli_refuses_a_model_for_other_inputs_and_keeps_results(fitted: dict) -> None:
    # The CLI takes model/num_classes from the checkpoint's hyperparameters, so the mismatch a
    # user can still make is the data: this LeNet (1x28x28) with CIFAR-10 (3x32x32).
    results = next((fitted["tmp"] / "logs" / "bad").glob("version_*/ood_results.json"))
    before = results.read_text()
    cfg = {
        **fitted["config"],
        "data": {
            "class_path": "lightning_ood.data.CIFAR10DataModule",
            "init_args": {
                **{k: fitted["config"]["data"]["init_args"][k] for k in ("root", "num_workers")},
                "train_every": 100,
                "test_every": 100,
            },
        },
    }
    ckpt = str(fitted["ckpt"])
    proc = run_cli(fitted["tmp"], "bad", "test", cfg, "--ckpt_path", ckpt, check=False)
    assert proc.returncode != 0
    assert "inputs of shape (3, 32, 32), but the model (lenet) takes (1, 28, 28)" in proc.stderr
    assert results.read_text() == before  # the earlier run's tables are untouched


def test_truncated_checkpoint(fitted: dict, tmp_path: Path) -> None:
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(fitted["ckpt"].read_bytes()[:200_000])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*truncated or corrupt"):
        lightning_ood.load(cut)
    proc = run_cli(
        fitted["tmp"], "bad", "test", fitted["config"], "--ckpt_path", str(cut), check=False
    )
    assert proc.returncode != 0
    assert "CheckpointError" in proc.stderr and "cut.ckpt" in proc.stderr


def test_checkpoint_saved_before_detector_fitting(fitted: dict) -> None:
    (best,) = [p for p in fitted["ckpt"].parent.glob("epoch*.ckpt")]  # the monitor's, pre-fit
    with pytest.raises(
        ValueError, match=r"holds no fitted, calibrated detector.*lightning-ood test"
    ):
        lightning_ood.load(best)


def test_nan_and_inf_inputs(fitted: dict) -> None:
    model = lightning_ood.load(fitted["ckpt"])
    x = torch.rand(4, 1, 28, 28)
    x[3, 0, 1, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"NaN or Inf values in sample\(s\) \[3\]"):
        model(x)


def test_unknown_detector_and_out_of_range_hyperparameters() -> None:
    from lightning_ood.callbacks import OODEvaluation

    with pytest.raises(ValueError, match=r"unknown detector 'lien'.*'line'"):
        OODEvaluation(detectors={"lien": {}})
    with pytest.raises(ValueError, match=r"p_w=100 is out of range; it must lie in \[0.0, 100.0\)"):
        OODEvaluation(detectors={"line": {"p_w": 100}})
    with pytest.raises(ValueError, match=r"threshold_tpr must lie in \(0, 1\]"):
        OODEvaluation(threshold_tpr=1.5)
