"""Normalisation constants and the train/eval pipelines (torchvision transforms v2).

Every evaluation pipeline, for the ID test set and for every OOD set, is the reference one
(DICE/LINe ``ood_eval.py``): ``Resize(s)``, ``CenterCrop(s)``, ``ToTensor``, ``Normalize`` with
the ID set's constants. An image from another domain is first adapted to the model's channel
count (grayscale -> 3 replicated channels, RGB -> ITU-R 601 luma), then resized, so that the
ID normalisation applies to every set. Resizing runs on PIL images, exactly as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

#: CIFAR-10 per-channel mean (the reference's constant).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
#: The std the DICE/LINe reference code uses (a widely copied value that is not the true
#: per-channel std of CIFAR-10); the published checkpoints were evaluated with it.
CIFAR_REFERENCE_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)
#: The true per-pixel std of the CIFAR-10 training set (``normalization: true_std``).
CIFAR10_TRUE_STD: tuple[float, float, float] = (0.247, 0.243, 0.261)
#: CIFAR-100: the DICE/LINe code normalises CIFAR-100 with the CIFAR-10 constants
#: (``ood_eval.py`` builds one ``transform_test`` for both), so the reference checkpoint
#: expects them; the true CIFAR-100 statistics are deliberately not used.
CIFAR100_MEAN: tuple[float, float, float] = CIFAR10_MEAN
CIFAR100_STD: tuple[float, float, float] = CIFAR_REFERENCE_STD
#: The true CIFAR-100 training-set statistics (``normalization: true_std`` for CIFAR-100).
CIFAR100_TRUE_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_TRUE_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)
#: FashionMNIST (FSSD reference: ``Normalize(0.2860, 0.3530)``).
FASHIONMNIST_MEAN: tuple[float] = (0.2860,)
FASHIONMNIST_STD: tuple[float] = (0.3530,)
#: MNIST (the usual constants of the PyTorch MNIST example).
MNIST_MEAN: tuple[float] = (0.1307,)
MNIST_STD: tuple[float] = (0.3081,)

Normalization = tuple[Sequence[float], Sequence[float]]


class ToNormalizedTensor:
    """PIL image (or uint8 (C, H, W) tensor) -> float32 (C, H, W), ``(x / 255 - mean) / std``.

    Equivalent to ``v2.Compose([ToImage(), ToDtype(float32, scale=True), Normalize(mean,
    std)])`` up to float rounding, at a tenth of its per-sample cost (which matters on the
    detector-fitting pass over 50-60k training images on a CPU).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or any(v <= 0 for v in std):
            raise ValueError(f"need one positive std per mean value, got mean={mean}, std={std}")
        self.stats = (tuple(mean), tuple(std))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        if isinstance(img, Tensor):
            x = img if img.ndim == 3 else img.unsqueeze(0)
        else:
            arr = np.array(img, dtype=np.uint8, copy=True)
            x = torch.from_numpy(arr)
            x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        if x.shape[0] != self.mean.shape[0]:
            raise ValueError(
                f"image has {x.shape[0]} channels but the normalisation has {self.mean.shape[0]}"
            )
        return x.float().div_(255).sub_(self.mean).div_(self.std).contiguous()

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.stats[0]}, std={self.stats[1]})"


class ChannelAdapter:
    """Bring a PIL image to ``channels``: 1 = ITU-R 601 luma (``convert("L")``, as
    ``v2.Grayscale``), 3 = RGB (a grayscale image is replicated); no-op when already there."""

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"image models need 1 or 3 input channels, got {channels}")
        self.mode = "L" if channels == 1 else "RGB"
        self.fallback = v2.Grayscale(1) if channels == 1 else v2.RGB()

    def __call__(self, img: Image.Image | Tensor) -> Image.Image | Tensor:
        if isinstance(img, Image.Image):
            return img if img.mode == self.mode else img.convert(self.mode)
        return self.fallback(img)

    def __repr__(self) -> str:
        return f"ChannelAdapter({self.mode})"


class FitSize:
    """``Resize(max(H, W))`` then ``CenterCrop((H, W))`` (the reference's ``Resize(32),
    CenterCrop(32)``), skipped for images that already have the size, where both are exact
    no-ops."""

    def __init__(self, height: int, width: int) -> None:
        self.size = (height, width)
        self.resize = v2.Compose([v2.Resize(max(height, width)), v2.CenterCrop((height, width))])

    def __call__(self, img: Image.Image | Tensor) -> Image.Image | Tensor:
        h, w = (img.height, img.width) if isinstance(img, Image.Image) else img.shape[-2:]
        return img if (h, w) == self.size else self.resize(img)

    def __repr__(self) -> str:
        return f"FitSize({self.size})"


def channel_adapter(channels: int) -> ChannelAdapter:
    """See :class:`ChannelAdapter`."""
    return ChannelAdapter(channels)


def _check_image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape must be (C, H, W) for image data, got {tuple(input_shape)}; "
            "token models (e.g. genome sequences) take no image sets"
        )
    c, h, w = (int(v) for v in input_shape)
    return c, h, w


def eval_transform(
    input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    """The reference test-time pipeline, adapted to the model's (C, H, W).

    Channels first (:class:`ChannelAdapter`), then ``Resize(max(H, W))`` +
    ``CenterCrop((H, W))`` (= ``Resize(32), CenterCrop(32)`` for CIFAR), then
    ``ToTensor`` + ``Normalize`` with the ID constants.
    """
    c, h, w = _check_image_shape(input_shape)
    if len(mean) != c or len(std) != c:
        raise ValueError(
            f"normalisation has {len(mean)} mean / {len(std)} std values for {c} channels"
        )
    return v2.Compose([ChannelAdapter(c), FitSize(h, w), ToNormalizedTensor(mean, std)])


def cifar_train_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """CIFAR training augmentation of the DenseNet/ResNet recipes: crop (pad 4) + flip."""
    return v2.Compose(
        [
            ChannelAdapter(3),
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            ToNormalizedTensor(mean, std),
        ]
    )


def cifar_normalization(
    variant: Literal["cifar10", "cifar100"], normalization: Literal["reference", "true_std"]
) -> Normalization:
    """(mean, std) of a CIFAR variant.

    ``reference``: the DICE/LINe constants (the same for both variants). ``true_std``: the
    set's true training statistics: CIFAR-10 keeps the reference mean with std
    (0.247, 0.243, 0.261); CIFAR-100 uses its own mean and std.
    """
    if normalization not in ("reference", "true_std"):
        raise ValueError(f"normalization must be 'reference' or 'true_std', got {normalization!r}")
    if variant not in ("cifar10", "cifar100"):
        raise ValueError(f"variant must be 'cifar10' or 'cifar100', got {variant!r}")
    if normalization == "reference":
        return (
            (CIFAR10_MEAN, CIFAR_REFERENCE_STD)
            if variant == "cifar10"
            else (
                CIFAR100_MEAN,
                CIFAR100_STD,
            )
        )
    if variant == "cifar10":
        return CIFAR10_MEAN, CIFAR10_TRUE_STD
    return CIFAR100_TRUE_MEAN, CIFAR100_TRUE_STD
