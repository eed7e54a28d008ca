"""Detector configurations the training set cannot support are refused before the first
training step, not after training; NNGuide's defaults fit small training sets (issue 21
item 20)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_ood.callbacks import OODEvaluation
from lightning_ood.data import FashionMNISTDataModule
from lightning_ood.detectors import KNN, NNGuide
from lightning_ood.detectors.base import InvalidConfiguration
from lightning_ood.detectors.knn import normalize_rows, seeded_uniform
from lightning_ood.models.base import BackboneOutput
from lightning_ood.task import ClassificationTask

#: FashionMNIST training images read (every 200th of 60,000).
N_TRAIN = 300
#: Of them, those NNGuide's 1 % keeps (seed 0): the seeded draws below 0.01.
N_KEPT = int((seeded_uniform(0, N_TRAIN, 0) < 0.01).sum())


def _fit(root: Path, tmp_path: Path, detectors: dict[str, Any]) -> tuple[Trainer, Any, Any]:
    """One epoch of LeNet on 300 FashionMNIST images with the OOD callback; returns the
    trainer, the task and the datamodule (``training_step`` is counted, see ``calls``)."""
    torch.manual_seed(0)
    dm = FashionMNISTDataModule(
        root=str(root), batch_size=100, eval_batch_size=100, num_workers=0,
        train_every=200, test_every=100, ood_sets=[], ood_every=100,
    )  # fmt: skip
    task = ClassificationTask(model="lenet", model_kwargs={"in_channels": 1})
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[OODEvaluation(detectors=detectors, progress=False)],
    )
    trainer.fit(task, datamodule=dm)
    return trainer, task, dm


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"knn": {"k": 500}},
            r"detector 'knn' \(KNN\): k=500 exceeds the 300 training features its bank would "
            r"hold \(bank_fraction=1 of the 300 training samples\).*lower k to at most 300",
        ),
        (
            {"nnguide": {"min_bank": 0}},  # OpenOOD's k=100 of 1 %: the old default's failure
            rf"detector 'nnguide' \(NNGuide\): k=100 exceeds the {N_KEPT} training features its "
            r"bank would hold \(bank_fraction=0.01 of the 300 training samples, at least "
            rf"min_bank=0\).*lower k to at most {N_KEPT}, or raise bank_fraction.*or min_bank "
            r"\(to 100",
        ),
    ],
)
def test_impossible_bank_configurations_fail_before_training(
    shared_data: Path, tmp_path: Path, spec: dict[str, Any], message: str
) -> None:
    real = ClassificationTask.training_step
    with (
        mock.patch.object(
            ClassificationTask, "training_step", autospec=True, side_effect=real
        ) as step,
        pytest.raises(InvalidConfiguration, match=message),
    ):
        _fit(shared_data, tmp_path, spec)
    assert step.call_count == 0
    assert list(tmp_path.rglob("*.ckpt")) == []


def test_the_predicted_bank_size_is_the_fitted_one() -> None:
    """``check_data`` predicts the bank from the training-set size alone: the seeded draws."""
    u = seeded_uniform(0, N_TRAIN, 0)
    assert NNGuide(min_bank=0).bank_size(N_TRAIN) == int((u < 0.01).sum()) == N_KEPT < 100
    assert NNGuide().bank_size(N_TRAIN) == 128 and NNGuide().bank_size(90) == 90
    assert NNGuide(bank_fraction=0.5).bank_size(N_TRAIN) == int((u < 0.5).sum())
    assert KNN().bank_size(N_TRAIN) == N_TRAIN
    NNGuide().check_data(N_TRAIN)  # the defaults: 128 >= k = 100
    with pytest.raises(InvalidConfiguration, match=r"k=100 .* lower k to at most 90 \(k must"):
        NNGuide().check_data(90)


def test_nnguide_defaults_fit_a_small_training_set(shared_data: Path, tmp_path: Path) -> None:
    real = ClassificationTask.training_step
    with mock.patch.object(
        ClassificationTask, "training_step", autospec=True, side_effect=real
    ) as step:  # the spy that sees no call above sees every call here
        trainer, task, dm = _fit(shared_data, tmp_path, {"nnguide": {}})
    assert step.call_count == trainer.global_step == 3  # 300 images in batches of 100
    det = task.detectors["nnguide"]
    assert (det.k, det.bank_fraction, det.min_bank) == (100, 0.01, 128)  # the defaults
    assert det.is_fitted and det.is_calibrated
    assert det.int_list("bank_shape") == [128, 128]  # min(N, min_bank) rows of LeNet's 128
    # The bank: the 1 % draws, then the smallest draws of the rest, each in stream order.
    backbone = task.backbone.eval()
    with torch.no_grad():
        outs = [backbone.extract(x) for x, _ in dm.train_eval_dataloader()]
    feats = torch.cat([o.features for o in outs])
    energy = torch.logsumexp(torch.cat([o.logits for o in outs]), dim=1)
    rows = normalize_rows(feats) * energy[:, None]
    assert rows.shape[0] == N_TRAIN
    u = seeded_uniform(0, N_TRAIN, 0)
    kept = (u < 0.01).nonzero().flatten()
    rest = (u >= 0.01).nonzero().flatten()
    floor = rest[torch.sort(u[rest], stable=True).indices[: 128 - len(kept)]].sort().values
    torch.testing.assert_close(det.bank, rows[torch.cat([kept, floor])], rtol=1e-5, atol=1e-6)
    # ... and it scores: the guidance is the mean of the 100 best of those 128
    x = next(iter(dm.train_eval_dataloader()))[0][:5]
    with torch.no_grad():
        out = backbone.extract(x)
        sims = normalize_rows(out.features) @ det.bank.T
        want = torch.logsumexp(out.logits, dim=1) * sims.topk(100, dim=1).values.mean(dim=1)
        torch.testing.assert_close(det.score(out), want, rtol=1e-5, atol=1e-5)


def test_the_floor_does_not_depend_on_the_batching() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 6, generator=g)
    logits = torch.randn(500, 3, generator=g)

    def fit(batch: int) -> NNGuide:
        det = NNGuide(k=10, bank_fraction=0.02, min_bank=40)
        det.reset()
        for f, lg in zip(feats.split(batch), logits.split(batch), strict=True):
            det.update(BackboneOutput(features=f, logits=lg, taps={}), torch.zeros(len(f)))

        class _Net:
            num_features = 6

        det.finalize(_Net())  # type: ignore[arg-type]
        return det

    banks = [fit(b).bank for b in (1, 7, 64, 500)]
    assert banks[0].shape == (40, 6)
    for b in banks[1:]:
        assert torch.equal(b, banks[0])


def test_configs_record_min_bank_only_off_its_default() -> None:
    """Checkpoints written before ``min_bank`` existed record NNGuide/KNN without it; their
    stored state must still fit the rebuilt detector (a missing key means its default), or
    they would load as unfitted."""
    from lightning_ood.detectors import build_detector

    before = {k: v for k, v in NNGuide(k=20).config().items() if k != "min_bank"}
    assert build_detector("nnguide", before).stored_state_fits(before) == (True, "")
    assert build_detector("nnguide", before).min_bank == 128
    old_knn = {k: v for k, v in KNN().config().items() if k != "min_bank"}
    assert KNN().stored_state_fits(old_knn) == (True, "")
    assert NNGuide(min_bank=7).config()["min_bank"] == 7
    assert build_detector("nnguide", NNGuide(min_bank=7).config()).min_bank == 7
    assert build_detector("knn", KNN(min_bank=300).config()).min_bank == 300
