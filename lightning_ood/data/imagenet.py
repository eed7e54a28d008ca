"""ImageNet-1k ID set from an ImageFolder copy (no download: ImageNet needs a manual licence)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets as tvd

from lightning_ood.data.base import OODDataModule
from lightning_ood.data.readers import load_rgb
from lightning_ood.data.transforms import Normalization, ToNormalizedTensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetDataModule(OODDataModule):
    """ImageNet-1k from ``<root>/imagenet/{train,val}/<wnid>/*.JPEG`` (ImageFolder layout;
    the validation images sorted into class folders), as the LINe/ReAct ImageNet tables use.

    Eval: Resize(256) + CenterCrop(224) + Normalize (torchvision's ResNet-50 recipe); train:
    RandomResizedCrop(224) + flip. OOD sets are adapted to 3x224x224 by the OOD-set builder
    (Resize(224) + CenterCrop(224)). No download: ImageNet needs a manual licence.

    Args:
        folder: sub-folder of the data root holding ``train/`` and ``val/``.
        **kwargs: the :class:`OODDataModule` arguments.
    """

    id_name = "imagenet"
    display_name = "ImageNet-1k"

    def __init__(self, folder: str = "imagenet", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.folder = folder

    @property
    def num_classes(self) -> int:
        return 1000

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, 224, 224)

    @property
    def normalization(self) -> Normalization:
        return (IMAGENET_MEAN, IMAGENET_STD)

    def _eval_transform(self) -> Any:
        from torchvision.transforms import v2

        return v2.Compose(
            [v2.Resize(256), v2.CenterCrop(224), ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def _train_transform(self) -> Any:
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.RandomResizedCrop(224),
                v2.RandomHorizontalFlip(),
                ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def _id_present(self, root: Path) -> bool:
        return all((root / self.folder / s).is_dir() for s in ("train", "val"))

    def _load_id(self, root: Path) -> dict[str, Dataset]:
        sets = {}
        for split in ("train", "val"):
            path = root / self.folder / split
            if not path.is_dir():
                raise FileNotFoundError(
                    f"ImageNet {split} split not found: {path} does not exist; expected "
                    f"{root / self.folder}/{{train,val}}/<wnid>/*.JPEG (download it from "
                    "image-net.org and pass --data.init_args.root)"
                )
            sets[split] = tvd.ImageFolder(str(path), loader=load_rgb)  # errors name the file
            if len(sets[split].classes) != 1000:
                raise ValueError(
                    f"{path} has {len(sets[split].classes)} class folders, expected 1000"
                )
        self._data_version = f"ImageNet-1k ({root / self.folder})"
        return {"train": sets["train"], "test": sets["val"]}
