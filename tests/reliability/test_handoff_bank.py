"""KNN/NNGuide fitted without ``store_bank`` in the hand-off loader: asked for by name, the
refusal names the detector and the ``store_bank: true`` remedy; loading every detector says
which were left out and why, instead of dropping them silently (issue 21 item 18)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lightning_ood import engine
from lightning_ood.predictor import load
from lightning_ood.task import ClassificationTask


def _batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.arange(n) % 10
    return [(x[i : i + 40], y[i : i + 40]) for i in range(0, n, 40)]


def _checkpoint(
    path: Path, store_bank: bool, calibrate: bool = True
) -> tuple[ClassificationTask, torch.Tensor]:
    """A fitted, calibrated LeNet checkpoint as ``lightning-ood fit`` writes it, with MSP, KNN
    and NNGuide; returns the task and the images the tests score."""
    torch.manual_seed(0)
    task = ClassificationTask(
        model="lenet",
        model_kwargs={"in_channels": 1},
        detectors={
            "msp": {},
            "knn": {"k": 5, "store_bank": store_bank},
            "nnguide": {"k": 5, "bank_fraction": 1.0, "store_bank": store_bank},
        },
    ).eval()
    dets = dict(task.detectors.items())
    engine.fit_from_loader(dets.values(), task.backbone, _batches(0, 120))
    if calibrate:
        scores = engine.score_loader(dets, task.backbone, _batches(1, 80))
        engine.calibrate_detectors(dets, scores)
    hparams = dict(task.hparams)
    hparams["detectors"] = {n: d.config() for n, d in dets.items()}  # as on_save_checkpoint
    torch.save(
        {
            "epoch": 0,
            "state_dict": task.state_dict(),
            "hyper_parameters": hparams,
            "lightning_ood": {"data": {"input_shape": [1, 28, 28], "mean": [0.0], "std": [1.0]}},
        },
        path,
    )
    return task, torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(2))


def _scores(task: ClassificationTask, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = task.backbone.extract(x)
        return {n: d.score(out) for n, d in task.detectors.items()}


@pytest.mark.parametrize("name", ["knn", "nnguide"])
def test_asking_for_a_bank_detector_saved_without_its_bank_names_the_remedy(
    tmp_path: Path, name: str
) -> None:
    path = tmp_path / "last.ckpt"
    _checkpoint(path, store_bank=False)
    with pytest.raises(ValueError) as err:
        load(path, detectors=[name])
    msg = str(err.value)
    assert f"checkpoint {str(path)!r} has no fitted, calibrated detector(s) ['{name}']" in msg
    assert "120 x 128 training features" in msg  # the bank it was fitted with: LeNet's width
    assert "store_bank: false" in msg and "store_bank: true" in msg
    assert "lightning-ood test --ckpt_path" in msg
    assert "Usable now: ['msp']" in msg


def test_loading_every_detector_says_which_were_left_out_and_why(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    task, x = _checkpoint(path, store_bank=False)
    with pytest.warns(UserWarning) as record:
        predictor = load(path)
    msg = "\n".join(str(w.message) for w in record)
    assert "detector(s) ['knn', 'nnguide'] left out" in msg
    assert "scores with ['msp']" in msg
    assert "detector 'knn' (KNN)" in msg and "detector 'nnguide' (NNGuide)" in msg
    for name in ("knn", "nnguide"):  # the remedy, as the config entry to write
        assert f"`{name}: {{type: {name}, store_bank: true, ...}}`" in msg
    assert predictor.detector_names == ["msp"]
    torch.testing.assert_close(predictor(x)["scores"]["msp"], _scores(task, x)["msp"])


def test_a_checkpoint_with_its_banks_loads_every_detector_silently(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    task, x = _checkpoint(path, store_bank=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor = load(path)
    assert predictor.detector_names == ["msp", "knn", "nnguide"]
    expected = _scores(task, x)
    got = predictor(x)["scores"]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_unknown_names_are_refused_as_such(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    _checkpoint(path, store_bank=True)
    with pytest.raises(ValueError, match=r"\['vim'\]: it holds no detector of that name"):
        load(path, detectors=["vim"])


def test_no_usable_detector_says_why_for_each(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    _checkpoint(path, store_bank=False, calibrate=False)
    with pytest.raises(ValueError) as err:
        load(path)
    msg = str(err.value)
    assert f"checkpoint {str(path)!r} holds no fitted, calibrated detector: " in msg
    assert "detector 'knn' (KNN) was fitted with a bank of 120 x 128" in msg
    assert "detector 'nnguide' (NNGuide) was fitted with a bank of 120 x 128" in msg
    assert "['msp'] have no decision threshold (not calibrated)" in msg
    assert "lightning-ood test --ckpt_path <checkpoint>" in msg
