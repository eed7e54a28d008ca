"""Named OOD sets: registry, adaptation to the ID model input, folders, SVHN, TinyImageNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torchvision.datasets.mnist import read_image_file

from lightning_ood.data import OOD_SETS, FashionMNISTDataModule, build_ood_dataset
from lightning_ood.data.ood_sets import parse_ood_spec
from lightning_ood.data.readers import first_per_class
from lightning_ood.data.transforms import (
    CIFAR10_MEAN,
    CIFAR_REFERENCE_STD,
    FASHIONMNIST_MEAN,
    FASHIONMNIST_STD,
)

CIFAR_NORM = (CIFAR10_MEAN, CIFAR_REFERENCE_STD)
FMNIST_NORM = (FASHIONMNIST_MEAN, FASHIONMNIST_STD)
MEAN3 = np.array(CIFAR10_MEAN, np.float32)
STD3 = np.array(CIFAR_REFERENCE_STD, np.float32)


def _norm3(arr_hwc: np.ndarray) -> torch.Tensor:
    x = (arr_hwc.astype(np.float32) / 255 - MEAN3) / STD3
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def _norm1(arr_hw: np.ndarray) -> torch.Tensor:
    x = (arr_hw.astype(np.float32) / 255 - FASHIONMNIST_MEAN[0]) / FASHIONMNIST_STD[0]
    return torch.from_numpy(x)[None]


def test_registry_names() -> None:
    expected = {
        "mnist",
        "fashionmnist",
        "kmnist",
        "svhn",
        "svhn_1k",
        "lsun_crop",
        "lsun_resize",
        "isun",
        "textures",
        "places365",
        "tinyimagenet_crop",
        "tinyimagenet_resize",
        "cifar10",
        "cifar100",
        "folder",
        "genome_ood",
    }
    assert expected <= set(OOD_SETS)
    assert OOD_SETS["textures"].subpath == "dtd/images"
    assert OOD_SETS["lsun_crop"].subpath == "LSUN"
    assert OOD_SETS["lsun_resize"].subpath == "LSUN_resize"
    assert OOD_SETS["isun"].subpath == "iSUN"
    assert OOD_SETS["places365"].subpath == "places365"


def test_mnist_into_cifar_model(shared_data: Path) -> None:
    ds = build_ood_dataset("mnist", shared_data, (3, 32, 32), CIFAR_NORM, every=1000)
    assert len(ds) == 10
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and y == -1
    raw = read_image_file(str(shared_data / "MNIST/raw/t10k-images-idx3-ubyte"))[1000].numpy()
    # Replicate to RGB, then the reference Resize(32) (PIL bilinear) + CenterCrop(32).
    up = np.asarray(Image.fromarray(raw).convert("RGB").resize((32, 32), Image.BILINEAR))
    assert np.array_equal(up[..., 0], up[..., 2])
    torch.testing.assert_close(x, _norm3(up), rtol=0, atol=1e-5)


def test_cifar_jpeg_into_fashionmnist_model(shared_data: Path) -> None:
    ds = build_ood_dataset("cifar10", shared_data, (1, 28, 28), FMNIST_NORM, every=1000)
    assert len(ds) == 10
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and y == -1
    path = shared_data / "cifar10-jpeg-q75/test/cat/0000.jpg"  # sample 3000 = class 3, first
    luma = Image.open(path).convert("RGB").convert("L")  # ITU-R 601-2 luma, as v2.Grayscale
    small = np.asarray(luma.resize((28, 28), Image.BILINEAR))
    torch.testing.assert_close(x, _norm1(small), rtol=0, atol=1e-5)


def test_kmnist_test_split_only(shared_data: Path) -> None:
    ds = build_ood_dataset("kmnist", shared_data, (1, 28, 28), FMNIST_NORM, every=100)
    assert len(ds) == 100
    raw = read_image_file(str(shared_data / "KMNIST/raw/t10k-images-idx3-ubyte"))
    assert raw.shape == (10_000, 28, 28)
    x, y = ds[7]
    torch.testing.assert_close(x, _norm1(raw[700].numpy()), rtol=0, atol=1e-5)
    assert y == -1


# -- folders ------------------------------------------------------------------------------------
def _write_images(folder: Path, names: list[str], size: tuple[int, int] = (32, 32)) -> None:
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color=(10 * i, 200 - 10 * i, 7)).save(path)


def test_folder_sets_sorted_recursive(tmp_path: Path) -> None:
    # Written out of order, nested like ImageFolder's class folders; one non-image file.
    names = ["test/b.png", "test/a.png", "a_class/z.jpg", "a_class/sub/c.png", "test/c.PNG"]
    _write_images(tmp_path / "LSUN", names)
    (tmp_path / "LSUN" / "test" / "notes.txt").write_text("not an image")
    ds = build_ood_dataset("lsun_crop", tmp_path, (3, 32, 32), CIFAR_NORM)
    assert len(ds) == 5
    order = ["a_class/sub/c.png", "a_class/z.jpg", "test/a.png", "test/b.png", "test/c.PNG"]
    for k, name in enumerate(order):
        x, y = ds[k]
        i = names.index(name)
        arr = np.asarray(Image.open(tmp_path / "LSUN" / name).convert("RGB"))
        assert tuple(arr[0, 0]) in {(10 * i, 200 - 10 * i, 7)} or name.endswith(".jpg")
        torch.testing.assert_close(x, _norm3(arr), rtol=0, atol=1e-5)
        assert y == -1


@pytest.mark.parametrize(
    "name", ["lsun_crop", "lsun_resize", "isun", "textures", "places365", "tinyimagenet_resize"]
)
def test_folder_default_locations(tmp_path: Path, name: str) -> None:
    _write_images(tmp_path / OOD_SETS[name].subpath / "x", ["0.png", "1.png", "2.png"])
    ds = build_ood_dataset(name, tmp_path, (3, 32, 32), CIFAR_NORM, every=2)
    assert len(ds) == 2


def test_textures_resized_like_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)  # H=50, W=70
    (tmp_path / "tex" / "banded").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "tex" / "banded" / "t.png")
    ds = build_ood_dataset(
        {"name": "textures", "path": str(tmp_path / "tex")}, "/nonexistent", (3, 32, 32), CIFAR_NORM
    )
    x, _ = ds[0]
    # Resize(32): shorter side to 32, longer int(32 * 70 / 50) = 44 (PIL bilinear), then
    # CenterCrop(32) starts at round((44 - 32) / 2) = 6.
    resized = np.asarray(Image.fromarray(arr).resize((44, 32), Image.BILINEAR))
    left = 6
    torch.testing.assert_close(x, _norm3(resized[:, left : left + 32]), rtol=0, atol=1e-5)


def test_generic_folder_kind_and_path_override(tmp_path: Path) -> None:
    _write_images(tmp_path / "mine", ["a.png", "b.png", "c.png", "d.png"])
    spec = {"name": "my_textures", "kind": "folder", "path": str(tmp_path / "mine"), "every": 3}
    ds = build_ood_dataset(spec, tmp_path / "unused", (3, 32, 32), CIFAR_NORM)
    assert len(ds) == 2  # files 0 and 3
    x, y = ds[1]
    expected = np.asarray(Image.open(tmp_path / "mine" / "d.png"))
    torch.testing.assert_close(x, _norm3(expected), rtol=0, atol=1e-5)
    assert y == -1
    with pytest.raises(ValueError, match=r"'my' of kind 'folder' needs a 'path'"):
        parse_ood_spec({"name": "my", "kind": "folder"})


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "iSUN").mkdir()
    with pytest.raises(ValueError, match=r"OOD set 'isun' at .*iSUN holds no samples"):
        build_ood_dataset("isun", tmp_path, (3, 32, 32), CIFAR_NORM)
    with pytest.raises(FileNotFoundError) as exc:
        build_ood_dataset("lsun_resize", tmp_path, (3, 32, 32), CIFAR_NORM)
    msg = str(exc.value)
    assert f"{tmp_path / 'LSUN_resize'} does not exist" in msg
    assert "{name: lsun_resize, path: /your/path}" in msg


def test_bad_specs() -> None:
    with pytest.raises(ValueError, match=r"unknown OOD set 'lsun'.*known: \["):
        parse_ood_spec("lsun")
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        parse_ood_spec({"name": "isun", "colour": "red"})
    with pytest.raises(ValueError, match="needs a 'name'"):
        parse_ood_spec({"kind": "isun"})
    with pytest.raises(ValueError, match="'every' must be an integer >= 1"):
        parse_ood_spec({"name": "isun", "every": 0})
    with pytest.raises(ValueError, match=r"holds images but the model's input_shape is \(250,\)"):
        build_ood_dataset("mnist", "/x", (250,), None)
    with pytest.raises(ValueError, match="holds token sequences"):
        build_ood_dataset("genome_ood", "/x", (3, 32, 32), CIFAR_NORM)


# -- Tiny-ImageNet crop / resize ------------------------------------------------------------------
def test_tinyimagenet_crop_fixed_offsets(shared_data: Path) -> None:
    full = build_ood_dataset("tinyimagenet_crop", shared_data, (3, 32, 32), CIFAR_NORM)
    sub = build_ood_dataset("tinyimagenet_crop", shared_data, (3, 32, 32), CIFAR_NORM, every=1000)
    again = build_ood_dataset("tinyimagenet_crop", shared_data, (3, 32, 32), CIFAR_NORM, every=1000)
    assert len(full) == 10_000 and len(sub) == 10
    crops = full.dataset  # the FixedCrops reader behind the transform
    offsets = crops.offsets
    assert offsets.shape == (10_000, 2) and offsets.min() >= 0 and offsets.max() <= 32
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(offsets, torch.randint(0, 33, (10_000, 2), generator=gen))
    files = crops.files
    assert files == sorted(files, key=lambda p: p.name) and files[0].name == "test_0.JPEG"
    for k in (0, 4):
        x, y = sub[k]
        assert torch.equal(x, again[k][0]) and torch.equal(x, full[1000 * k][0]) and y == -1
        top, left = offsets[1000 * k].tolist()
        arr = np.asarray(Image.open(files[1000 * k]).convert("RGB"))
        torch.testing.assert_close(
            x, _norm3(arr[top : top + 32, left : left + 32]), rtol=0, atol=1e-5
        )


def test_tinyimagenet_resize_downscales(shared_data: Path) -> None:
    ds = build_ood_dataset("tinyimagenet_resize", shared_data, (3, 32, 32), CIFAR_NORM, every=5000)
    assert len(ds) == 2
    x, _ = ds[1]
    path = sorted((shared_data / "tiny-imagenet-200/test/images").iterdir())[5000]
    small = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR))
    torch.testing.assert_close(x, _norm3(small), rtol=0, atol=1e-5)


# -- SVHN (synthetic .mat in the published format) ---------------------------------------------
def _write_svhn(root: Path, labels: list[int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(32, 32, 3, len(labels)), dtype=np.uint8)
    (root / "svhn").mkdir(parents=True)
    savemat(root / "svhn" / "test_32x32.mat", {"X": x, "y": np.array(labels, np.uint8)[:, None]})
    return x


def test_svhn_reader(tmp_path: Path) -> None:
    labels = [10, 1, 2, 10, 9, 3]
    x = _write_svhn(tmp_path, labels)
    ds = build_ood_dataset("svhn", tmp_path, (3, 32, 32), CIFAR_NORM)
    assert len(ds) == 6
    assert ds.dataset.labels.tolist() == [0, 1, 2, 0, 9, 3]  # label 10 is digit 0
    img, y = ds[3]
    torch.testing.assert_close(img, _norm3(x[..., 3]), rtol=0, atol=1e-5)
    assert y == -1


def test_svhn_1k_first_per_class(tmp_path: Path) -> None:
    labels = [1, 10, 1, 2, 1, 10, 10, 2, 3]
    x = _write_svhn(tmp_path, labels)
    spec = {"name": "svhn_small", "kind": "svhn_1k", "per_class": 2}
    ds = build_ood_dataset(spec, tmp_path, (3, 32, 32), CIFAR_NORM)
    # First two of each digit in file order: 1@0, 0@1, 1@2, 2@3, 0@5, 2@7, 3@8.
    assert ds.dataset.indices == [0, 1, 2, 3, 5, 7, 8]
    torch.testing.assert_close(ds[4][0], _norm3(x[..., 5]), rtol=0, atol=1e-5)
    assert first_per_class(np.array([3, 3, 3, 1]), 1000).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="holds no samples"):
        build_ood_dataset({**spec, "per_class": 0}, tmp_path, (3, 32, 32), CIFAR_NORM)


def test_svhn_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"svhn/test_32x32.mat does not exist.*download"):
        build_ood_dataset("svhn_1k", tmp_path, (3, 32, 32), CIFAR_NORM)


def test_bad_mat_file(tmp_path: Path) -> None:
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"images": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"not an SVHN .mat file.*found \['images'\]"):
        build_ood_dataset("svhn", tmp_path, (3, 32, 32), CIFAR_NORM)


# -- through the datamodule ---------------------------------------------------------------------
def test_datamodule_val_ood_sets(shared_data: Path, tmp_path: Path) -> None:
    _write_images(tmp_path / "tex", ["a.png", "b.png"])
    dm = FashionMNISTDataModule(
        root=str(shared_data),
        num_workers=0,
        eval_batch_size=10,
        test_every=1000,
        ood_sets=["mnist", {"name": "tin", "kind": "tinyimagenet_crop", "every": 2000}],
        val_ood_sets=[
            "kmnist",
            {"name": "tex", "kind": "folder", "path": str(tmp_path / "tex"), "every": 1},
        ],
        ood_every=1000,
    )
    dm.setup("test")
    assert dm.test_set_names == ["fashionmnist", "mnist", "tin"]
    assert dm.val_ood_names == ["kmnist", "tex"]
    assert [len(dl.dataset) for dl in dm.test_dataloader()] == [10, 10, 5]
    val = dm.val_ood_dataloaders()
    assert list(val) == ["kmnist", "tex"]
    x, y = next(iter(val["tex"]))
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [-1, -1]
    x, y = next(iter(dm.test_dataloader()[2]))
    assert x.shape == (5, 1, 28, 28) and torch.all(y == -1)
