"""DenseNet-BC-100 (growth 12) as evaluated by DICE and LINe.

Layer names follow the reference ``DenseNet3`` so its published CIFAR checkpoints
(``conv1``, ``block1.layer.0.bn1``, ``trans1.conv1``, ``bn1``, ``fc``) load without key
surgery. Depth 100 with bottlenecks gives 3 dense blocks of 16 bottleneck layers; the stem has
2 * growth = 24 channels and each transition halves the channels (compression 0.5), so the
final width is q = 342 and the model has 0.77 M parameters.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.models.base import OODBackbone, reference_init
from lightning_ood.models.registry import register_model
from lightning_ood.models.weights import load_weights


class BottleneckBlock(nn.Module):
    """BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k); the k new maps are concatenated to the input."""

    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        inter = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, inter, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth_rate, kernel_size=3, padding=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class TransitionBlock(nn.Module):
    """BN-ReLU-Conv1x1 to ``out_planes`` channels, then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv1(self.relu(self.bn1(x))), 2)


class DenseBlock(nn.Module):
    """``num_layers`` bottleneck layers; the attribute is named ``layer`` as in the reference."""

    def __init__(self, num_layers: int, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(BottleneckBlock(in_planes + i * growth_rate, growth_rate) for i in range(num_layers))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class DenseNet3(OODBackbone):
    """DenseNet-BC for 32x32 images with three dense blocks (Huang et al. 2017).

    Args:
        depth: total depth; (depth - 4) / 6 bottleneck layers per block.
        num_classes: classifier outputs.
        growth_rate: channels each bottleneck layer adds (k).
        reduction: transition compression factor (theta).
    """

    def __init__(
        self,
        depth: int = 100,
        num_classes: int = 10,
        growth_rate: int = 12,
        reduction: float = 0.5,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 for DenseNet-BC, got depth={depth}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        n = (depth - 4) // 6
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, planes, kernel_size=3, padding=1, bias=False)
        self.block1 = DenseBlock(n, planes, growth_rate)
        planes += n * growth_rate
        self.trans1 = TransitionBlock(planes, int(planes * reduction))
        planes = int(planes * reduction)
        self.block2 = DenseBlock(n, planes, growth_rate)
        planes += n * growth_rate
        self.trans2 = TransitionBlock(planes, int(planes * reduction))
        planes = int(planes * reduction)
        self.block3 = DenseBlock(n, planes, growth_rate)
        planes += n * growth_rate
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(planes, num_classes)

        self.num_classes = num_classes
        self.num_features = planes
        self.input_shape = (3, 32, 32)
        self.input_kind = "image"
        self.tap_layers = {
            "conv1": "conv1",
            "block1": "block1",
            "trans1": "trans1",
            "block2": "block2",
            "trans2": "trans2",
            "block3": "block3",
        }
        self._init_weights()

    def _init_weights(self) -> None:
        reference_init(self)

    def forward_features(self, x: Tensor) -> Tensor:
        out = self.trans1(self.block1(self.conv1(x)))
        out = self.trans2(self.block2(out))
        out = self.relu(self.bn1(self.block3(out)))
        # Global average pool; identical to the reference's avg_pool2d(out, 8) on 32x32 inputs
        # and still (B, q) for other sizes.
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def get_classifier(self) -> nn.Linear:
        return self.fc


@register_model("densenet100")
def densenet100(num_classes: int = 10, weights: str | os.PathLike[str] | None = None) -> DenseNet3:
    """DenseNet-BC-100, growth 12, compression 0.5, no dropout (the DICE/LINe CIFAR model).

    Args:
        num_classes: 10 for CIFAR-10, 100 for CIFAR-100.
        weights: optional path to a reference ``.pth.tar``, a state_dict or a Lightning
            ``.ckpt``; loaded with :func:`~lightning_ood.models.weights.load_weights`.
    """
    model = DenseNet3(depth=100, num_classes=num_classes, growth_rate=12, reduction=0.5)
    if weights is not None:
        load_weights(model, weights, model_name="densenet100")
    return model
