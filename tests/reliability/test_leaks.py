"""Selection and reported data never share a sample, whatever the entries are named (issue 21,
items 9, 14 and 15).

* a validation (tuning) OOD set that reads a reported set's samples under another name, path or
  slice is refused (item 9);
* the Outlier Exposure set a network was trained with may not be reported or tune, under
  another name, path (a symlink, ``x/../x``), as a corrupted copy, in ``test`` or in the grid,
  also from a checkpoint that recorded only its name (item 14);
* a checkpoint records its training split (val_size, val_seed, train_every, training-set size),
  and a later run whose held-out ID validation data holds a trained-on image is refused (item
  15); a checkpoint without the record is warned about.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ood.data import FashionMNISTDataModule, parse_ood_spec
from lightning_ood.data.base import SampleIdentity, sample_identity
from lightning_ood.grid import run_spec
from lightning_ood.models import create_model
from lightning_ood.task import ClassificationTask

KMNIST_C = {
    "name": "kmnist_c",
    "kind": "corrupted",
    "base": "kmnist",
    "corruption": "gaussian_noise",
    "severity": 1,
}
GRID = {"detector": "react", "grid": {"percentile": [90]}}


def _dm(root: Path, **kw: Any) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(root=str(root), num_workers=0, **kw)


def _trainer(**kw: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kw,
    )


def _fit_ckpt(path: Path, dm: FashionMNISTDataModule) -> Path:
    """Two training steps of a LeNet on ``dm``, saved to ``path``."""
    task = ClassificationTask(model="lenet", model_kwargs={"in_channels": 1})
    trainer = _trainer(max_epochs=1, max_steps=2)
    trainer.fit(task, datamodule=dm)
    trainer.save_checkpoint(path)
    return path


class CountingTask(ClassificationTask):
    """Counts its test steps: a refusal must come before the first."""

    steps = 0

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        self.steps += 1
        return super().test_step(*args, **kwargs)


def _lenet() -> CountingTask:
    return CountingTask(model="lenet", model_kwargs={"in_channels": 1})


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """tmp/x with four 28x28 grey PNGs, tmp/link -> x."""
    folder = tmp_path / "x"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    os.symlink(folder, tmp_path / "link")
    return folder


# -- item 9: validation sets ---------------------------------------------------------------
def test_slices_meet_as_arithmetic_progressions_and_halves_of_one_split_do_not() -> None:
    place = frozenset({("path", "/d/KMNIST/raw", "")})

    def ident(every: int, offset: int = 0, half: tuple[int, int] | None = None) -> Any:
        return SampleIdentity(place, every, offset, half)

    # every 4th from 0 (0, 4, 8, ...) and from 1 (1, 5, 9, ...) never meet; 2k and 2+4k do
    assert not ident(4, 0).shares_samples(ident(4, 1))
    assert ident(2, 0).shares_samples(ident(4, 2))
    assert not ident(2, 1).shares_samples(ident(4, 0))
    assert ident(3, 1).shares_samples(ident(5, 0))  # 10 = 1 + 3*3 = 0 + 5*2
    assert not ident(1, half=(0, 0)).shares_samples(ident(1, half=(0, 1)))
    assert ident(1, half=(0, 1)).shares_samples(ident(1, half=(1, 1)))  # two random halves
    other = SampleIdentity(frozenset({("path", "/d/MNIST/raw", "")}))
    assert not ident(1).shares_samples(other)
    # the record a checkpoint stores is plain data and reads back to the same identity
    stored = ident(2, 1, (3, 1)).to_record()
    assert stored == {
        "places": [["path", "/d/KMNIST/raw", ""]],
        "every": 2,
        "offset": 1,
        "half": [3, 1],
    }
    assert SampleIdentity.from_record(stored) == ident(2, 1, (3, 1))
    assert SampleIdentity.from_record({"name": "kmnist"}) is None


def test_identity_is_what_is_read_not_the_name(shared_data: Path, image_folder: Path) -> None:
    root = shared_data

    def ident(entry: Any, split: str = "test") -> SampleIdentity:
        return sample_identity(parse_ood_spec(entry), root, split)  # type: ignore[arg-type]

    mnist = ident("mnist")
    assert mnist.places == {
        ("path", str(root / "MNIST" / "raw"), ""),
        ("default", "MNIST/raw", ""),
    }
    assert ident({"name": "mnist_val", "kind": "mnist"}, "val") == mnist
    explicit = ident({"name": "m", "kind": "mnist", "path": str(root / "MNIST" / "raw")})
    assert explicit.shares_samples(mnist) and "default" not in {p[0] for p in explicit.places}
    corrupted = ident({**KMNIST_C, "split_seed": 2})
    assert corrupted.half == (2, 1) and corrupted.shares_samples(ident("kmnist"))
    assert not ident("kmnist").shares_samples(mnist)
    # CIFAR-10 and CIFAR-100 both live under the data root: told apart by their reader
    assert not ident("cifar10").shares_samples(ident("cifar100"))
    # genome_ood has a validation file of its own: its val variant is other samples
    assert not ident("genome_ood", "val").shares_samples(ident("genome_ood"))
    # a folder is its real path: a symlink, x/../x and a parent folder read the same files
    x = ident({"name": "a", "kind": "folder", "path": str(image_folder)})
    for path in (image_folder.parent / "link", image_folder / ".." / "x", image_folder.parent):
        assert ident({"name": "b", "kind": "folder", "path": str(path)}).shares_samples(x)
    sibling = image_folder.parent / "y"
    assert not ident({"name": "c", "kind": "folder", "path": str(sibling)}).shares_samples(x)


@pytest.mark.parametrize(
    ("val", "reported"),
    [
        ({"name": "mnist_val", "kind": "mnist"}, "mnist"),
        ({"name": "mnist_val", "kind": "mnist", "every": 4}, "mnist"),
        ("mnist", {"name": "mnist_copy", "kind": "mnist", "path": "{root}/MNIST/raw"}),
        ({**KMNIST_C, "name": "kmnist_noisy"}, "kmnist"),
    ],
)
def test_a_validation_set_that_reads_reported_samples_is_refused(
    shared_data: Path, val: Any, reported: Any
) -> None:
    def fill(entry: Any) -> Any:
        if isinstance(entry, dict) and "path" in entry:
            return {**entry, "path": entry["path"].format(root=shared_data)}
        return entry

    val, reported = fill(val), fill(reported)
    v = val if isinstance(val, str) else val["name"]
    r = reported if isinstance(reported, str) else reported["name"]
    with pytest.raises(
        ValueError,
        match=rf"val_ood_sets entry '{v}' .* and ood_sets entry '{r}' .* read the same samples",
    ):
        _dm(shared_data, ood_sets=[reported], val_ood_sets=[val])


def test_folder_validation_sets_are_compared_by_real_path(
    shared_data: Path, image_folder: Path
) -> None:
    reported = {"name": "mine", "kind": "folder", "path": str(image_folder)}
    for path in (image_folder.parent / "link", image_folder / ".." / "x"):
        val = {"name": "mine_val", "kind": "folder", "path": str(path)}
        with pytest.raises(ValueError, match=r"'mine_val' .* and ood_sets entry 'mine' .* same"):
            _dm(shared_data, ood_sets=[reported], val_ood_sets=[val])
    other = image_folder.parent / "y"
    other.mkdir()
    ok = _dm(
        shared_data,
        ood_sets=[reported, "mnist"],
        val_ood_sets=[{"name": "mine_val", "kind": "folder", "path": str(other)}, "kmnist"],
    )
    assert ok.val_ood_names == ["mine_val", "kmnist"]


def test_the_grid_refuses_a_spec_validation_set_that_is_a_reported_set(
    shared_data: Path,
) -> None:
    """The grid spec replaces the datamodule's validation sets: checked again, before any
    file is read."""
    dm = _dm(shared_data, ood_sets=["mnist"], test_every=500, ood_every=500)
    spec = {**GRID, "val_ood_sets": [{"name": "mnist_val", "kind": "mnist"}]}
    backbone = create_model("lenet", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match=r"'mnist_val' .* and ood_sets entry 'mnist' .* same"):
        run_spec(spec, backbone, dm, progress=False)
    assert dm._sets is None  # refused before setup: nothing was read


# -- item 14: Outlier Exposure ---------------------------------------------------------------
def test_an_outlier_set_under_another_name_path_or_corruption_is_refused(
    shared_data: Path, image_folder: Path
) -> None:
    root = shared_data
    oe = r"Outlier Exposure set the model is trained with"
    for reported in (
        {"name": "k2", "kind": "kmnist", "path": str(root / "KMNIST" / "raw")},
        KMNIST_C,
    ):
        with pytest.raises(ValueError, match=rf"ood_sets entry '{reported['name']}' .*{oe}"):
            _dm(root, outlier_set="kmnist", ood_sets=[reported])
    with pytest.raises(ValueError, match=r"val_ood_sets entry 'kv' .*reads samples of 'kmnist'"):
        _dm(root, outlier_set="kmnist", val_ood_sets=[{"name": "kv", "kind": "kmnist"}])
    aux = {"name": "aux", "kind": "folder", "path": str(image_folder)}
    for path in (image_folder.parent / "link", image_folder / ".." / "x"):
        other = {"name": "other", "kind": "folder", "path": str(path)}
        with pytest.raises(ValueError, match=rf"'other' .*reads samples of 'aux'.*{oe}"):
            _dm(root, outlier_set=aux, ood_sets=[other])
    ok = _dm(root, outlier_set="kmnist", ood_sets=["mnist"], val_ood_sets=[aux])
    assert ok.outlier_record()["samples"]["places"] == [
        ["default", "KMNIST/raw", ""],
        ["path", str(root / "KMNIST" / "raw"), ""],
    ]


@pytest.fixture(scope="module")
def oe_ckpt(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A LeNet trained two steps with KMNIST outliers (every 1000th FashionMNIST image)."""
    dm = _dm(shared_data, batch_size=16, train_every=1000, outlier_set="kmnist")
    return _fit_ckpt(tmp_path_factory.mktemp("oe") / "oe.ckpt", dm)


