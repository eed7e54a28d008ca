"""The datamodules are configurable from YAML exactly as LightningCLI parses them."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningArgumentParser

from lightning_ood.data import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    GenomeDataModule,
    OODDataModule,
    default_data_root,
)
from lightning_ood.data.ood_sets import OODSpec


def _parse(text: str) -> OODDataModule:
    parser = LightningArgumentParser()
    parser.add_subclass_arguments(OODDataModule, "data", required=True)
    cfg = parser.parse_string(text)
    return parser.instantiate_classes(cfg).data


def test_yaml_with_named_and_dict_ood_sets() -> None:
    dm = _parse(
        """
data:
  class_path: lightning_ood.data.CIFAR10DataModule
  init_args:
    batch_size: 64
    eval_batch_size: 200
    source: jpeg
    normalization: true_std
    ood_sets:
      - svhn_1k
      - {name: lsun_crop, path: /x/LSUN}
      - {name: my_textures, kind: folder, path: /y/tex, every: 2}
    val_ood_sets: [tinyimagenet_crop]
    train_every: 5
"""
    )
    assert isinstance(dm, CIFAR10DataModule)
    assert (dm.batch_size, dm.eval_batch_size, dm.train_every) == (64, 200, 5)
    assert (dm.source, dm.normalization_name) == ("jpeg", "true_std")
    assert dm.ood_specs == [
        OODSpec("svhn_1k", "svhn_1k"),
        OODSpec("lsun_crop", "lsun_crop", Path("/x/LSUN")),
        OODSpec("my_textures", "folder", Path("/y/tex"), every=2),
    ]
    assert dm.test_set_names == ["cifar10", "svhn_1k", "lsun_crop", "my_textures"]
    assert dm.val_ood_names == ["tinyimagenet_crop"]
    assert dm.hparams["source"] == "jpeg" and dm.hparams["batch_size"] == 64


def test_yaml_genome_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _parse(
        """
data:
  class_path: lightning_ood.data.GenomeDataModule
  init_args: {seq_len: 100, ood_sets: [genome_ood]}
"""
    )
    assert isinstance(dm, GenomeDataModule)
    assert (dm.input_shape, dm.num_classes, dm.batch_size, dm.num_workers) == ((100,), 10, 64, 2)
    assert dm.root is None and dm.download is None
    monkeypatch.delenv("LIGHTNING_OOD_DATA", raising=False)
    assert dm.resolved_root() == (default_data_root(), False)


def test_init_does_no_io(tmp_path: Path) -> None:
    # A root that does not exist and unknown files: construction and names still work.
    dm = FashionMNISTDataModule(root=str(tmp_path / "nowhere"), ood_sets=["svhn", "isun"])
    assert dm.test_set_names == ["fashionmnist", "svhn", "isun"]
    assert not (tmp_path / "nowhere").exists()
    assert dm.data_version == "fashionmnist"  # unresolved until setup
