"""A data file that exists but cannot be read fails with an error that names it.

Truncated idx files are caught from their headers before they are read; undecodable images
when they are decoded (or up front, and left out with a warning, under ``skip_corrupt``);
image formats a folder set does not read are listed, never silently dropped.
"""

from __future__ import annotations

import gzip
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torch.utils.data import DataLoader

from lightning_ood.data import (
    CorruptDataError,
    FashionMNISTDataModule,
    build_ood_dataset,
    parse_ood_spec,
)

CIFAR_NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
T10K = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _cut_jpeg(path: Path) -> None:
    """Drop a JPEG's last 100 bytes: its end marker and the end of the scan data, as an
    interrupted copy does (cutting into the ~600-byte header fails differently)."""
    _truncate(path, path.stat().st_size - 100)


def _fmnist_copy(tmp_path: Path, shared_data: Path) -> Path:
    """``tmp_path/FashionMNIST/raw`` with copied test files and linked (unchanged) train files."""
    src = shared_data / "FashionMNIST" / "raw"
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in T10K:
        shutil.copyfile(src / name, raw / name)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).symlink_to(src / name)
    return raw


def _write_jpegs(folder: Path, n: int, size: int = 32) -> list[Path]:
    """``n`` noise JPEGs (noise, so that half a file cuts into the scan data)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _mine(folder: Path, **options: object) -> dict:
    return {"name": "mine", "kind": "folder", "path": str(folder), **options}


# -- idx files: the header against the size, before reading ------------------------------------
def test_truncated_idx_ood_set_names_the_file(tmp_path: Path, shared_data: Path) -> None:
    raw = _fmnist_copy(tmp_path, shared_data)
    images = raw / T10K[0]
    _truncate(images, 3_919_992 + 16)  # the case: half of the 10,000 images
    spec = {"name": "fm", "kind": "fashionmnist", "path": str(raw)}
    with pytest.raises(CorruptDataError) as exc:
        build_ood_dataset(spec, tmp_path, (1, 28, 28), ((0.5,), (0.5,)))
    msg = str(exc.value)
    assert str(images) in msg
    assert "10000 x 28 x 28 (7840016 bytes), the file holds 3920008 bytes" in msg
    assert "copy it again" in msg
    assert exc.value.path == images


def test_truncated_idx_id_datamodule_names_the_file(tmp_path: Path, shared_data: Path) -> None:
    raw = _fmnist_copy(tmp_path, shared_data)
    labels = raw / T10K[1]
    _truncate(labels, 5_000)
    with pytest.raises(CorruptDataError) as exc:
        FashionMNISTDataModule(root=str(tmp_path), download=False).setup()
    msg = str(exc.value)
    assert msg.startswith(f"reading FashionMNIST under {tmp_path} failed: {labels} is truncated")
    assert "10000 (10008 bytes), the file holds 5000 bytes" in msg
    assert exc.value.path == labels


def test_idx_header_problems(tmp_path: Path, shared_data: Path) -> None:
    from lightning_ood.data.readers import check_idx_file, check_idx_pair

    src = shared_data / "FashionMNIST" / "raw" / T10K[1]
    data = src.read_bytes()
    cases = {
        "long": (data + b"\0\0\0", 1, r"holds 10011 bytes"),
        "gz": (gzip.compress(data), 1, r"is gzip-compressed; decompress it"),
        "html": (b"<html>404</html>", 1, r"is not an idx file \(it starts with 3c68746d"),
        "empty": (b"", 1, r"is not an idx file \(it starts with nothing"),
        "header": (data[:6], 1, r"is truncated inside its idx header"),
        "swapped": (data, 3, r"holds a 1-d idx array, expected 3-d"),
    }
    for name, (content, ndim, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CorruptDataError, match=re.escape(str(path)) + ".*" + pattern):
            check_idx_file(path, ndim)
    assert check_idx_file(src, 1) == (10000,)
    images = shared_data / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    with pytest.raises(CorruptDataError, match=r"60000 images but .*t10k-labels.* 10000 labels"):
        check_idx_pair(images, src)


# -- image folders: decode errors name the file -------------------------------------------------
def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    paths = _write_jpegs(tmp_path / "mine", 4)
    _cut_jpeg(paths[2])
    ds = build_ood_dataset(_mine(tmp_path / "mine"), tmp_path, (3, 32, 32), CIFAR_NORM)
    assert len(ds) == 4
    ds[1]  # the others read
    with pytest.raises(CorruptDataError) as exc:
        ds[2]
    msg = str(exc.value)
    assert f"cannot decode image {paths[2]} (OSError: image file is truncated" in msg
    assert "skip_corrupt: true" in msg
    assert exc.value.path == paths[2]
    # ... and through a worker process, where the error is re-raised from its text
    loader = DataLoader(ds, batch_size=4, num_workers=1)
    with pytest.raises(CorruptDataError, match=re.escape(str(paths[2]))):
        next(iter(loader))


def test_skip_corrupt_counts_names_and_keeps_the_rest(tmp_path: Path) -> None:
    paths = _write_jpegs(tmp_path / "mine", 6)
    _cut_jpeg(paths[1])
    paths[4].write_bytes(b"")  # a zero-byte file (interrupted copy)
    with pytest.warns(UserWarning, match=r"skip_corrupt: left out 2 of 6 image files") as rec:
        ds = build_ood_dataset(
            _mine(tmp_path / "mine", skip_corrupt=True), tmp_path, (3, 32, 32), CIFAR_NORM
        )
    msg = str(rec[0].message)
    assert f"{paths[1]} (OSError: image file is truncated" in msg
    assert f"{paths[4]} (UnidentifiedImageError" in msg
    assert [p for p, _ in ds.dataset.skipped] == [paths[1], paths[4]]
    assert len(ds) == 4
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CIFAR_NORM)
    for k, i in enumerate([0, 2, 3, 5]):  # the good files, in order
        arr = np.asarray(Image.open(paths[i]).convert("RGB"), dtype=np.float32) / 255
        expected = (torch.from_numpy(arr).permute(2, 0, 1) - mean) / std
        torch.testing.assert_close(ds[k][0], expected, rtol=0, atol=1e-5)
    # every-n applies to the kept files
    with pytest.warns(UserWarning, match="left out 2 of 6"):
        half = build_ood_dataset(
            _mine(tmp_path / "mine", skip_corrupt=True, every=2), tmp_path, (3, 32, 32), CIFAR_NORM
        )
    assert len(half) == 2
    torch.testing.assert_close(half[1][0], ds[2][0])


def test_skip_corrupt_keeps_the_crop_of_every_other_file(tmp_path: Path) -> None:
    paths = _write_jpegs(tmp_path / "tin", 5, size=64)
    spec = {"name": "tin", "kind": "tinyimagenet_crop", "path": str(tmp_path / "tin")}
    before = build_ood_dataset(spec, tmp_path, (3, 32, 32), CIFAR_NORM)
    kept = [before[i][0] for i in (0, 1, 3, 4)]
    _cut_jpeg(paths[2])
    with pytest.warns(UserWarning, match=r"left out 1 of 5 .*" + re.escape(str(paths[2]))):
        after = build_ood_dataset({**spec, "skip_corrupt": True}, tmp_path, (3, 32, 32), CIFAR_NORM)
    assert len(after) == 4
    for k, x in enumerate(kept):
        torch.testing.assert_close(after[k][0], x, rtol=0, atol=0)


def test_skip_corrupt_through_the_datamodule_config(tmp_path: Path, shared_data: Path) -> None:
    paths = _write_jpegs(tmp_path / "mine", 3)
    _truncate(paths[0], 100)
    dm = FashionMNISTDataModule(
        root=str(shared_data),
        ood_sets=[_mine(tmp_path / "mine", skip_corrupt=True)],
        train_every=100,
        test_every=100,
        num_workers=0,
    )
    with pytest.warns(UserWarning, match=r"left out 1 of 3 .*" + re.escape(str(paths[0]))):
        dm.setup()
    (loader,) = dm.test_dataloader()[1:]
    x, y = next(iter(loader))
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [-1, -1]


def test_skip_corrupt_option_is_checked() -> None:
    assert parse_ood_spec(_mine(Path("/x"), skip_corrupt=True)).options == {"skip_corrupt": True}
    with pytest.raises(ValueError, match=r"unknown keys \['skip_corrupt'\]"):
        parse_ood_spec({"name": "mnist", "skip_corrupt": True})  # idx files fail whole


def test_skip_corrupt_must_be_a_flag(tmp_path: Path) -> None:
    _write_jpegs(tmp_path / "mine", 1)
    with pytest.raises(ValueError, match=r"skip_corrupt must be true or false, got 'yes'"):
        build_ood_dataset(_mine(tmp_path / "mine", skip_corrupt="yes"), tmp_path, (3, 8, 8), None)


# -- image folders: what is not read is listed --------------------------------------------------
def test_gif_in_folder_is_listed(tmp_path: Path) -> None:
    _write_jpegs(tmp_path / "mine" / "a", 2)
    gif = tmp_path / "mine" / "b" / "anim.GIF"
    gif.parent.mkdir()
    Image.new("P", (8, 8)).save(gif, format="GIF")
    with pytest.raises(ValueError) as exc:
        build_ood_dataset(_mine(tmp_path / "mine"), tmp_path, (3, 32, 32), CIFAR_NORM)
    msg = str(exc.value)
    assert f"holds 1 image file(s) in a format this reader does not read (.gif): {gif}" in msg
    assert "Convert them to PNG or JPEG" in msg


def test_stray_files_are_counted_not_refused(tmp_path: Path) -> None:
    paths = _write_jpegs(tmp_path / "mine", 2)
    (tmp_path / "mine" / "README.txt").write_text("about these images")
    (tmp_path / "mine" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "mine" / "._00.jpg").write_bytes(b"\0\5\26\7")  # a macOS resource fork
    with pytest.warns(UserWarning, match=r"left out 3 file\(s\) that are not images") as rec:
        ds = build_ood_dataset(_mine(tmp_path / "mine"), tmp_path, (3, 32, 32), CIFAR_NORM)
    assert str(tmp_path / "mine" / "README.txt") in str(rec[0].message)
    assert len(ds) == len(paths) == 2


# -- other formats ---------------------------------------------------------------------------
def test_truncated_svhn_mat_names_the_file(tmp_path: Path) -> None:
    mat = tmp_path / "svhn" / "test_32x32.mat"
    mat.parent.mkdir()
    x = np.zeros((32, 32, 3, 20), np.uint8)
    savemat(mat, {"X": x, "y": np.ones((20, 1), np.uint8)})
    _truncate(mat, mat.stat().st_size // 2)
    with pytest.raises(CorruptDataError, match=re.escape(str(mat)) + r" cannot be read as a .mat"):
        build_ood_dataset("svhn", tmp_path, (3, 32, 32), CIFAR_NORM)
    savemat(mat, {"X": x, "y": np.ones((19, 1), np.uint8)})
    with pytest.raises(CorruptDataError, match=r"holds 20 images .* but 19 labels"):
        build_ood_dataset("svhn", tmp_path, (3, 32, 32), CIFAR_NORM)


def test_truncated_cifar_pickle_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((4, 3072), np.uint8)
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": data, "fine_labels": [0, 1, 2, 3]}, f)
    _truncate(folder / "test", 1000)
    with pytest.raises(CorruptDataError, match=re.escape(str(folder / "test")) + " cannot be"):
        build_ood_dataset("cifar100", tmp_path, (3, 32, 32), CIFAR_NORM)