def test_a_checkpoint_refuses_its_outliers_under_another_name_or_as_tuning_data(
    shared_data: Path, oe_ckpt: Path, tmp_path: Path
) -> None:
    small = {"test_every": 500, "ood_every": 500}
    dotted = str(shared_data / "KMNIST" / ".." / "KMNIST" / "raw")
    refused = [
        {"ood_sets": [KMNIST_C]},  # a lightly corrupted copy
        {"ood_sets": ["mnist"], "val_ood_sets": [{"name": "kv", "kind": "kmnist"}]},
        {"ood_sets": [{"name": "k", "kind": "kmnist", "path": dotted}]},
    ]
    for sets in refused:
        task = _lenet()
        with pytest.raises(ValueError, match=r"Outlier Exposure on \['kmnist'\]: .*reads samples"):
            _trainer().test(task, datamodule=_dm(shared_data, **small, **sets), ckpt_path=oe_ckpt)
        assert task.steps == 0
    # A checkpoint written before identities were recorded (name, kind, path only) still
    # refuses the same samples under another name, resolved under today's data root.
    old = torch.load(oe_ckpt, weights_only=True)
    old["lightning_ood"]["outliers"] = [{"name": "kmnist", "kind": "kmnist", "path": None}]
    torch.save(old, tmp_path / "old.ckpt")
    renamed = _dm(shared_data, **small, ood_sets=[{"name": "k2", "kind": "kmnist"}])
    with pytest.raises(ValueError, match=r"'k2' .*reads samples of 'kmnist'"):
        _trainer().test(_lenet(), datamodule=renamed, ckpt_path=tmp_path / "old.ckpt")
    # and a set it never saw is tested as usual
    ok = _trainer().test(_lenet(), _dm(shared_data, **small, ood_sets=["mnist"]), ckpt_path=oe_ckpt)
    assert 0.0 <= ok[0]["test/acc"] <= 1.0


