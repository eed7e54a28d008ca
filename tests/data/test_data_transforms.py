"""The fast eval pipeline equals torchvision's v2 reference composition on the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from lightning_ood.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_TRUE_STD,
    CIFAR100_TRUE_MEAN,
    CIFAR100_TRUE_STD,
    CIFAR_REFERENCE_STD,
    ToNormalizedTensor,
    cifar_normalization,
    eval_transform,
)


def _reference(shape: tuple[int, int, int], mean: tuple, std: tuple) -> v2.Compose:
    c, h, _ = shape
    gray_or_rgb = v2.Grayscale(1) if c == 1 else v2.RGB()
    return v2.Compose(
        [
            gray_or_rgb,
            v2.Resize(h),
            v2.CenterCrop(h),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


@pytest.mark.parametrize(
    ("size", "mode", "shape"),
    [
        ((32, 32), "RGB", (3, 32, 32)),
        ((28, 28), "L", (3, 32, 32)),
        ((64, 48), "RGB", (3, 32, 32)),
        ((32, 32), "RGB", (1, 28, 28)),
        ((28, 28), "L", (1, 28, 28)),
    ],
)
def test_eval_transform_matches_v2_reference(
    size: tuple[int, int], mode: str, shape: tuple[int, int, int]
) -> None:
    rng = np.random.default_rng(0)
    dims = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    arr = rng.integers(0, 256, size=dims, dtype=np.uint8)
    img = Image.fromarray(arr)
    mean, std = ((0.3,), (0.4,)) if shape[0] == 1 else (CIFAR10_MEAN, CIFAR_REFERENCE_STD)
    ours = eval_transform(shape, mean, std)(img)
    ref = _reference(shape, mean, std)(img)
    assert ours.shape == shape and type(ours) is torch.Tensor
    torch.testing.assert_close(ours, ref.as_subclass(torch.Tensor), rtol=0, atol=2e-6)


def test_to_normalized_tensor_on_tensors_and_errors() -> None:
    x = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    out = ToNormalizedTensor((0.5,), (0.25,))(x)
    expected = (torch.tensor([[[0.0, 1.0], [0.2, 0.4]]]) - 0.5) / 0.25
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="image has 1 channels but the normalisation has 3"):
        ToNormalizedTensor(CIFAR10_MEAN, CIFAR_REFERENCE_STD)(x)
    with pytest.raises(ValueError, match="one positive std"):
        ToNormalizedTensor((0.5,), (0.0,))
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\)"):
        eval_transform((250,), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="1 or 3 input channels"):
        eval_transform((2, 8, 8), (0.5, 0.5), (0.5, 0.5))


def test_cifar_normalization_table() -> None:
    assert cifar_normalization("cifar10", "reference") == (CIFAR10_MEAN, CIFAR_REFERENCE_STD)
    assert cifar_normalization("cifar100", "reference") == (CIFAR10_MEAN, CIFAR_REFERENCE_STD)
    assert cifar_normalization("cifar10", "true_std") == (CIFAR10_MEAN, CIFAR10_TRUE_STD)
    assert cifar_normalization("cifar100", "true_std") == (CIFAR100_TRUE_MEAN, CIFAR100_TRUE_STD)
    assert CIFAR10_TRUE_STD == (0.247, 0.243, 0.261)
