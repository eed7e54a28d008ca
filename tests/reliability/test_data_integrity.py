"""What a run reads is what the user's files hold, and what the cache serves is what they hold now.

* 16-bit PNGs are scaled to 8 bits (``round(v / 257)``), not clipped to 255 (issue 21, item 11);
  32-bit images of no known full scale are refused naming the file.
* A decompression bomb is an error naming the file and the fix, and ``skip_corrupt`` leaves
  it out like an undecodable file (item 19).
* ``predict_sets`` entries are scored whole: the config's ``ood_every`` does not thin the files
  a user asked to score; an entry's own ``every`` does (item 12).
* The feature cache key follows ``test_corruption`` and the files of folder sets, contents
  included (item 13).
"""

from __future__ import annotations

import copy
import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets.mnist import read_image_file

import lightning_ood
from lightning_ood import features as feat_mod
from lightning_ood.cli import main
from lightning_ood.data import CorruptDataError, FashionMNISTDataModule, build_ood_dataset
from lightning_ood.data.readers import load_rgb
from lightning_ood.data.transforms import FASHIONMNIST_MEAN, FASHIONMNIST_STD
from lightning_ood.features import FeatureCache, compute_features, describe_loader
from lightning_ood.models import create_model
from lightning_ood.models.base import OODBackbone

FMNIST_NORM = (FASHIONMNIST_MEAN, FASHIONMNIST_STD)


def _fmnist_test_images(shared_data: Path, n: int, start: int = 0) -> np.ndarray:
    """``n`` FashionMNIST test images from ``start``, uint8 (n, 28, 28)."""
    raw = shared_data / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    return read_image_file(str(raw))[start : start + n].numpy()


def _norm1(arr_hw: np.ndarray) -> torch.Tensor:
    x = (arr_hw.astype(np.float32) / 255 - FASHIONMNIST_MEAN[0]) / FASHIONMNIST_STD[0]
    return torch.from_numpy(x)[None]


def _save16(path: Path, values: np.ndarray) -> None:
    """A 16-bit grayscale PNG (PIL mode I;16) holding ``values`` exactly."""
    img = Image.fromarray(values.astype(np.uint16))
    assert img.mode == "I;16"
    img.save(path)