def test_the_grid_refuses_a_checkpoints_outliers(shared_data: Path, oe_ckpt: Path) -> None:
    dm = _dm(shared_data, ood_sets=[KMNIST_C], val_ood_sets=["mnist"], test_every=500)
    backbone = create_model("lenet", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match=rf"checkpoint {oe_ckpt} .*'kmnist_c' .*reads samples"):
        run_spec(GRID, backbone, dm, progress=False, info={"ckpt_path": str(oe_ckpt)})
    assert dm._sets is None  # refused before anything was read


# -- item 15: the training split -------------------------------------------------------------
def _held(n: int, size: int, seed: int) -> set[int]:
    """By hand: the first ``size`` of torch.randperm(n) seeded ``seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return set(perm[:size].tolist())


@pytest.fixture(scope="module")
def split_ckpts(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    """Two-step LeNets trained on every FashionMNIST training image but a hold-out: none
    (val_size 0) and 200 (val_seed 0)."""
    tmp = tmp_path_factory.mktemp("splits")
    return {
        name: _fit_ckpt(tmp / f"{name}.ckpt", _dm(shared_data, batch_size=16, val_size=size))
        for name, size in (("all", 0), ("held200", 200))
    }


def _test_dm(root: Path, **kw: Any) -> FashionMNISTDataModule:
    return _dm(root, test_every=500, **kw)


def test_the_checkpoint_records_its_training_split(split_ckpts: dict[str, Path]) -> None:
    record = torch.load(split_ckpts["held200"], weights_only=True)["lightning_ood"]
    assert record["train_splits"] == [
        {
            "id_set": "fashionmnist",
            "train_size": 60000,
            "val_size": 200,
            "val_seed": 0,
            "train_every": 1,
        }
    ]


def test_a_hold_out_with_trained_images_is_refused(
    shared_data: Path, split_ckpts: dict[str, Path]
) -> None:
    # val_seed 1 instead of 0: the held-out images the network trained on, counted by hand
    held1 = sorted(_held(60000, 200, 1))[::500]
    trained = set(range(60000)) - _held(60000, 200, 0)
    overlap = sum(i in trained for i in held1)
    assert overlap == len(held1) == 1  # test_every 500: one held-out image, trained on
    cases = [  # checkpoint, this run's split, the checkpoint's split, held-out images trained on
        ("held200", {"val_size": 200, "val_seed": 1}, (200, 0), overlap),
        ("all", {"val_size": 2000}, (0, 0), 4),  # test_every 500: 4 of 2000, all trained on
    ]
    for name, split, (size, seed), n in cases:
        dm = _test_dm(shared_data, **split)
        mine = f"val_size={split['val_size']}, val_seed={split.get('val_seed', 0)}"
        match = (
            rf"{split_ckpts[name]} was trained with data.init_args.val_size={size}, "
            rf"val_seed={seed} .*holds out {mine} .*: {n} of its {n} held-out images were "
            rf"trained on. Use the training split: --data.init_args.val_size {size} "
            rf"--data.init_args.val_seed {seed}"
        )
        task = _lenet()
        with pytest.raises(ValueError, match=match):
            _trainer().test(task, datamodule=dm, ckpt_path=split_ckpts[name])
        assert task.steps == 0
    # fine-tuning from those weights holds out the same trained images: refused at setup
    tuned = ClassificationTask(
        model="lenet", model_kwargs={"in_channels": 1, "weights": str(split_ckpts["all"])}
    )
    with pytest.raises(ValueError, match=r"val_size=0, val_seed=0 .*holds out val_size=2000"):
        _trainer(max_steps=1).fit(tuned, datamodule=_dm(shared_data, val_size=2000))


def test_the_training_split_or_a_part_of_its_hold_out_is_accepted(
    shared_data: Path, split_ckpts: dict[str, Path]
) -> None:
    for split in ({"val_size": 200}, {"val_size": 100}):  # the first 100 of the same 200
        dm = _test_dm(shared_data, **split)
        out = _trainer().test(_lenet(), datamodule=dm, ckpt_path=split_ckpts["held200"])
        assert 0.0 <= out[0]["test/acc"] <= 1.0
    # val_size 0 validates on the ID test split: no training image, nothing to check
    _trainer().test(_lenet(), datamodule=_test_dm(shared_data), ckpt_path=split_ckpts["all"])


def test_a_checkpoint_without_the_record_is_warned_about(
    shared_data: Path, split_ckpts: dict[str, Path], tmp_path: Path
) -> None:
    old = torch.load(split_ckpts["all"], weights_only=True)
    del old["lightning_ood"]["train_splits"]
    torch.save(old, tmp_path / "old.ckpt")
    dm = _test_dm(shared_data, val_size=2000)
    with pytest.warns(UserWarning, match=r"old.ckpt records no training split .*val_size=2000"):
        out = _trainer().test(_lenet(), datamodule=dm, ckpt_path=tmp_path / "old.ckpt")
    assert 0.0 <= out[0]["test/acc"] <= 1.0


def test_the_grid_refuses_a_hold_out_with_trained_images(
    shared_data: Path, split_ckpts: dict[str, Path]
) -> None:
    dm = _test_dm(shared_data, ood_sets=["mnist"], val_ood_sets=["kmnist"], val_size=2000)
    backbone = create_model("lenet", num_classes=10, in_channels=1)
    info = {"ckpt_path": str(split_ckpts["all"])}
    with (
        mock.patch("lightning_ood.grid.compute_features") as features,
        pytest.raises(ValueError, match=r"holds out val_size=2000, val_seed=0 .*4 of its 4"),
    ):
        run_spec(GRID, backbone, dm, progress=False, info=info)
    assert features.call_count == 0
