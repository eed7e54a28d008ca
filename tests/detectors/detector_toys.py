"""Toy backbones shared by the detector tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