# -- item 11: 16-bit images ----------------------------------------------------------------------
def test_16bit_png_is_scaled_to_8_bits_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 128, 257, 1000], [32896, 40000, 65279, 65535]], np.uint16)
    path = tmp_path / "mine" / "deep.png"
    path.parent.mkdir()
    _save16(path, values)
    assert Image.open(path).mode == "I;16"  # PIL reads it back as 16-bit
    expected = np.array([[0, 0, 1, 4], [128, 156, 254, 255]], np.uint8)  # round(v / 257)
    np.testing.assert_array_equal(np.rint(values / 257), expected)

    rgb = np.asarray(load_rgb(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)

    # ... through a folder OOD set, to the normalised tensor the model reads
    spec = {"name": "mine", "kind": "folder", "path": str(path.parent)}
    ds = build_ood_dataset(spec, tmp_path, (1, 2, 4), FMNIST_NORM)
    x, y = ds[0]
    assert y == -1
    torch.testing.assert_close(x, _norm1(expected), rtol=0, atol=1e-6)


def test_32bit_images_of_unknown_scale_are_refused_or_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(folder / "a.png")
    float_tif = folder / "b.tif"
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(float_tif)
    assert Image.open(float_tif).mode == "F"
    spec = {"name": "mine", "kind": "folder", "path": str(folder)}
    ds = build_ood_dataset(spec, tmp_path, (1, 4, 4), FMNIST_NORM)
    with pytest.raises(CorruptDataError) as exc:
        ds[1]
    msg = str(exc.value)
    assert str(float_tif) in msg and "32-bit float pixels (PIL mode F" in msg
    assert "convert it to an 8-bit or 16-bit PNG" in msg and "skip_corrupt: true" in msg
    assert exc.value.path == float_tif
    with pytest.warns(UserWarning, match=r"left out 1 of 2 .*b\.tif \(32-bit float"):
        kept = build_ood_dataset({**spec, "skip_corrupt": True}, tmp_path, (1, 4, 4), FMNIST_NORM)
    assert len(kept) == 1
    torch.testing.assert_close(kept[0][0], _norm1(np.full((4, 4), 9)), rtol=0, atol=1e-6)


# -- item 19: decompression bombs ----------------------------------------------------------------
def _bomb_folder(folder: Path) -> tuple[Path, Path, Path]:
    """8x8 (fine), 12x12 (above a limit of 100 pixels: warned) and 16x16 (above 2 x 100:
    refused by PIL) grayscale PNGs."""
    folder.mkdir(parents=True)
    paths = []
    for name, side in (("a.png", 8), ("b.png", 12), ("c.png", 16)):
        Image.fromarray(np.full((side, side), side, np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths[0], paths[1], paths[2]


def test_decompression_bomb_names_the_file_and_skip_corrupt_skips_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ok, large, bomb = _bomb_folder(tmp_path / "mine")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    spec = {"name": "mine", "kind": "folder", "path": str(tmp_path / "mine")}
    ds = build_ood_dataset(spec, tmp_path, (1, 8, 8), FMNIST_NORM)
    assert len(ds) == 3
    torch.testing.assert_close(ds[0][0], _norm1(np.full((8, 8), 8)), rtol=0, atol=1e-6)
    with pytest.warns(Image.DecompressionBombWarning, match=re.escape(str(large)) + ".*144"):
        x, _ = ds[1]  # above the limit, below twice it: read, with the file named
    torch.testing.assert_close(x, _norm1(np.full((8, 8), 12)), rtol=0, atol=1e-6)
    with pytest.raises(CorruptDataError) as exc:
        ds[2]
    msg = str(exc.value)
    assert f"image {bomb} is refused as a possible decompression bomb" in msg
    assert "256 pixels" in msg and "200 pixels (2 x PIL.Image.MAX_IMAGE_PIXELS)" in msg
    assert "downscale it" in msg and "skip_corrupt: true" in msg
    assert exc.value.path == bomb
    with (
        pytest.raises(CorruptDataError, match=re.escape(str(bomb))),
        pytest.warns(Image.DecompressionBombWarning),
    ):
        list(DataLoader(ds, batch_size=3))  # the predict path: a loader over the set

    with (
        pytest.warns(UserWarning, match=r"left out 1 of 3 .*c\.png \(decompression bomb"),
        pytest.warns(Image.DecompressionBombWarning, match=re.escape(str(large))),
    ):
        kept = build_ood_dataset({**spec, "skip_corrupt": True}, tmp_path, (1, 8, 8), FMNIST_NORM)
    assert [(p, r.split(":")[0]) for p, r in kept.dataset.skipped] == [
        (bomb, "decompression bomb refused by PIL")
    ]
    assert len(kept) == 2
    with pytest.warns(Image.DecompressionBombWarning):
        got = torch.stack([x for x, _ in kept])
    torch.testing.assert_close(got[:, 0], torch.cat([_norm1(np.full((8, 8), v)) for v in (8, 12)]))


# -- item 12: predict sets are scored whole ------------------------------------------------------
def _png_folder(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:02d}.png" for i in range(len(images))]
    for p, img in zip(paths, images, strict=True):
        Image.fromarray(img).save(p, compress_level=0)  # stored: size depends on shape only
    return paths


def test_predict_sets_ignore_ood_every(tmp_path: Path, shared_data: Path) -> None:
    images = _fmnist_test_images(shared_data, 13)
    _png_folder(tmp_path / "mine", images)
    mine = {"name": "mine", "kind": "folder", "path": str(tmp_path / "mine")}
    dm = FashionMNISTDataModule(
        root=str(shared_data),
        num_workers=0,
        ood_sets=["mnist"],
        ood_every=10,
        train_every=200,
        test_every=100,
        eval_batch_size=50,
        predict_sets=[mine, {**mine, "name": "mine_every5", "every": 5}, "kmnist"],
    )
    loaders = dm.predict_dataloader()
    assert dm.predict_set_names == ["fashionmnist", "mine", "mine_every5", "kmnist"]
    # the reported OOD set keeps the fast run's slice; predict sets are scored whole ...
    assert len(dm.test_dataloader()[1].dataset) == 1000
    assert [len(dl.dataset) for dl in loaders] == [100, 13, 3, 10_000]
    # ... unless the entry asks for a slice itself: files 0, 5, 10
    x, y = next(iter(loaders[2]))
    torch.testing.assert_close(x, torch.stack([_norm1(images[i]) for i in (0, 5, 10)]))
    x, y = next(iter(loaders[1]))
    assert y.tolist() == [-1] * 13
    torch.testing.assert_close(x, torch.stack([_norm1(img) for img in images]))


def test_predict_cli_scores_every_file_16bit_scaled_bomb_skipped(
    tmp_path: Path, shared_data: Path, lenet_fitted: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lightning-ood predict`` with the session config (``ood_every: 20``) on a folder of 12
    images, 4 of them 16-bit, and one decompression bomb under ``skip_corrupt``: 12 rows, each
    scored as the hand-off module scores the 8-bit image."""
    images = _fmnist_test_images(shared_data, 12)
    folder = tmp_path / "mine"
    paths = _png_folder(folder, images)
    for i in range(4):  # 16-bit copies: v * 257 + 100 (capped at 65535) rounds back to v
        _save16(paths[i], np.minimum(images[i].astype(np.uint32) * 257 + 100, 65535))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "zz_bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 28x28 = 784 passes, 64x64 is refused
    cfg = copy.deepcopy(lenet_fitted["config"])
    assert cfg["data"]["init_args"]["ood_every"] == 20
    cfg["trainer"]["callbacks"] = []
    cfg["data"]["init_args"]["predict_sets"] = [
        {"name": "mine", "kind": "folder", "path": str(folder), "skip_corrupt": True}
    ]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "pred.csv"
    args = ["predict", "--config", str(tmp_path / "cfg.yaml"), "--experiment", "p"]
    args += ["--checkpoint_root", str(tmp_path / "ckpt"), "--log_root", str(tmp_path / "logs")]
    args += ["--ckpt_path", str(lenet_fitted["ckpt"]), "--predictions", str(out)]
    with pytest.warns(UserWarning, match=r"left out 1 of 13 .*zz_bomb\.png \(decompression"):
        main(args)
    rows = [r for r in csv.DictReader(out.open()) if r["set"] == "mine"]
    assert [(int(r["index"]), Path(r["path"]).name) for r in rows] == [
        (i, f"img{i:02d}.png") for i in range(12)
    ]
    model = lightning_ood.load(lenet_fitted["ckpt"])
    expected = model(torch.from_numpy(images).unsqueeze(1))
    assert [int(r["pred"]) for r in rows] == expected["pred"].tolist()
    for det in lenet_fitted["detectors"]:
        got = torch.tensor([float(r[f"{det}_score"]) for r in rows])
        torch.testing.assert_close(got, expected["scores"][det].float(), rtol=1e-5, atol=1e-5)


# -- item 13: the feature cache key --------------------------------------------------------------
@pytest.fixture
def lenet() -> OODBackbone:
    torch.manual_seed(0)
    return create_model("lenet", num_classes=10, in_channels=1).eval()


def _corrupted_dm(shared_data: Path, severity: int) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(
        root=str(shared_data),
        num_workers=0,
        train_every=600,
        test_every=500,
        eval_batch_size=20,
        test_corruption={"corruption": "gaussian_noise", "severity": severity},
    )
    dm.setup()
    return dm


def test_cache_key_follows_test_corruption(
    tmp_path: Path, shared_data: Path, lenet: OODBackbone
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    mild, severe = (_corrupted_dm(shared_data, s).test_dataloader()[0] for s in (1, 5))
    assert describe_loader(mild)[0] != describe_loader(severe)[0]
    assert describe_loader(mild)[1] == describe_loader(severe)[1]  # same transform
    first = cache.get_or_compute(lenet, mild, progress=False)
    second = cache.get_or_compute(lenet, severe, progress=False)
    assert (cache.hits, cache.misses) == (0, 2)
    fresh = compute_features(lenet, severe)
    assert len(second) == 20
    torch.testing.assert_close(second.features, fresh.features, rtol=0, atol=0)
    assert not torch.equal(second.features, first.features)
    again = cache.get_or_compute(lenet, _corrupted_dm(shared_data, 5).test_dataloader()[0])
    assert (cache.hits, cache.misses) == (1, 2) and again.from_cache
    torch.testing.assert_close(again.features, fresh.features, rtol=0, atol=0)


def _folder_loader(folder: Path) -> DataLoader:
    spec = {"name": "mine", "kind": "folder", "path": str(folder)}
    return DataLoader(build_ood_dataset(spec, folder, (1, 28, 28), FMNIST_NORM), batch_size=8)


@pytest.mark.parametrize("content_hash", [True, False], ids=["contents", "size-mtime"])
def test_cache_key_follows_the_files_of_a_folder_set(
    tmp_path: Path,
    shared_data: Path,
    lenet: OODBackbone,
    monkeypatch: pytest.MonkeyPatch,
    content_hash: bool,
) -> None:
    if not content_hash:  # a set too large to hash: sizes and modification times decide
        monkeypatch.setattr(feat_mod, "CONTENT_HASH_MAX_BYTES", 0)
    folder = tmp_path / "mine"
    paths = _png_folder(folder, _fmnist_test_images(shared_data, 20))
    cache = FeatureCache(tmp_path / "cache")
    before = cache.get_or_compute(lenet, _folder_loader(folder), progress=False)
    assert cache.get_or_compute(lenet, _folder_loader(folder), progress=False).from_cache
    assert (cache.hits, cache.misses) == (1, 1)

    stats = [p.stat() for p in paths]
    _png_folder(folder, _fmnist_test_images(shared_data, 20, start=20))  # same names
    assert [p.stat().st_size for p in paths] == [s.st_size for s in stats]
    if content_hash:  # same names, sizes and mtimes: only the bytes differ
        for p, s in zip(paths, stats, strict=True):
            os.utime(p, ns=(s.st_atime_ns, s.st_mtime_ns))
    else:
        for p, s in zip(paths, stats, strict=True):
            os.utime(p, ns=(s.st_atime_ns, s.st_mtime_ns + 1_000_000))

    after = cache.get_or_compute(lenet, _folder_loader(folder), progress=False)
    assert (cache.hits, cache.misses) == (1, 2) and not after.from_cache
    fresh = compute_features(lenet, _folder_loader(folder))
    torch.testing.assert_close(after.features, fresh.features, rtol=0, atol=0)
    torch.testing.assert_close(after.logits, fresh.logits, rtol=0, atol=0)
    assert not torch.allclose(after.features, before.features)
