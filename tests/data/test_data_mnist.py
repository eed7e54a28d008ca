"""FashionMNIST / MNIST datamodules on the real idx files (small every-n subsets)."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torchvision import datasets as tvd
from torchvision.datasets.mnist import read_image_file, read_label_file

from lightning_ood.data import FashionMNISTDataModule, MNISTDataModule, train_eval_loader
from lightning_ood.io import DOWNLOAD_TIMEOUT_S


@pytest.fixture(scope="module")
def fmnist(shared_data: Path) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(
        root=str(shared_data),
        batch_size=16,
        eval_batch_size=100,
        num_workers=0,
        ood_sets=["mnist", "kmnist"],
        train_every=60,
        test_every=10,
        ood_every=10,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _raw(shared_data: Path, folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    raw = shared_data / folder / "raw"
    return (
        read_image_file(str(raw / f"{split}-images-idx3-ubyte")),
        read_label_file(str(raw / f"{split}-labels-idx1-ubyte")),
    )


def test_api_and_lengths(fmnist: FashionMNISTDataModule) -> None:
    assert fmnist.num_classes == 10
    assert fmnist.input_shape == (1, 28, 28)
    assert fmnist.id_name == "fashionmnist"
    assert fmnist.test_set_names == ["fashionmnist", "mnist", "kmnist"]
    assert fmnist.data_version == "FashionMNIST (original idx files)"
    loaders = fmnist.test_dataloader()
    assert [len(dl.dataset) for dl in loaders] == [1000, 1000, 1000]
    assert len(fmnist.train_dataloader().dataset) == 1000
    assert len(fmnist.train_eval_dataloader().dataset) == 1000
    assert len(fmnist.val_dataloader().dataset) == 1000  # the ID test set (val_size=0)
    assert len(fmnist.predict_dataloader().dataset) == 1000
    assert fmnist.train_dataloader().batch_size == 16
    assert fmnist.train_eval_dataloader().batch_size == 100
    assert fmnist.val_ood_dataloaders() == {}


def test_normalised_values_and_labels(fmnist: FashionMNISTDataModule, shared_data: Path) -> None:
    images, labels = _raw(shared_data, "FashionMNIST", "t10k")
    x, y = next(iter(fmnist.test_dataloader()[0]))
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    expected = (images[::10][:100].float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[:, 0], expected, rtol=0, atol=1e-6)
    assert torch.equal(y, labels[::10][:100])
    all_y = torch.cat([b[1] for b in fmnist.test_dataloader()[0]])
    assert all_y.min() == 0 and all_y.max() == 9
    # The fit pass reads training images 0, 60, 120, ... in order with the eval transform.
    train_images, train_labels = _raw(shared_data, "FashionMNIST", "train")
    fx, fy = next(iter(fmnist.train_eval_dataloader()))
    torch.testing.assert_close(
        fx[:, 0], (train_images[::60][:100].float() / 255 - 0.2860) / 0.3530, rtol=0, atol=1e-6
    )
    assert torch.equal(fy, train_labels[::60][:100])


def test_ood_sets_use_id_normalisation(fmnist: FashionMNISTDataModule, shared_data: Path) -> None:
    loaders = fmnist.test_dataloader()
    for loader, folder in zip(loaders[1:], ["MNIST", "KMNIST"], strict=True):
        images, _ = _raw(shared_data, folder, "t10k")
        x, y = next(iter(loader))
        assert torch.all(y == -1)
        expected = (images[::10][:100].float() / 255 - 0.2860) / 0.3530
        torch.testing.assert_close(x[:, 0], expected, rtol=0, atol=1e-6)


def test_fit_is_deterministic_and_train_is_a_shuffle(fmnist: FashionMNISTDataModule) -> None:
    first = torch.cat([b[0] for b in fmnist.train_eval_dataloader()])
    second = torch.cat([b[0] for b in fmnist.train_eval_dataloader()])
    assert torch.equal(first, second)
    fit_y = torch.cat([b[1] for b in fmnist.train_eval_dataloader()])
    torch.manual_seed(0)
    train_y = torch.cat([b[1] for b in fmnist.train_dataloader()])
    # No augmentation for the LeNet recipe: same samples, shuffled order.
    assert torch.equal(train_y.sort().values, fit_y.sort().values)
    assert not torch.equal(train_y, fit_y)
    train_x = torch.cat([b[0] for b in fmnist.train_dataloader()])
    assert torch.allclose(train_x.sum(), first.sum(), rtol=1e-5)


def test_mnist_datamodule_constants(shared_data: Path) -> None:
    dm = MNISTDataModule(root=str(shared_data), batch_size=4, num_workers=0, test_every=2500)
    dm.setup("test")
    assert dm.test_set_names == ["mnist"]
    images, labels = _raw(shared_data, "MNIST", "t10k")
    x, y = next(iter(dm.test_dataloader()[0]))
    assert len(dm.test_dataloader()[0].dataset) == 4
    torch.testing.assert_close(
        x[:, 0], (images[::2500].float() / 255 - 0.1307) / 0.3081, rtol=0, atol=1e-6
    )
    assert torch.equal(y, labels[::2500])


def test_val_size_holds_out_training_samples(shared_data: Path) -> None:
    def build(seed: int) -> FashionMNISTDataModule:
        dm = FashionMNISTDataModule(
            root=str(shared_data), batch_size=8, num_workers=0, val_size=100, val_seed=seed
        )
        dm.setup("fit")
        return dm

    a, b, c = build(0), build(0), build(1)
    train_idx = a.train_eval_dataloader().dataset.dataset.indices
    val_idx = a.val_dataloader().dataset.dataset.indices
    assert len(train_idx) == 59_900 and len(val_idx) == 100
    assert not set(train_idx) & set(val_idx)
    assert sorted([*train_idx, *val_idx]) == list(range(60_000))
    assert val_idx == b.val_dataloader().dataset.dataset.indices
    assert val_idx != c.val_dataloader().dataset.dataset.indices
    _, train_labels = _raw(shared_data, "FashionMNIST", "train")
    _, y = next(iter(a.val_dataloader()))
    assert torch.equal(y, train_labels[val_idx[:8]])


def test_val_split_is_the_seeded_permutation() -> None:
    """The hold-out is the first val_size entries of randperm(n) seeded val_seed (sorted)."""
    dm = FashionMNISTDataModule(num_workers=0, val_size=7, val_seed=5)
    train_idx, val_idx = dm._split(50)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(5)).tolist()
    assert val_idx == sorted(perm[:7]) and train_idx == sorted(perm[7:])
    assert FashionMNISTDataModule(num_workers=0)._split(4) == ([0, 1, 2, 3], [])
    with pytest.raises(ValueError, match=r"val_size=4 leaves no training samples out of 4"):
        FashionMNISTDataModule(num_workers=0, val_size=4)._split(4)


# -- errors ------------------------------------------------------------------------------------
def test_missing_root(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(root=str(tmp_path / "absent"), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"data root .*absent does not exist"):
        dm.setup()


def test_missing_files_named(tmp_path: Path, shared_data: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(
        (shared_data / "FashionMNIST/raw/t10k-images-idx3-ubyte").read_bytes()[:16]
    )
    dm = FashionMNISTDataModule(root=str(tmp_path), num_workers=0)
    dm.prepare_data()  # explicit root: no download attempted, nothing happens
    with pytest.raises(FileNotFoundError) as exc:
        dm.setup()
    msg = str(exc.value)
    assert f"FashionMNIST not found under {raw}" in msg
    assert "train-images-idx3-ubyte" in msg and "download: true" in msg
    assert "missing: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-labels" in msg


def test_failed_download_is_clear_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeouts: list[float | None] = []

    def offline(self: tvd.MNIST) -> None:
        timeouts.append(socket.getdefaulttimeout())
        raise URLError("no network")

    monkeypatch.setattr(tvd.FashionMNIST, "download", offline)
    dm = FashionMNISTDataModule(root=str(tmp_path), download=True, num_workers=0)
    with pytest.raises(RuntimeError, match=r"could not download FashionMNIST into") as exc:
        dm.prepare_data()
    assert str(tmp_path) in str(exc.value)
    assert timeouts == [DOWNLOAD_TIMEOUT_S]


def test_no_download_unless_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: tvd.MNIST) -> None:
        raise AssertionError("download must not be attempted")

    monkeypatch.setattr(tvd.FashionMNIST, "download", fail)
    FashionMNISTDataModule(root=str(tmp_path), num_workers=0).prepare_data()
    FashionMNISTDataModule(root=str(tmp_path), download=False, num_workers=0).prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_ood_download_failure_names_the_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_data: Path
) -> None:
    # ID data present (copied), KMNIST missing and its download failing.
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (shared_data / "FashionMNIST" / "raw").iterdir():
        (raw / f.name).symlink_to(f)

    def offline(self: tvd.MNIST) -> None:
        raise URLError("no network")

    monkeypatch.setattr(tvd.KMNIST, "download", offline)
    dm = FashionMNISTDataModule(
        root=str(tmp_path), download=True, num_workers=0, ood_sets=["kmnist"]
    )
    with pytest.raises(RuntimeError, match=r"could not download OOD set 'kmnist' into"):
        dm.prepare_data()
    dm = FashionMNISTDataModule(root=str(tmp_path), num_workers=0, ood_sets=["kmnist"])
    with pytest.raises(FileNotFoundError, match=r"OOD set 'kmnist' not found: .*KMNIST/raw"):
        dm.setup()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="train_every must be >= 1"):
        FashionMNISTDataModule(train_every=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        FashionMNISTDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"contains 'fashionmnist', the in-distribution set"):
        FashionMNISTDataModule(ood_sets=["fashionmnist"])
    with pytest.raises(ValueError, match=r"names must be unique; repeated: \['mnist'\]"):
        FashionMNISTDataModule(ood_sets=["mnist", {"name": "mnist", "kind": "kmnist"}])
    with pytest.raises(ValueError, match=r"unknown OOD set 'mnsit'"):
        FashionMNISTDataModule(ood_sets=["mnsit"])
    with pytest.raises(ValueError, match=r"both reported .* and used for tuning"):
        FashionMNISTDataModule(ood_sets=["mnist"], val_ood_sets=["mnist"])
    dm = FashionMNISTDataModule(ood_sets=["mnist"], val_ood_sets=["kmnist"], batch_size=7)
    assert dm.val_ood_names == ["kmnist"] and dm.eval_batch_size == 7
    assert np.array_equal(dm.test_set_names, ["fashionmnist", "mnist"])


def test_fit_dataloader_is_a_deprecated_alias(fmnist: FashionMNISTDataModule) -> None:
    """``fit_dataloader`` (the old name: not Lightning's fit loader) still gives the same
    batches, with a DeprecationWarning; so does a user datamodule that only defines it."""
    want = torch.cat([b[0] for b in fmnist.train_eval_dataloader()])
    with pytest.warns(DeprecationWarning, match="call train_eval_dataloader"):
        old = fmnist.fit_dataloader()
    assert torch.equal(torch.cat([b[0] for b in old]), want)
    assert torch.equal(torch.cat([b[0] for b in train_eval_loader(fmnist)]), want)

    class OldStyle:
        def fit_dataloader(self) -> list[int]:
            return [1, 2]

    with pytest.warns(DeprecationWarning, match="OldStyle.fit_dataloader"):
        assert train_eval_loader(OldStyle()) == [1, 2]
    assert train_eval_loader(object()) is None

    class OldSubclass(FashionMNISTDataModule):  # overrides the old name: its override is read
        def fit_dataloader(self) -> list[int]:  # type: ignore[override]
            return [3]

    with pytest.warns(DeprecationWarning, match="OldSubclass.fit_dataloader"):
        assert train_eval_loader(OldSubclass(root=str(fmnist.root))) == [3]

    class BothNames(OldStyle):  # a class that defines the new name too is read by it
        def train_eval_dataloader(self) -> list[int]:
            return [4]

    assert train_eval_loader(BothNames()) == [4]
