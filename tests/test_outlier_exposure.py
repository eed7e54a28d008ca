"""Outlier Exposure (Hendrycks et al. 2019): the loss, the combined loader, the leak refusal,
and a real FashionMNIST fit with KMNIST outliers."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import Subset

from lightning_ood.data import FashionMNISTDataModule, build_ood_dataset
from lightning_ood.data.samplers import ResumableDataLoader
from lightning_ood.task import ClassificationTask, outlier_exposure_loss


def test_oe_loss_is_the_hand_computed_cross_entropy_to_uniform() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    # row 0: log 3 - 0; row 1: log(e + e^2 + e^3) - 2
    by_hand = (math.log(3.0) + math.log(math.e + math.e**2 + math.e**3) - 2.0) / 2
    assert outlier_exposure_loss(logits).item() == pytest.approx(by_hand, abs=1e-6)
    uniform = torch.full_like(logits, 1 / 3)
    torch.testing.assert_close(outlier_exposure_loss(logits), F.cross_entropy(logits, uniform))


def test_oe_training_step_adds_lambda_times_the_outlier_loss() -> None:
    torch.manual_seed(0)
    task = ClassificationTask(
        model="lenet", model_kwargs={"in_channels": 1, "dropout": False}, oe_weight=0.25
    )
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 3, 9])
    x_out = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = F.cross_entropy(task.backbone(x), y) + 0.25 * outlier_exposure_loss(
            task.backbone(x_out)
        )
        batch = {"id": [x, y], "outliers": [x_out, torch.full((3,), -1)]}
        loss = task.training_step(batch, 0)
        plain = task.training_step([x, y], 0)  # the non-OE path: cross-entropy only
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain, F.cross_entropy(task.backbone(x), y), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="outliers"):
        task.training_step({"id": [x, y]}, 0)
    with pytest.raises(ValueError, match="oe_weight"):
        ClassificationTask(oe_weight=-1.0)


def test_outlier_set_gives_a_combined_loader_as_long_as_the_id_loader(shared_data: Path) -> None:
    plain = FashionMNISTDataModule(root=str(shared_data), batch_size=32, train_every=200)
    assert isinstance(plain.train_dataloader(), ResumableDataLoader)  # unchanged without OE
    dm = FashionMNISTDataModule(
        root=str(shared_data),
        batch_size=32,
        train_every=200,
        outlier_set="kmnist",
        outlier_batch_size=16,
        ood_sets=["mnist"],
    )
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader) and loader._mode == "max_size_cycle"
    id_len = len(loader.iterables["id"])
    assert id_len == len(plain.train_dataloader()) == math.ceil(300 / 32)
    assert len(loader.iterables["outliers"]) == id_len  # the ID set is never cycled
    iter(loader)
    assert len(loader) == id_len
    batches = list(loader)
    assert len(batches) == id_len
    (x, y), (x_out, y_out) = batches[0][0]["id"], batches[0][0]["outliers"]
    assert x.shape == (32, 1, 28, 28) and x_out.shape == (16, 1, 28, 28)
    assert (y_out == -1).all() and (y >= 0).all()


def test_an_outlier_set_that_is_reported_is_refused(shared_data: Path) -> None:
    for reported in (["mnist", "kmnist"], [{"name": "kmnist_part", "kind": "kmnist", "every": 3}]):
        with pytest.raises(ValueError, match=r"kmnist.*Outlier Exposure.*never be a reported"):
            FashionMNISTDataModule(root=str(shared_data), outlier_set="kmnist", ood_sets=reported)
    with pytest.raises(ValueError, match="in-distribution"):
        FashionMNISTDataModule(root=str(shared_data), outlier_set="fashionmnist")


def _trainer(max_steps: int = -1) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def test_a_checkpoint_trained_with_kmnist_outliers_refuses_kmnist_as_test_set(
    shared_data: Path, tmp_path: Path
) -> None:
    """The refusal travels in the checkpoint: a later `test` whose config reports KMNIST (and
    has no outlier_set of its own) is refused before any sample is scored."""
    root = str(shared_data)
    dm = FashionMNISTDataModule(
        root=root, batch_size=16, train_every=1000, num_workers=0, outlier_set="kmnist"
    )
    task = ClassificationTask(model="lenet", model_kwargs={"in_channels": 1})
    trainer = _trainer(max_steps=2)
    trainer.fit(task, datamodule=dm)
    ckpt = tmp_path / "oe.ckpt"
    trainer.save_checkpoint(ckpt)
    record = torch.load(ckpt, weights_only=True)["lightning_ood"]["outliers"]
    assert [{k: r[k] for k in ("name", "kind", "path")} for r in record] == [
        {"name": "kmnist", "kind": "kmnist", "path": None}
    ]
    assert ["default", "KMNIST/raw", ""] in record[0]["samples"]["places"]  # what it read
    test_dm = FashionMNISTDataModule(
        root=root, test_every=500, ood_every=500, num_workers=0, ood_sets=["mnist", "kmnist"]
    )
    fresh = ClassificationTask(model="lenet", model_kwargs={"in_channels": 1})
    with pytest.raises(ValueError, match=r"'kmnist'.*never be a reported OOD set"):
        _trainer().test(fresh, datamodule=test_dm, ckpt_path=ckpt)
    # fine-tuning or testing from the OE weights (model_kwargs.weights) keeps the record
    tuned = ClassificationTask(model="lenet", model_kwargs={"in_channels": 1, "weights": str(ckpt)})
    assert tuned.trained_outliers == record
    with pytest.raises(ValueError, match=r"'kmnist'.*never be a reported OOD set"):
        _trainer().test(tuned, datamodule=test_dm)
    ok_dm = FashionMNISTDataModule(
        root=root, test_every=500, ood_every=500, num_workers=0, ood_sets=["mnist"]
    )
    _trainer().test(ClassificationTask(model_kwargs={"in_channels": 1}), ok_dm, ckpt_path=ckpt)


def _fit_and_mean_msp_on_unseen_kmnist(root: str, outliers: bool) -> tuple[float, float]:
    """LeNet, Adadelta, one epoch on every 40th FashionMNIST training image (47 steps of 32);
    with OE the outliers are the even KMNIST test images. Returns (mean MSP on the odd KMNIST
    test images, ID test accuracy on every 10th test image)."""
    pl.seed_everything(0, verbose=False)
    dm = FashionMNISTDataModule(
        root=root,
        batch_size=32,
        num_workers=0,
        train_every=40,
        outlier_set={"name": "kmnist", "every": 2} if outliers else None,
    )
    task = ClassificationTask(
        model="lenet",
        model_kwargs={"in_channels": 1},
        optimizer=partial(torch.optim.Adadelta, lr=1.0),
    )
    _trainer().fit(task, datamodule=dm)
    kmnist = build_ood_dataset("kmnist", root, (1, 28, 28), dm.normalization)
    unseen = Subset(kmnist, range(1, len(kmnist), 10))  # odd indices: never an outlier
    test = Subset(dm._ready()["test"], range(0, 10000, 10))
    task.eval()
    with torch.no_grad():
        x_ood = torch.stack([s[0] for s in unseen])
        x_id = torch.stack([s[0] for s in test])
        y_id = torch.tensor([s[1] for s in test])
        msp = task.backbone(x_ood).softmax(1).amax(1).mean().item()
        acc = (task.backbone(x_id).argmax(1) == y_id).float().mean().item()
    return msp, acc


def test_oe_fit_lowers_the_msp_on_kmnist(shared_data: Path) -> None:
    """Measured (1 thread): mean MSP 0.53 without OE, 0.14 with OE; accuracy 0.78 and 0.73."""
    msp_plain, acc_plain = _fit_and_mean_msp_on_unseen_kmnist(str(shared_data), False)
    msp_oe, acc_oe = _fit_and_mean_msp_on_unseen_kmnist(str(shared_data), True)
    assert msp_oe < msp_plain - 0.15, (msp_oe, msp_plain)
    assert msp_oe < 0.3  # near the uniform 0.1 rather than confident
    assert acc_oe > 0.6 and acc_plain > 0.6  # both still learn FashionMNIST
