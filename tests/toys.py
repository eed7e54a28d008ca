"""Toy backbones shared by the tests, and :func:`fitted`: detectors built, fitted and
calibrated the one way the package does it (``lightning_ood.engine``).

Importable from every test module (``tests/`` is on ``sys.path`` through its conftest).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_ood import engine
from lightning_ood.detectors import Detector, build_detector
from lightning_ood.models.base import OODBackbone


class LinearHeadNet(OODBackbone):
    """Inputs are the penultimate features themselves; the head is one linear layer."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.num_classes, self.num_features = weight.shape
        self.input_shape = (self.num_features,)
        self.fc = nn.Linear(self.num_features, self.num_classes, dtype=weight.dtype)
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return x

    def get_classifier(self) -> nn.Linear:
        return self.fc


class TapNet(OODBackbone):
    """conv(2->4) - ReLU [tap "conv"] - fc(64->8) [tap "fc"] - ReLU = features - fc(8->3).

    Image inputs of shape (2, 4, 4) with two intermediate taps, so every detector (input
    pre-processing, FSSD's default taps, Mahalanobis on a conv map) runs on it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(64, 8)
        self.head = nn.Linear(8, 3)
        self.num_classes, self.num_features, self.input_shape = 3, 8, (2, 4, 4)
        self.tap_layers = {"conv": "act", "fc": "fc"}

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc(self.act(self.conv(x)).flatten(1)))

    def get_classifier(self) -> nn.Linear:
        return self.head


def fitted(
    detectors: Mapping[str, Mapping[str, Any] | None],
    backbone: OODBackbone,
    loader: Iterable[Any] | None,
    calibrate_loader: Iterable[Any] | None = None,
    tpr: float = 0.95,
) -> dict[str, Detector]:
    """Detectors built from config entries (``name: {type: kind, **hyperparameters}``, as in
    ``build_detector``), fitted together by one ``engine.fit_from_loader`` pass over
    ``loader`` and, with ``calibrate_loader`` (held-out ID batches), given their decision
    thresholds at ``tpr`` by ``engine.score_loader`` + ``engine.calibrate_detectors``."""
    dets = {name: build_detector(name, spec) for name, spec in detectors.items()}
    engine.fit_from_loader(dets.values(), backbone, loader)
    if calibrate_loader is not None:
        id_scores = engine.score_loader(dets, backbone, calibrate_loader)
        engine.calibrate_detectors(dets, id_scores, tpr)
    return dets


#: A LINe grid over FashionMNIST slices (selection on KMNIST by FPR95 on a seeded half of the
#: ID test set, paper values as reference): the grid tests' spec, written to a YAML file.
LINE_GRID_SPEC: dict[str, Any] = {
    "detector": "line",
    "base": {"delta": 1.0},
    "grid": {"p_a": [10, 90], "p_w": [10, 90]},
    "val_ood_sets": ["kmnist"],
    "reference": {"p_a": 90, "p_w": 90},
    "select": "fpr95",
    "id_val_fraction": 0.5,
}


class TensorSetsData(LightningDataModule):
    """A datamodule over in-memory sets for session tests: subclasses set ``train`` (the
    detector-fitting pass), ``val`` (held-out labelled ID validation) and their test sets;
    every loader reads in order, ``batch_size`` at a time."""

    batch_size = 16
    train: Dataset
    val: Dataset

    def _loader(self, ds: Dataset) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size)

    def train_eval_dataloader(self) -> DataLoader:
        return self._loader(self.train)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val)
