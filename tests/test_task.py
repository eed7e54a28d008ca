"""ClassificationTask training-loop bookkeeping."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood.task import ClassificationTask


def _frozen_sgd(params):
    return torch.optim.SGD(params, lr=0.0)


def test_train_acc_is_the_epoch_accuracy_over_every_training_batch() -> None:
    """``train/acc`` (logged on epoch end from ``update()``d state) is the accuracy of all
    training predictions. With lr 0 and no dropout the weights never change, so it must equal
    the accuracy of one eval pass over the same samples, including a short last batch."""
    torch.manual_seed(0)
    x = torch.randn(150, 1, 28, 28)
    task = ClassificationTask(
        model="lenet",
        num_classes=10,
        model_kwargs={"in_channels": 1, "dropout": False},
        optimizer=_frozen_sgd,
    )
    with torch.no_grad():
        pred = task.backbone(x).argmax(1)
    # 100 labels agree with the predictions, the other 50 are shifted by one class: 2/3
    y = torch.cat([pred[:100], (pred[100:] + 1) % 10])
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)  # 64 + 64 + 22
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, train_dataloaders=loader)
    logged = trainer.callback_metrics["train/acc"].item()
    assert abs(logged - 100 / 150) < 1e-6, logged
