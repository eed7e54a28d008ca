"""CIFAR-10/100 ID sets, from the original pickles or a JPEG ImageFolder copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from torch.utils.data import Dataset
from torchvision import datasets as tvd

from lightning_ood.data.base import OODDataModule
from lightning_ood.data.readers import CIFAR10_CLASSES, CIFAR_PICKLES, CIFARPickles, load_rgb
from lightning_ood.data.transforms import (
    Normalization,
    cifar_normalization,
    cifar_train_transform,
)


class CIFARDataModule(OODDataModule):
    """CIFAR-10/100 from the original pickles or from a JPEG ImageFolder copy.

    Layout under the data root: ``cifar-10-batches-py/`` (``cifar-100-python/``) as
    torchvision downloads it, or ``cifar10-jpeg-q75/{train,test}/<class>/*.jpg``
    (``cifar100-jpeg-q75`` likewise) whose alphabetically sorted class folders equal the
    CIFAR label order (checked). Train: RandomCrop(32, pad 4) + flip; eval: the reference
    Resize(32) + CenterCrop(32) + Normalize for the ID set and every OOD set.

    Args:
        source: "pickle", "jpeg", or "auto" (pickles when present, else the JPEG copy).
            ``data_version`` records which one was read.
        normalization: "reference" (the DICE/LINe constants, also for CIFAR-100) or
            "true_std" (the set's true training statistics).
        **kwargs: the :class:`OODDataModule` arguments.
    """

    variant: ClassVar[Literal["cifar10", "cifar100"]] = "cifar10"
    id_name = "cifar10"
    display_name = "CIFAR-10"

    def __init__(
        self,
        source: Literal["auto", "pickle", "jpeg"] = "auto",
        normalization: Literal["reference", "true_std"] = "reference",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if source not in ("auto", "pickle", "jpeg"):
            raise ValueError(f"source must be 'auto', 'pickle' or 'jpeg', got {source!r}")
        self.source = source
        self.normalization_name = normalization
        self._norm = cifar_normalization(self.variant, normalization)

    @property
    def num_classes(self) -> int:
        return 10 if self.variant == "cifar10" else 100

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    @property
    def normalization(self) -> Normalization:
        return self._norm

    def _train_transform(self) -> Any:
        return cifar_train_transform(*self._norm)

    def _dirs(self, root: Path) -> tuple[Path, Path]:
        return root / CIFAR_PICKLES[self.variant][0], root / f"{self.variant}-jpeg-q75"

    def _resolve_source(self, root: Path) -> Literal["pickle", "jpeg"] | None:
        pickles, jpeg = self._dirs(root)
        if self.source != "auto":
            return self.source  # type: ignore[return-value]
        if pickles.is_dir():
            return "pickle"
        if jpeg.is_dir():
            return "jpeg"
        return None

    def _id_present(self, root: Path) -> bool:
        pickles, jpeg = self._dirs(root)
        source = self._resolve_source(root)
        return (source == "pickle" and pickles.is_dir()) or (source == "jpeg" and jpeg.is_dir())

    def _download_id(self, root: Path) -> None:
        if self.source == "jpeg":  # the JPEG copy has no download; setup says what is missing
            return
        cls = tvd.CIFAR10 if self.variant == "cifar10" else tvd.CIFAR100
        cls(str(root), train=True, download=True)

    def _load_id(self, root: Path) -> dict[str, Dataset]:
        pickles, jpeg = self._dirs(root)
        folder, train_files, test_files, key = CIFAR_PICKLES[self.variant]
        source = self._resolve_source(root)
        layout = (
            f"{folder}/{{{','.join((*train_files, *test_files))}}} (the original pickles) "
            f"or {jpeg.name}/{{train,test}}/<class>/*.jpg"
        )
        if source is None:
            raise FileNotFoundError(
                f"{self.display_name} not found under {root}: expected {layout}; pass "
                "--data.root or set download: true"
            )
        if source == "pickle":
            missing = [f for f in (*train_files, *test_files) if not (pickles / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{self.display_name} pickles incomplete under {pickles}: missing "
                    f"{', '.join(missing)}; pass --data.root or set download: true"
                )
            train = CIFARPickles(pickles, train_files, key)
            test = CIFARPickles(pickles, test_files, key)
            for split, ds in (("train", train), ("test", test)):
                if ds.labels.min() < 0 or ds.labels.max() >= self.num_classes:
                    raise ValueError(
                        f"{pickles} {split} labels span {ds.labels.min()}..{ds.labels.max()}, "
                        f"expected 0..{self.num_classes - 1}"
                    )
            self._data_version = f"{self.display_name} original (python pickles)"
            return {"train": train, "test": test}
        splits = {}
        for split in ("train", "test"):
            folder_path = jpeg / split
            if not folder_path.is_dir():
                raise FileNotFoundError(
                    f"{self.display_name} JPEG copy incomplete: {folder_path} does not exist; "
                    f"expected {layout}"
                )
            ds = tvd.ImageFolder(str(folder_path), loader=load_rgb)  # decode errors name the file
            self._check_classes(ds.classes, folder_path)
            splits[split] = ds
        self._data_version = f"{self.display_name} JPEG copy ({jpeg.name}, lossy re-encoding)"
        return splits

    def _check_classes(self, classes: list[str], folder: Path) -> None:
        if self.variant == "cifar10" and tuple(classes) != CIFAR10_CLASSES:
            raise ValueError(
                f"class folders of {folder} are {classes}; expected the CIFAR-10 classes "
                f"{list(CIFAR10_CLASSES)} (their sorted order is the label order)"
            )
        if len(classes) != self.num_classes:
            raise ValueError(
                f"{folder} has {len(classes)} class folders, expected {self.num_classes}"
            )


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 (see :class:`CIFARDataModule`)."""

    variant = "cifar10"
    id_name = "cifar10"
    display_name = "CIFAR-10"


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 fine labels (see :class:`CIFARDataModule`); CIFAR-100's fine label names
    are alphabetical, so a sorted ImageFolder copy also keeps the label order."""

    variant = "cifar100"
    id_name = "cifar100"
    display_name = "CIFAR-100"
