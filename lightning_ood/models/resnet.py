"""ResNet-18, ResNet-34, ResNeXt-50 and ResNet-50 from torchvision behind the contract.

The networks are torchvision's own (variants are arguments, not copies); this file only adds
the CIFAR stem FSSD and OpenOOD use (3x3 stride-1 conv, no max-pool, for 32x32 inputs), the
taps and the weight loading. OpenOOD's ResNet-18 checkpoints name the projection shortcut
``shortcut`` where torchvision says ``downsample``; that one rename is applied on load.
"""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models import ResNet

from lightning_ood.io import download_timeout
from lightning_ood.models.base import OODBackbone
from lightning_ood.models.registry import register_model
from lightning_ood.models.weights import apply_state_dict, read_checkpoint

#: arch -> (torchvision constructor, torchvision weights enum).
_ARCHS: dict[str, tuple[Callable[..., ResNet], type[tvm.WeightsEnum]]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights),
    "resnext50": (tvm.resnext50_32x4d, tvm.ResNeXt50_32X4D_Weights),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights),
}


class TorchvisionResNet(OODBackbone):
    """A torchvision ResNet/ResNeXt (held as ``net``) with taps stem, layer1..layer4.

    Args:
        arch: ``"resnet18"``, ``"resnet34"``, ``"resnext50"`` or ``"resnet50"``.
        num_classes: classifier outputs.
        cifar_stem: replace the 7x7/2 conv + max-pool with a 3x3/1 conv (32x32 inputs).
    """

    def __init__(self, arch: str, num_classes: int = 10, cifar_stem: bool = True) -> None:
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(_ARCHS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.arch = arch
        self.net = _ARCHS[arch][0](weights=None, num_classes=num_classes)
        if cifar_stem:
            self.net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.net.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.net.maxpool = nn.Identity()
        self.cifar_stem = cifar_stem
        self.num_classes = num_classes
        self.num_features = self.net.fc.in_features
        self.input_shape = (3, 32, 32) if cifar_stem else (3, 224, 224)
        self.input_kind = "image"
        # The max-pool (an Identity with the CIFAR stem) outputs the post-ReLU stem feature.
        self.tap_layers = {
            "stem": "net.maxpool",
            **{f"layer{i}": f"net.layer{i}" for i in range(1, 5)},
        }

    def forward_features(self, x: Tensor) -> Tensor:
        n = self.net
        out = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        out = n.layer4(n.layer3(n.layer2(n.layer1(out))))
        return n.avgpool(out).flatten(1)

    def get_classifier(self) -> nn.Linear:
        return self.net.fc

    def load(self, weights: str | os.PathLike[str]) -> TorchvisionResNet:
        """Load a local file (torchvision key names, or this wrapper's) or a torchvision enum name.

        A name such as ``"IMAGENET1K_V1"`` that is not an existing file goes through torchvision's
        downloader, which first looks in the torch hub cache and otherwise needs the network.
        """
        enum = _ARCHS[self.arch][1]
        if isinstance(weights, str) and weights in enum.__members__ and not Path(weights).exists():
            state = download_torchvision_weights(enum[weights], self.arch)
            apply_state_dict(
                self.net,
                state,
                source=f"torchvision weights {self.arch} {weights}",
                model_name=self.arch,
                classifier=self.net.fc,
            )
        else:
            apply_state_dict(
                self.net,
                _rename_shortcuts(read_checkpoint(weights)),
                source=f"checkpoint {str(weights)!r}",
                model_name=self.arch,
                classifier=self.net.fc,
            )
        return self


def _rename_shortcuts(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenOOD's ``layerN.M.shortcut.{0,1}`` projection keys -> torchvision's ``downsample``."""
    return {k.replace(".shortcut.", ".downsample."): v for k, v in state.items()}


def download_torchvision_weights(weights: tvm.WeightsEnum, arch: str) -> dict[str, Tensor]:
    """Fetch torchvision weights, turning an offline failure into instructions.

    The fetch runs under :func:`lightning_ood.io.download_timeout`: torch.hub's ``urlopen``
    sets no timeout itself, so an offline machine would otherwise hang.
    """
    with download_timeout():
        try:
            return weights.get_state_dict(
                progress=False, check_hash=True, weights_only=True, map_location="cpu"
            )
        except (urllib.error.URLError, OSError) as err:
            raise RuntimeError(
                f"could not download the torchvision {arch} weights {weights.name} from "
                f"{weights.url} ({err}). This machine probably has no network: download that "
                "file on a machine that has, copy it here and pass its path as weights='/path/to/"
                f"{weights.url.rsplit('/', 1)[-1]}'."
            ) from err


def _build(
    arch: str, num_classes: int, cifar_stem: bool, weights: str | os.PathLike[str] | None
) -> TorchvisionResNet:
    model = TorchvisionResNet(arch, num_classes=num_classes, cifar_stem=cifar_stem)
    return model if weights is None else model.load(weights)


@register_model("resnet18")
def resnet18(
    num_classes: int = 10, cifar_stem: bool = True, weights: str | os.PathLike[str] | None = None
) -> TorchvisionResNet:
    """ResNet-18 with the CIFAR stem: OpenOOD v1.5's CIFAR model (``ResNet18_32x32``); q = 512.

    ``weights`` also reads OpenOOD's checkpoints (``shortcut`` keys are renamed on load).
    """
    return _build("resnet18", num_classes, cifar_stem, weights)


@register_model("resnet34")
def resnet34(
    num_classes: int = 10, cifar_stem: bool = True, weights: str | os.PathLike[str] | None = None
) -> TorchvisionResNet:
    """ResNet-34, by default with the CIFAR stem (FSSD's CIFAR-10 model); q = 512."""
    return _build("resnet34", num_classes, cifar_stem, weights)


@register_model("resnext50")
def resnext50(
    num_classes: int = 10, cifar_stem: bool = True, weights: str | os.PathLike[str] | None = None
) -> TorchvisionResNet:
    """ResNeXt-50 (32x4d), by default with the CIFAR stem (FSSD's face-set model); q = 2048."""
    return _build("resnext50", num_classes, cifar_stem, weights)


@register_model("resnet50")
def resnet50(
    num_classes: int = 1000,
    cifar_stem: bool = False,
    weights: str | os.PathLike[str] | None = None,
) -> TorchvisionResNet:
    """ImageNet ResNet-50 (the LINe/DICE ImageNet model); q = 2048.

    ``weights`` is a local torchvision-format state_dict path or ``"IMAGENET1K_V1"`` /
    ``"IMAGENET1K_V2"`` (downloaded by torchvision; fails with instructions when offline).
    """
    return _build("resnet50", num_classes, cifar_stem, weights)
