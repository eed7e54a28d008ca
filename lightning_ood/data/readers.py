"""Plain torch Datasets that read the on-disk formats; they return ``(PIL image, label)``.

Transforms are applied by :class:`Transformed`, so one reader (one copy of the pixels in
memory) serves several views: the augmented training view, the eval-transform view the
detectors are fitted on, and a held-out validation view.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.mnist import read_image_file, read_label_file

Sample = tuple[Any, int]

#: CIFAR pickle layout as torchvision downloads it: folder, train files, test files, label key.
CIFAR_PICKLES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]] = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels"),
}
#: CIFAR-10 class names in label order (0 = airplane ... 9 = truck).
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class Transformed(Dataset):
    """Apply ``transform`` to the image of each sample and optionally replace its label.

    OOD sets use ``label=-1`` so every OOD batch is ``(x, -1)``.
    """

    def __init__(
        self, dataset: Dataset, transform: Callable[[Any], Any] | None, label: int | None = None
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.label = label

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample:
        x, y = self.dataset[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(y) if self.label is None else self.label


def take_every(dataset: Dataset, every: int) -> Dataset:
    """Every ``every``-th sample in file order (0, n, 2n, ...), for fast runs."""
    if every < 1:
        raise ValueError(f"subset step must be >= 1, got {every}")
    if every == 1:
        return dataset
    return Subset(dataset, range(0, len(dataset), every))  # type: ignore[arg-type]


class IdxImages(Dataset):
    """An idx (MNIST-family) image file with an optional label file.

    Reads the uncompressed idx files with torchvision's own parsers; used for sets where only
    the test split is present (KMNIST here), which torchvision's dataset classes refuse.
    """

    def __init__(self, images_file: Path, labels_file: Path | None = None) -> None:
        self.images = read_image_file(str(images_file))
        if labels_file is None:
            self.labels = torch.full((len(self.images),), -1, dtype=torch.long)
        else:
            self.labels = read_label_file(str(labels_file)).long()
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"{images_file} holds {len(self.images)} images but {labels_file} holds "
                f"{len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        return Image.fromarray(self.images[index].numpy()), int(self.labels[index])


class CIFARPickles(Dataset):
    """The original CIFAR-10/100 python pickles (torchvision's download layout).

    Read directly (not through ``torchvision.datasets.CIFAR10``) so that the reader does not
    depend on the md5 of the published files and can be tested on small pickles.
    """

    def __init__(self, folder: Path, files: Sequence[str], label_key: str) -> None:
        data, labels = [], []
        for name in files:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if "data" not in entry or label_key not in entry:
                raise ValueError(
                    f"{folder / name} is not a CIFAR pickle: expected keys 'data' and "
                    f"{label_key!r}, found {sorted(entry)}"
                )
            data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in entry[label_key])
        self.data = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))  # NHWC
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Sample:
        return Image.fromarray(self.data[index]), int(self.labels[index])


def list_images(folder: Path) -> list[Path]:
    """All image files below ``folder``, recursively, in sorted path order.

    Sorting by path components reproduces the order of ``ImageFolder`` (class folders sorted,
    files sorted within them), which the reference code used for these sets.
    """
    found: list[Path] = []
    for dirpath, _, filenames in os.walk(folder, followlinks=True):
        found.extend(
            Path(dirpath) / name for name in filenames if name.lower().endswith(IMG_EXTENSIONS)
        )
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, like ``ImageFolder``'s default loader."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class ImageFiles(Dataset):
    """A flat list of image files with one constant label (OOD folders: -1)."""

    def __init__(self, files: Sequence[Path], label: int = -1) -> None:
        self.files = list(files)
        self.label = label

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        return load_rgb(self.files[index]), self.label


class FixedCrops(ImageFiles):
    """Random crops whose offsets are drawn ONCE, for the whole sorted file list.

    Offsets come from ``torch.Generator().manual_seed(seed)`` over all files, so the crop of
    file i does not depend on subsetting, worker processes or the epoch (the classic
    "TinyImageNet (crop)" set: one random 32x32 crop of each 64x64 test image).

    Attributes:
        offsets: (N, 2) long tensor of (top, left) per file.
    """

    def __init__(
        self,
        files: Sequence[Path],
        crop: int = 32,
        image_size: int = 64,
        seed: int = 0,
        label: int = -1,
    ) -> None:
        super().__init__(files, label)
        if not 0 < crop <= image_size:
            raise ValueError(f"crop must be in (0, image_size={image_size}], got {crop}")
        self.crop = crop
        self.image_size = image_size
        gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, image_size - crop + 1, (len(self.files), 2), generator=gen)

    def __getitem__(self, index: int) -> Sample:
        img = load_rgb(self.files[index])
        if img.size != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.files[index]} is {img.size[0]}x{img.size[1]}; the fixed-crop set expects "
                f"{self.image_size}x{self.image_size} images"
            )
        top, left = (int(v) for v in self.offsets[index])
        return img.crop((left, top, left + self.crop, top + self.crop)), self.label


class SVHNMat(Dataset):
    """An SVHN ``.mat`` split (``X``: (32, 32, 3, N) uint8, ``y``: (N, 1), 10 = digit 0)."""

    def __init__(self, mat_file: Path) -> None:
        from scipy.io import loadmat  # scipy comes with scikit-learn; only SVHN needs it

        mat = loadmat(str(mat_file))
        x, y = mat.get("X"), mat.get("y")
        if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise ValueError(
                f"{mat_file} is not an SVHN .mat file: expected 'X' of shape (32, 32, 3, N) "
                f"and 'y' of shape (N, 1), found {sorted(k for k in mat if not k.startswith('_'))}"
            )
        self.data = np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)).astype(np.uint8))
        labels = np.asarray(y, dtype=np.int64).reshape(-1)
        labels[labels == 10] = 0
        self.labels = labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Sample:
        return Image.fromarray(self.data[index]), int(self.labels[index])


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of each class, in file order.

    A class with fewer samples contributes all of them.
    """
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    ranked = labels[order]
    rank = np.arange(len(labels)) - np.searchsorted(ranked, ranked, side="left")
    return np.sort(order[rank < per_class])
