"""Data: LightningDataModules for the ID sets, named OOD sets, readers and transforms."""

from lightning_ood.data.base import (
    CorruptDataError,
    OODDataModule,
    has_train_eval_loader,
    train_eval_loader,
)
from lightning_ood.data.cifar import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule
from lightning_ood.data.genome import (
    GenomeDataModule,
    read_genome_tsv,
    write_synthetic_genome,
)
from lightning_ood.data.imagenet import ImageNetDataModule
from lightning_ood.data.mnist import FashionMNISTDataModule, MNISTDataModule
from lightning_ood.data.ood_sets import (
    OOD_SETS,
    OODSetInfo,
    OODSpec,
    build_ood_dataset,
    parse_ood_spec,
    register_ood_set,
)
from lightning_ood.data.paths import DATA_ROOT_ENV, default_data_root

__all__ = [
    "DATA_ROOT_ENV",
    "OOD_SETS",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "CorruptDataError",
    "FashionMNISTDataModule",
    "GenomeDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "OODDataModule",
    "OODSetInfo",
    "OODSpec",
    "build_ood_dataset",
    "default_data_root",
    "has_train_eval_loader",
    "parse_ood_spec",
    "read_genome_tsv",
    "register_ood_set",
    "train_eval_loader",
    "write_synthetic_genome",
]
