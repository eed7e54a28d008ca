"""WideResNet-40-2 for 32x32 images: the Outlier Exposure and energy-score papers' model.

Pre-activation basic blocks (Zagoruyko & Komodakis 2016) with widths 16, 32k, 64k, 128k for
widen factor k, dropout between the two convolutions of each block. Module names follow the
Outlier Exposure code (``conv1``, ``block1.layer.0.bn1``, ``convShortcut``, ``bn1``, ``fc``) so
its CIFAR checkpoints load without key surgery. Depth 40 means 6 blocks per group; with k = 2
the penultimate width is q = 128 and the model has 2.2 M parameters.
"""

from __future__ import annotations

import os

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.models.base import OODBackbone, reference_init
from lightning_ood.models.registry import register_model
from lightning_ood.models.weights import load_weights


class WideBasicBlock(nn.Module):
    """BN-ReLU-Conv3x3-BN-ReLU-(dropout)-Conv3x3 plus a shortcut.

    When the width or stride changes, the shortcut is a 1x1 convolution of the *activated*
    input (the pre-activation is shared by both branches), as in the reference model.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        # a module, not F.dropout: MC Dropout finds and switches nn.Dropout modules (no
        # parameters, so checkpoint keys are unchanged)
        self.dropout = nn.Dropout(drop_rate)
        self.convShortcut = (  # the reference checkpoints' key name
            None
            if in_planes == out_planes and stride == 1
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        out = self.conv2(self.dropout(out))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class WideGroup(nn.Module):
    """``num_blocks`` blocks; the first one changes width and stride. Attribute ``layer``."""

    def __init__(
        self, num_blocks: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, s, drop_rate)
                for i, s in enumerate([stride] + [1] * (num_blocks - 1))
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(OODBackbone):
    """WRN-depth-k for 32x32 inputs.

    Args:
        depth: 6n + 4 (n blocks per group).
        widen_factor: k, the width multiplier.
        num_classes: classifier outputs.
        drop_rate: dropout inside each block (0.3 in the OE / energy training runs).
    """

    def __init__(
        self,
        depth: int = 40,
        widen_factor: int = 2,
        num_classes: int = 10,
        drop_rate: float = 0.3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"depth must be 6n + 4 (n >= 1) for a WideResNet, got {depth}")
        if num_classes < 1 or widen_factor < 1:
            raise ValueError(
                f"num_classes and widen_factor must be >= 1, got {num_classes}, {widen_factor}"
            )
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideGroup(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideGroup(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)

        self.num_classes = num_classes
        self.num_features = widths[3]
        self.input_shape = (3, 32, 32)
        self.input_kind = "image"
        self.tap_layers = {n: n for n in ("conv1", "block1", "block2", "block3")}
        reference_init(self)

    def forward_features(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)  # = avg_pool2d(out, 8) on 32x32

    def get_classifier(self) -> nn.Linear:
        return self.fc


@register_model("wrn40_2")
def wrn40_2(
    num_classes: int = 10,
    drop_rate: float = 0.3,
    weights: str | os.PathLike[str] | None = None,
) -> WideResNet:
    """WideResNet-40-2 (Outlier Exposure / energy-score CIFAR model); q = 128.

    ``weights``: an Outlier Exposure ``.pt`` state_dict, a state_dict or a Lightning ``.ckpt``.
    """
    model = WideResNet(depth=40, widen_factor=2, num_classes=num_classes, drop_rate=drop_rate)
    if weights is not None:
        load_weights(model, weights, model_name="wrn40_2")
    return model
