"""Corruptions (ImageNet-C port), corrupted OOD sets and the datamodule's ``test_corruption``."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tvd

from lightning_ood.data import FashionMNISTDataModule
from lightning_ood.data.corruptions import (
    CORRUPTIONS,
    IMAGENET_C_COMMON,
    IMAGENET_C_EXTRA,
    NOT_PORTED,
    SEVERITY_PARAMS,
    Corrupted,
    CorruptionSpec,
    corrupt,
    corruption_halves,
    expand_corruptions,
    parse_corruption_spec,
    sample_rng,
)
from lightning_ood.data.ood_sets import build_ood_dataset, parse_ood_spec, parse_ood_specs
from lightning_ood.data.transforms import FASHIONMNIST_MEAN, FASHIONMNIST_STD

GEN = np.random.default_rng(123)
GRAY = GEN.integers(0, 256, (28, 28), dtype=np.uint8)
RGB = GEN.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_registry_covers_imagenet_c_tables() -> None:
    # Every name of the 15 + 4 is either ported or listed with a reason; constants: CIFAR-10-C.
    assert set(CORRUPTIONS) | set(NOT_PORTED) == set(IMAGENET_C_COMMON + IMAGENET_C_EXTRA)
    assert len(CORRUPTIONS) == 17 and set(CORRUPTIONS) == set(SEVERITY_PARAMS)
    assert all(len(v) == 5 for v in SEVERITY_PARAMS.values())
    assert SEVERITY_PARAMS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert SEVERITY_PARAMS["jpeg_compression"] == (80, 65, 58, 50, 40)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_deterministic_shape_dtype_identity(name: str) -> None:
    for img in (GRAY, RGB, RGB[..., :1]):
        a = corrupt(img, name, 3, sample_rng(0, "s", 7))
        b = corrupt(img, name, 3, sample_rng(0, "s", 7))
        assert a.shape == img.shape and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)  # same (seed, stream, index): same image
        assert not np.array_equal(a, img), f"{name} severity 3 left the image unchanged"
        assert corrupt(img, name, 0, 5) is img  # severity 0 is the identity
    # PIL in, PIL out, same mode and pixels as the array path.
    pil = corrupt(Image.fromarray(RGB), name, 2, 11)
    assert isinstance(pil, Image.Image) and pil.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil), corrupt(RGB, name, 2, 11))


def test_random_corruptions_differ_per_seed_and_index() -> None:
    a = corrupt(RGB, "gaussian_noise", 2, sample_rng(0, "s", 0))
    assert not np.array_equal(a, corrupt(RGB, "gaussian_noise", 2, sample_rng(1, "s", 0)))
    assert not np.array_equal(a, corrupt(RGB, "gaussian_noise", 2, sample_rng(0, "s", 1)))
    assert not np.array_equal(a, corrupt(RGB, "gaussian_noise", 2, sample_rng(0, "t", 0)))


def test_gaussian_noise_formula() -> None:
    out = corrupt(RGB, "gaussian_noise", 1, np.random.default_rng(9))
    noise = np.random.default_rng(9).normal(scale=0.04, size=RGB.shape)
    expected = (np.clip(RGB / 255 + noise, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_impulse_noise_values_and_rate() -> None:
    big = np.full((200, 200), 128, np.uint8)
    out = corrupt(big, "impulse_noise", 5, 0)  # amount 0.07
    changed = out != 128
    assert set(np.unique(out[changed])) == {0, 255}
    assert abs(changed.mean() - 0.07) < 0.005  # 40,000 pixels: 4 sigma is 0.005
    assert abs((out[changed] == 255).mean() - 0.5) < 0.05


def test_deterministic_digital_corruptions_by_hand() -> None:
    # contrast: (x - mean) * c + mean per channel, then truncation to uint8.
    x = RGB / 255
    mean = x.mean(axis=(0, 1))
    expected = (np.clip((x - mean) * 0.4 + mean, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(corrupt(RGB, "contrast", 3), expected)
    # brightness on gray = V + c.
    gray = np.array([[0, 100], [200, 255]], np.uint8)
    exp = (np.clip(gray / 255 + 0.15, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(corrupt(gray, "brightness", 3), exp)
    # brightness keeps hue and saturation: every channel scales by the same factor.
    px = np.array([[[200, 100, 50]]], np.uint8)
    want = (np.clip(px / 255 * 1.0 / (200 / 255), 0, 1) * 255).astype(np.uint8)  # V -> 1
    np.testing.assert_array_equal(want, [[[255, 127, 63]]])
    np.testing.assert_array_equal(corrupt(px, "brightness", 5), want)
    # jpeg: PIL's own encoder at quality 58 (severity 3).
    buf = io.BytesIO()
    Image.fromarray(RGB).save(buf, format="JPEG", quality=58)
    np.testing.assert_array_equal(corrupt(RGB, "jpeg_compression", 3), np.asarray(Image.open(buf)))
    # pixelate: BOX down to int(28 * 0.65) = 18 and back (severity 5).
    img = Image.fromarray(GRAY).resize((18, 18), Image.Resampling.BOX)
    want = np.asarray(img.resize((28, 28), Image.Resampling.BOX))
    np.testing.assert_array_equal(corrupt(GRAY, "pixelate", 5), want)
    # saturate with factor 0.1 (severity 2) on a pure colour: S 1 -> 0.1, V kept.
    red = np.array([[[255, 0, 0]]], np.uint8)
    np.testing.assert_array_equal(corrupt(red, "saturate", 2), [[[255, 229, 229]]])


def test_severity_grows_distortion() -> None:
    errors = [np.abs(corrupt(RGB, "gaussian_blur", s).astype(float) - RGB).mean() for s in range(6)]
    assert errors[0] == 0 and all(a < b for a, b in itertools.pairwise(errors))


def test_errors_list_valid_values() -> None:
    with pytest.raises(ValueError, match=r"unknown corruption 'gauss'.*gaussian_noise.*saturate"):
        corrupt(RGB, "gauss", 1)
    with pytest.raises(ValueError, match="frost is not ported"):
        corrupt(RGB, "frost", 1)
    for bad in (6, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"severity must be an integer in 1..5"):
            corrupt(RGB, "contrast", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        corrupt(RGB.astype(np.float32), "contrast", 1)
    with pytest.raises(ValueError, match="test_corruption must be"):
        parse_corruption_spec({"corruption": "contrast"})
    assert parse_corruption_spec({"corruption": "contrast", "severity": 0}) is None


def test_expansion_and_names() -> None:
    assert len(expand_corruptions("all", "all")) == 17 * 5
    assert expand_corruptions("noise", [1, 5])[:2] == [("gaussian_noise", 1), ("gaussian_noise", 5)]
    specs = parse_ood_specs(
        [
            "mnist",
            {"name": "fmc", "kind": "corrupted", "base": "fashionmnist", "corruption": "all",
             "severity": "all"},
            {"name": "g3", "kind": "corrupted", "base": "fashionmnist",
             "corruption": "gaussian_noise", "severity": 3},
        ]
    )  # fmt: skip
    names = [s.name for s in specs]
    assert len(names) == 1 + 85 + 1 and names[0] == "mnist" and names[-1] == "g3"
    assert "fmc/gaussian_noise/3" in names and "fmc/saturate/5" in names
    assert specs[-1].options == {"base": "fashionmnist", "corruption": "gaussian_noise",
                                 "severity": 3}  # fmt: skip
    with pytest.raises(ValueError, match=r"entry 'x'.*needs \['severity'\]"):
        parse_ood_spec({"name": "x", "kind": "corrupted", "base": "mnist", "corruption": "fog"})
    with pytest.raises(ValueError, match=r"'base' must name.*usable"):
        parse_ood_spec({"name": "x", "kind": "corrupted", "base": "folder",
                        "corruption": "fog", "severity": 1})  # fmt: skip
    with pytest.raises(ValueError, match=r"entry 'x'.*unknown corruption 'fogg'"):
        parse_ood_specs([{"name": "x", "kind": "corrupted", "base": "mnist",
                          "corruption": ["fog", "fogg"], "severity": 1}])  # fmt: skip


def test_halves_disjoint_and_cover() -> None:
    id_half, bad_half = corruption_halves(10_001, seed=0)
    assert len(id_half) == 5000 and len(bad_half) == 5001
    assert set(id_half).isdisjoint(bad_half) and set(id_half) | set(bad_half) == set(range(10_001))
    assert corruption_halves(10_001, 0) == (id_half, bad_half)
    assert corruption_halves(10_001, 1)[0] != id_half


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.arrays = [np.full((28, 28), 10 * i, np.uint8) for i in range(n)]

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.arrays[i]), i


def test_corrupted_dataset_seeded_per_sample_index() -> None:
    spec = CorruptionSpec("gaussian_noise", 4, seed=3)
    ds = Corrupted(_Images(6), spec, (1, 28, 28), stream="st")
    img, label = ds[4]
    assert label == 4 and isinstance(img, Image.Image) and img.mode == "L"
    want = corrupt(np.full((28, 28), 40, np.uint8), "gaussian_noise", 4, sample_rng(3, "st", 4))
    np.testing.assert_array_equal(np.asarray(img), want)
    sub = torch.utils.data.Subset(ds, [4])  # subsetting keeps the sample's corruption
    np.testing.assert_array_equal(np.asarray(sub[0][0]), want)
    # RGB model: the gray image is replicated to 3 channels and resized before corruption.
    rgb = Corrupted(_Images(2), spec, (3, 32, 32), stream="st")[1][0]
    assert rgb.mode == "RGB" and rgb.size == (32, 32)
    with pytest.raises(ValueError, match="token data"):
        Corrupted(_Images(1), spec, (250,), stream="st")


def test_corrupted_ood_set_on_real_fashionmnist(shared_data: Path) -> None:
    norm = (FASHIONMNIST_MEAN, FASHIONMNIST_STD)
    entry = {"name": "fc", "kind": "corrupted", "base": "fashionmnist",
             "corruption": "impulse_noise", "severity": 5}  # fmt: skip
    ds = build_ood_dataset(entry, shared_data, (1, 28, 28), norm, every=100)
    _, corrupted_half = corruption_halves(10_000, 0)
    assert len(ds) == len(corrupted_half[::100])
    clean = build_ood_dataset("fashionmnist", shared_data, (1, 28, 28), norm)
    x, y = ds[3]
    idx = corrupted_half[300]
    x_clean, _ = clean[idx]
    assert y == -1 and x.shape == (1, 28, 28)
    raw = np.asarray(clean.dataset[idx][0])
    pix = corrupt(raw, "impulse_noise", 5, sample_rng(0, "fashionmnist/impulse_noise/5", idx))
    want = (torch.from_numpy(pix).float()[None] / 255 - norm[0][0]) / norm[1][0]
    torch.testing.assert_close(x, want)
    assert not torch.equal(x, x_clean)


def _fmnist(shared_data: Path, **kwargs: object) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(root=str(shared_data), num_workers=0, train_every=600, **kwargs)
    dm.setup()
    return dm


def test_datamodule_id_half_and_test_corruption(shared_data: Path) -> None:
    corrupted = {"name": "fc", "kind": "corrupted", "base": "fashionmnist",
                 "corruption": ["contrast", "fog"], "severity": [2]}  # fmt: skip
    dm = _fmnist(shared_data, test_every=50, ood_sets=["mnist", corrupted])
    assert dm.test_set_names == ["fashionmnist", "mnist", "fc/contrast/2", "fc/fog/2"]
    id_half, _bad_half = corruption_halves(10_000, 0)
    sets = dm._ready()
    assert len(sets["test"]) == len(id_half[::50])  # the ID side scores only its half
    assert len(sets["val"]) == len(range(0, 10_000, 50))  # validation keeps the clean full set
    assert "corrupted" not in dm.data_version

    spec = {"corruption": "gaussian_noise", "severity": 3, "seed": 1}
    noisy = _fmnist(shared_data, test_every=500, ood_every=500, ood_sets=["mnist"],
                    test_corruption=spec)  # fmt: skip
    clean = _fmnist(shared_data, test_every=500, ood_every=500, ood_sets=["mnist"])
    assert "gaussian_noise severity 3 (seed 1" in noisy.data_version
    n, c = noisy._ready(), clean._ready()
    for split in ("train", "fit", "val"):  # never corrupted
        torch.testing.assert_close(n[split][0][0], c[split][0][0])
    x_n, x_c = n["test"][1][0], c["test"][1][0]
    ood_n, ood_c = noisy._ood[0][1][0], clean._ood[0][1][0]
    assert not torch.equal(x_n, x_c) and not torch.equal(ood_n, ood_c)
    # The ID test image (index 500) carries the noise of its own stream and index.
    raw = tvd.FashionMNIST(str(shared_data), train=False).data[500].numpy()
    pix = corrupt(raw, "gaussian_noise", 3, sample_rng(1, "test_corruption/fashionmnist", 500))
    want = (torch.from_numpy(pix).float()[None] / 255 - FASHIONMNIST_MEAN[0]) / FASHIONMNIST_STD[0]
    torch.testing.assert_close(x_n, want)
    with pytest.raises(ValueError, match=r"unknown corruption 'blur'"):
        FashionMNISTDataModule(root=str(shared_data), test_corruption={"corruption": "blur",
                                                                        "severity": 1})  # fmt: skip


def test_dataloader_workers_give_the_same_images() -> None:
    ds = Corrupted(_Images(8), CorruptionSpec("shot_noise", 5), (1, 28, 28), stream="w")

    def batches(workers: int) -> list[np.ndarray]:
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=3,
            num_workers=workers,
            collate_fn=lambda b: [np.asarray(i) for i, _ in b],
        )
        return [a for batch in loader for a in batch]

    for a, b in zip(batches(0), batches(2), strict=True):
        np.testing.assert_array_equal(a, b)
