"""CIFAR datamodules: the JPEG-q75 copy (real data), original-pickle reader on small pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tvd

from lightning_ood.data import CIFAR10DataModule, CIFAR100DataModule
from lightning_ood.data.readers import CIFAR10_CLASSES
from lightning_ood.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_TRUE_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_REFERENCE_STD,
)

REF_MEAN = np.array(CIFAR10_MEAN, dtype=np.float32)
REF_STD = np.array(CIFAR_REFERENCE_STD, dtype=np.float32)


@pytest.fixture(scope="module")
def cifar(shared_data: Path) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(
        root=str(shared_data),
        batch_size=25,
        eval_batch_size=50,
        num_workers=0,
        train_every=500,
        test_every=100,
        ood_sets=["tinyimagenet_resize"],
        ood_every=1000,
    )
    dm.setup("fit")
    return dm


def _manual(path: Path, mean: np.ndarray = REF_MEAN, std: np.ndarray = REF_STD) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())


def test_jpeg_copy_is_read_and_named(cifar: CIFAR10DataModule, shared_data: Path) -> None:
    assert cifar.data_version == "CIFAR-10 JPEG copy (cifar10-jpeg-q75, lossy re-encoding)"
    assert (cifar.num_classes, cifar.input_shape) == (10, (3, 32, 32))
    assert cifar.test_set_names == ["cifar10", "tinyimagenet_resize"]
    # ImageFolder's alphabetical class order is exactly the CIFAR-10 label order.
    folder = tvd.ImageFolder(str(shared_data / "cifar10-jpeg-q75" / "test"))
    assert folder.class_to_idx == {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    loaders = cifar.test_dataloader()
    assert [len(dl.dataset) for dl in loaders] == [100, 10]
    labels = torch.cat([b[1] for b in loaders[0]])
    assert labels.tolist() == [i // 10 for i in range(100)]  # 1,000 per class, every 100th
    assert len(cifar.train_dataloader().dataset) == 100
    train_y = torch.cat([b[1] for b in cifar.train_eval_dataloader()])
    assert train_y.tolist() == [i // 10 for i in range(100)]


def test_eval_values_match_manual(cifar: CIFAR10DataModule, shared_data: Path) -> None:
    x, y = next(iter(cifar.test_dataloader()[0]))
    assert x.shape == (50, 3, 32, 32) and y[0] == 0
    first = shared_data / "cifar10-jpeg-q75" / "test" / "airplane" / "0000.jpg"
    torch.testing.assert_close(x[0], _manual(first), rtol=0, atol=1e-5)
    # Third test sample of the every-100 subset: file index 200 of the sorted airplane folder.
    third = sorted((shared_data / "cifar10-jpeg-q75" / "test" / "airplane").iterdir())[200]
    torch.testing.assert_close(x[2], _manual(third), rtol=0, atol=1e-5)


def test_true_std_option(shared_data: Path) -> None:
    dm = CIFAR10DataModule(
        root=str(shared_data), normalization="true_std", num_workers=0, test_every=1000
    )
    dm.setup("test")
    x, _ = dm.test_dataloader()[0].dataset[0]
    first = shared_data / "cifar10-jpeg-q75" / "test" / "airplane" / "0000.jpg"
    torch.testing.assert_close(
        x, _manual(first, std=np.array(CIFAR10_TRUE_STD, np.float32)), rtol=0, atol=1e-5
    )
    # CIFAR-100 uses the reference CIFAR-10 constants, as the DICE/LINe code does.
    assert CIFAR100_MEAN == CIFAR10_MEAN and CIFAR100_STD == CIFAR_REFERENCE_STD
    assert CIFAR100DataModule(num_workers=0).normalization == (CIFAR10_MEAN, CIFAR_REFERENCE_STD)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(REF_STD).view(3, 1, 1) + torch.tensor(REF_MEAN).view(3, 1, 1)


def _is_crop_flip_of(aug: torch.Tensor, clean: torch.Tensor) -> bool:
    """Whether ``aug`` is a 32x32 window of ``clean`` zero-padded by 4, maybe flipped."""
    padded = torch.nn.functional.pad(_unnormalize(clean), (4, 4, 4, 4))
    a = _unnormalize(aug)
    for top in range(9):
        for left in range(9):
            win = padded[:, top : top + 32, left : left + 32]
            if torch.allclose(win, a, atol=1e-5) or torch.allclose(win.flip(-1), a, atol=1e-5):
                return True
    return False


def test_train_augments_fit_does_not(cifar: CIFAR10DataModule) -> None:
    fit_ds = cifar.train_eval_dataloader().dataset
    train_ds = cifar.train_dataloader().dataset
    clean = fit_ds[3][0]
    assert torch.equal(clean, fit_ds[3][0])
    torch.manual_seed(0)
    views = [train_ds[3][0] for _ in range(6)]
    assert all(_is_crop_flip_of(v, clean) for v in views)
    assert sum(not torch.allclose(v, clean) for v in views) >= 4
    a = torch.cat([b[0] for b in cifar.train_eval_dataloader()])
    b = torch.cat([b[0] for b in cifar.train_eval_dataloader()])
    assert torch.equal(a, b)
    assert cifar.train_dataloader().batch_size == 25


# -- original pickles (small synthetic ones in torchvision's layout) ----------------------------
def _write_pickles(root: Path, variant: str) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(0)
    if variant == "cifar10":
        folder, files, key, k = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "labels",
            10,
        )
        files = [*files, "test_batch"]
    else:
        folder, files, key, k = "cifar-100-python", ["train", "test"], "fine_labels", 100
    out = {}
    (root / folder).mkdir(parents=True)
    for i, name in enumerate(files):
        n = 2 + i
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, k, size=n)]
        with open(root / folder / name, "wb") as f:
            pickle.dump({"data": data, key: labels, "batch_label": name}, f)
        out[name] = (data, labels)
    return out


def test_pickle_source_cifar10(tmp_path: Path) -> None:
    written = _write_pickles(tmp_path, "cifar10")
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0, batch_size=4, eval_batch_size=64)
    dm.setup("fit")
    assert dm.data_version == "CIFAR-10 original (python pickles)"
    x, y = next(iter(dm.test_dataloader()[0]))
    data, labels = written["test_batch"]
    assert y.tolist() == labels
    hwc = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255
    expected = torch.from_numpy(((hwc - REF_MEAN) / REF_STD).transpose(0, 3, 1, 2).copy())
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    fit_y = torch.cat([b[1] for b in dm.train_eval_dataloader()])
    expected_y = [v for i in range(1, 6) for v in written[f"data_batch_{i}"][1]]
    assert fit_y.tolist() == expected_y


def test_pickle_source_cifar100(tmp_path: Path) -> None:
    written = _write_pickles(tmp_path, "cifar100")
    dm = CIFAR100DataModule(root=str(tmp_path), num_workers=0, eval_batch_size=64)
    dm.setup("test")
    assert dm.num_classes == 100 and dm.id_name == "cifar100"
    assert dm.data_version == "CIFAR-100 original (python pickles)"
    assert torch.cat([b[1] for b in dm.test_dataloader()[0]]).tolist() == written["test"][1]


def test_source_jpeg_forced_and_missing(tmp_path: Path) -> None:
    _write_pickles(tmp_path, "cifar10")
    dm = CIFAR10DataModule(root=str(tmp_path), source="jpeg", num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"JPEG copy incomplete: .*cifar10-jpeg-q75/train"):
        dm.setup()


def test_nothing_found(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(FileNotFoundError) as exc:
        dm.setup()
    msg = str(exc.value)
    assert f"CIFAR-10 not found under {tmp_path}" in msg
    assert "cifar-10-batches-py/" in msg and "cifar10-jpeg-q75/{train,test}/<class>/*.jpg" in msg
    assert "download: true" in msg


def test_incomplete_pickles(tmp_path: Path) -> None:
    _write_pickles(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"pickles incomplete .* missing data_batch_3"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup()


def test_wrong_class_folders(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for name in ("cat", "airplane"):
            d = tmp_path / "cifar10-jpeg-q75" / split / name
            d.mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(d / "0.png")
    with pytest.raises(ValueError, match="expected the CIFAR-10 classes"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup()


def test_bad_source_argument() -> None:
    with pytest.raises(ValueError, match="source must be"):
        CIFAR10DataModule(source="png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalization must be"):
        CIFAR10DataModule(normalization="imagenet")  # type: ignore[arg-type]
