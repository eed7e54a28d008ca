"""LeNet as FSSD trained it on FashionMNIST (the PyTorch MNIST example network).

conv3x3(32)-ReLU-conv3x3(64)-ReLU-maxpool2-dropout(0.25)-fc(128)-ReLU-dropout(0.5)-fc(L).
Parameter names (``conv1``, ``conv2``, ``fc1``, ``fc2``) match the example, so its state_dicts
load directly. The ReLUs are separate modules so that FSSD's taps ReLU(conv1), ReLU(conv2) and
ReLU(fc1) are plain module outputs.
"""

from __future__ import annotations

import os

from torch import Tensor, nn

from lightning_ood.models.base import OODBackbone
from lightning_ood.models.registry import register_model
from lightning_ood.models.weights import load_weights


class LeNet(OODBackbone):
    """Two-conv LeNet for 28x28 images; penultimate feature ReLU(fc1), q = 128.

    Args:
        num_classes: classifier outputs.
        in_channels: image channels (1 for MNIST-style data).
        dropout: keep the recipe's two dropout layers (0.25, 0.5). ``False`` makes training a
            deterministic function of the data order, e.g. to check that DDP on ``w`` ranks
            equals one process (dropout masks are drawn per rank, so they cannot match).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: bool = True) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"num_classes and in_channels must be >= 1, got num_classes={num_classes}, "
                f"in_channels={in_channels}"
            )
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.dropout1 = nn.Dropout(0.25 if dropout else 0.0)
        self.fc1 = nn.Linear(64 * 12 * 12, 128)
        self.relu3 = nn.ReLU()
        self.dropout2 = nn.Dropout(0.5 if dropout else 0.0)
        self.fc2 = nn.Linear(128, num_classes)

        self.num_classes = num_classes
        self.num_features = 128
        self.input_shape = (in_channels, 28, 28)
        self.input_kind = "image"
        self.tap_layers = {"conv1": "relu1", "conv2": "relu2", "fc1": "relu3"}

    def forward_features(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"LeNet expects inputs of shape (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}; resize images to 28x28 and check in_channels"
            )
        out = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        out = self.relu3(self.fc1(self.dropout1(out).flatten(1)))
        # Dropout before fc2 belongs to training only; in eval mode this is exactly ReLU(fc1).
        return self.dropout2(out)

    def get_classifier(self) -> nn.Linear:
        return self.fc2


@register_model("lenet")
def lenet(
    num_classes: int = 10,
    in_channels: int = 1,
    weights: str | os.PathLike[str] | None = None,
    dropout: bool = True,
) -> LeNet:
    """FSSD's LeNet; ``weights`` is an optional state_dict/.ckpt path."""
    model = LeNet(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
    if weights is not None:
        load_weights(model, weights, model_name="lenet")
    return model
