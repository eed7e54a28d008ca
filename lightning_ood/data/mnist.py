"""MNIST-family ID sets (FashionMNIST, MNIST) from the original uncompressed idx files."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch.utils.data import Dataset
from torchvision import datasets as tvd

from lightning_ood.data.base import OODDataModule
from lightning_ood.data.readers import check_idx_pair
from lightning_ood.data.transforms import (
    FASHIONMNIST_MEAN,
    FASHIONMNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    Normalization,
)

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class _IdxDataModule(OODDataModule):
    """MNIST-family ID set from the uncompressed idx files in ``<root>/<folder>/raw``.

    No training augmentation: the FSSD LeNet recipe trains on the eval pipeline.
    """

    folder: ClassVar[str]
    torchvision_class: ClassVar[type[tvd.MNIST]]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, 28, 28)

    @property
    def normalization(self) -> Normalization:
        return self.mean, self.std

    def _raw_dir(self, root: Path) -> Path:
        return root / self.folder / "raw"

    def _id_present(self, root: Path) -> bool:
        return all((self._raw_dir(root) / f).is_file() for f in IDX_FILES)

    def _download_id(self, root: Path) -> None:
        self.torchvision_class(str(root), train=True, download=True)

    def _load_id(self, root: Path) -> dict[str, Dataset]:
        raw = self._raw_dir(root)
        missing = [f for f in IDX_FILES if not (raw / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.display_name} not found under {raw}: expected {', '.join(IDX_FILES)} "
                f"(uncompressed idx files; missing: {', '.join(missing)}); pass --data.root or "
                "set download: true"
            )
        # Headers against sizes first: a truncated file fails here, named, before any read.
        for images, labels in (IDX_FILES[:2], IDX_FILES[2:]):
            check_idx_pair(raw / images, raw / labels)
        self._data_version = f"{self.display_name} (original idx files)"
        return {
            "train": self.torchvision_class(str(root), train=True),
            "test": self.torchvision_class(str(root), train=False),
        }


class FashionMNISTDataModule(_IdxDataModule):
    """FashionMNIST (``<root>/FashionMNIST/raw``), Normalize(0.2860, 0.3530) as in FSSD."""

    id_name = "fashionmnist"
    display_name = "FashionMNIST"
    folder = "FashionMNIST"
    torchvision_class = tvd.FashionMNIST
    mean = FASHIONMNIST_MEAN
    std = FASHIONMNIST_STD


class MNISTDataModule(_IdxDataModule):
    """MNIST (``<root>/MNIST/raw``), Normalize(0.1307, 0.3081)."""

    id_name = "mnist"
    display_name = "MNIST"
    folder = "MNIST"
    torchvision_class = tvd.MNIST
    mean = MNIST_MEAN
    std = MNIST_STD
