"""The feature cache: bit-identical hits with no forward pass, keys that follow the weights,
dataset slice, transform and tap set, and atomic writes."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets import FashionMNIST

from lightning_ood import features as feat_mod
from lightning_ood.features import (
    CachedFeatures,
    FeatureCache,
    backbone_fingerprint,
    compute_features,
    describe_loader,
)
from lightning_ood.models import create_model
from lightning_ood.models.base import BackboneOutput, OODBackbone

NORM = T.Normalize((0.2860,), (0.3530,))


class CountingForward:
    """Counts forward passes through a forward pre-hook on a module (`extract` calls
    `forward_features`, not `forward`, so hook the first layer)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, _m: nn.Module, _i: object) -> None:
        self.calls += 1


def _bits_equal(a: Tensor, b: Tensor) -> bool:
    """Equal dtype, shape and raw bytes (NaN-safe, -0.0 vs 0.0 distinguished)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def _assert_same(a: CachedFeatures, b: CachedFeatures) -> None:
    assert _bits_equal(a.features, b.features)
    assert _bits_equal(a.logits, b.logits)
    assert _bits_equal(a.targets, b.targets)
    assert sorted(a.taps) == sorted(b.taps)
    for k in a.taps:
        assert _bits_equal(a.taps[k], b.taps[k])


@pytest.fixture(scope="module")
def fmnist(shared_data: Path) -> FashionMNIST:
    return FashionMNIST(str(shared_data), train=False, transform=T.Compose([T.ToTensor(), NORM]))


def _loader(ds: Dataset, every: int = 50, batch_size: int = 64) -> DataLoader:
    return DataLoader(Subset(ds, range(0, len(ds), every)), batch_size=batch_size)  # type: ignore[arg-type]


@pytest.fixture
def lenet() -> OODBackbone:
    torch.manual_seed(0)
    return create_model("lenet", num_classes=10, in_channels=1).eval()


def test_hit_is_bit_identical_and_runs_no_forward(
    tmp_path: Path, fmnist: FashionMNIST, lenet: OODBackbone
) -> None:
    loader = _loader(fmnist)  # 200 real FashionMNIST test images
    counter = CountingForward(lenet.conv1)
    cache = FeatureCache(tmp_path)
    first = cache.get_or_compute(lenet, loader, taps=["conv2", "fc1"], progress=False)
    n_batches = len(loader)
    assert counter.calls == n_batches and (cache.hits, cache.misses) == (0, 1)
    assert not first.from_cache and len(first) == 200
    assert first.taps["conv2"].shape == (200, 64, 24, 24) and first.features.shape == (200, 128)
    assert torch.equal(first.targets, fmnist.targets[::50])

    fresh_cache = FeatureCache(tmp_path)  # another process: nothing in memory
    hit = fresh_cache.get_or_compute(lenet, loader, taps=["fc1", "conv2"], progress=False)
    assert counter.calls == n_batches, "a cache hit must not run the network"
    assert (fresh_cache.hits, fresh_cache.misses) == (1, 0) and hit.from_cache
    _assert_same(first, hit)
    recomputed = compute_features(lenet, loader, taps=["conv2", "fc1"])
    _assert_same(recomputed, hit)
    # The stored outputs are the network's: logits = head(features), taps from the hooks.
    with torch.no_grad():
        x = torch.stack([fmnist[i][0] for i in range(0, 200 * 50, 50)])
        out = lenet.extract(x, taps=["fc1"])
    torch.testing.assert_close(hit.features, out.features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hit.taps["fc1"], out.taps["fc1"], rtol=1e-5, atol=1e-6)
    assert hit.meta["shapes"]["taps.conv2"] == [200, 64, 24, 24]
    assert hit.meta["taps"] == ["conv2", "fc1"] and hit.meta["rows"] == 200
    # The batch size is not part of the key (eval-mode outputs do not depend on it).
    before = counter.calls
    other_bs = fresh_cache.get_or_compute(lenet, _loader(fmnist, batch_size=7), ["conv2", "fc1"])
    assert other_bs.from_cache and counter.calls == before


def test_superset_entry_serves_a_subset_of_taps(
    tmp_path: Path, fmnist: FashionMNIST, lenet: OODBackbone
) -> None:
    loader = _loader(fmnist, every=100)
    cache = FeatureCache(tmp_path)
    full = cache.get_or_compute(lenet, loader, taps=["conv1", "fc1"], progress=False)
    counter = CountingForward(lenet.conv1)
    part = cache.get_or_compute(lenet, loader, taps=["fc1", "features", "logits"], progress=False)
    assert counter.calls == 0 and part.from_cache
    assert list(part.taps) == ["fc1"] and _bits_equal(part.taps["fc1"], full.taps["fc1"])
    assert _bits_equal(part.features, full.features)
    # A tap the entry lacks forces a new pass and a second entry.
    more = cache.get_or_compute(lenet, loader, taps=["conv2"], progress=False)
    assert counter.calls == len(loader) and not more.from_cache
    assert len(list(Path(tmp_path).rglob("taps-*.pt"))) == 2


def test_key_follows_weights_not_file_names(
    tmp_path: Path, fmnist: FashionMNIST, lenet: OODBackbone
) -> None:
    loader = _loader(fmnist, every=200)
    cache = FeatureCache(tmp_path)
    fp = backbone_fingerprint(lenet)
    twin = create_model("lenet", num_classes=10, in_channels=1)
    twin.load_state_dict(lenet.state_dict())
    assert backbone_fingerprint(twin) == fp  # same weights, another object: same key
    a = cache.get_or_compute(lenet, loader, progress=False)
    with torch.no_grad():
        twin.fc2.bias[3] += 1e-6  # one parameter, one element
    assert backbone_fingerprint(twin) != fp
    counter = CountingForward(twin.conv1)
    b = cache.get_or_compute(twin, loader, progress=False)
    assert counter.calls == len(loader) and not b.from_cache
    assert torch.equal(a.features, b.features)  # the bias is after the features...
    assert not torch.equal(a.logits[:, 3], b.logits[:, 3])  # ...but not after the logits
    # Buffers count too (BatchNorm statistics change the network without any parameter).
    bn = nn.BatchNorm1d(4)
    fp_bn = backbone_fingerprint(bn)
    bn.running_mean += 1.0
    assert backbone_fingerprint(bn) != fp_bn


def test_key_follows_dataset_slice_and_transform(fmnist: FashionMNIST, shared_data: Path) -> None:
    d_every50, t_norm = describe_loader(_loader(fmnist, every=50))
    d_every40, t_norm2 = describe_loader(_loader(fmnist, every=40))
    assert d_every50 != d_every40 and t_norm == t_norm2
    other_norm = FashionMNIST(
        str(shared_data),
        train=False,
        transform=T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,))]),
    )
    d_same, t_other = describe_loader(_loader(other_norm, every=50))
    assert d_same == d_every50  # same images...
    assert t_other != t_norm and "0.5" in t_other  # ...another transform
    train = FashionMNIST(str(shared_data), train=True, transform=fmnist.transform)
    d_train, _ = describe_loader(_loader(train, every=50))
    assert d_train != d_every50
    cache = FeatureCache("/nonexistent")
    fp = "0" * 64
    paths = {
        cache.entry_path(fp, d_every50, t_norm),
        cache.entry_path(fp, d_every40, t_norm),
        cache.entry_path(fp, d_every50, t_other),
        cache.entry_path(fp, d_every50, t_norm, ["conv1"]),
        cache.entry_path(fp, d_every50, t_norm, ["conv1", "fc1"]),
        cache.entry_path("1" + fp[1:], d_every50, t_norm),
    }
    assert len(paths) == 6
    # features/logits never need a hook: they do not change the tap key; order does not either.
    assert cache.entry_path(fp, d_every50, t_norm, ["features", "logits"]) == cache.entry_path(
        fp, d_every50, t_norm
    )
    assert cache.entry_path(fp, d_every50, t_norm, ["fc1", "conv1"]) == cache.entry_path(
        fp, d_every50, t_norm, ["conv1", "fc1"]
    )


class _NoReprTransform:
    def __call__(self, x: Tensor) -> Tensor:
        return x


class _Tensors(Dataset):
    def __init__(self, x: Tensor, y: Tensor, transform: object = None) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def test_dataset_content_enters_the_key_and_unstable_transforms_warn() -> None:
    x, y = torch.randn(10, 3), torch.arange(10)
    a, _ = describe_loader(DataLoader(_Tensors(x, y)))
    x2 = x.clone()
    x2[4, 1] += 1e-3
    b, _ = describe_loader(DataLoader(_Tensors(x2, y)))
    assert a != b
    with pytest.warns(UserWarning, match="no stable repr"):
        describe_loader(DataLoader(_Tensors(x, y, _NoReprTransform())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        describe_loader(DataLoader(_Tensors(x, y, T.Normalize((0.0,), (1.0,)))))


def test_tensor_dataset_contents_enter_the_key() -> None:
    """torch's TensorDataset keeps its tensors in a tuple: two of the same length but other
    images (or labels) are other entries, never each other's features."""
    from torch.utils.data import TensorDataset

    x, y = torch.randn(10, 3), torch.arange(10)
    keys = {
        describe_loader(DataLoader(TensorDataset(*t)))[0]
        for t in [(x, y), (x + 1, y), (x, y.flip(0)), (x.clone(), y.clone())]
    }
    assert len(keys) == 3  # the clone has the same contents: the same entry


def test_interrupted_save_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmnist: FashionMNIST, lenet: OODBackbone
) -> None:
    loader = _loader(fmnist, every=250)
    real_save = torch.save

    def dying_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        f.write(b"PK\x03\x04 half an archive")  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(feat_mod.torch, "save", dying_save)
    cache = FeatureCache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(lenet, loader, progress=False)
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert left == [], f"an interrupted save left {left}"

    monkeypatch.setattr(feat_mod.torch, "save", real_save)
    stored = cache.get_or_compute(lenet, loader, progress=False)
    assert [p.suffix for p in tmp_path.rglob("*") if p.is_file()] == [".pt"]
    again = FeatureCache(tmp_path).get_or_compute(lenet, loader, progress=False)
    assert again.from_cache
    _assert_same(stored, again)


def test_damaged_entry_is_recomputed(
    tmp_path: Path, fmnist: FashionMNIST, lenet: OODBackbone
) -> None:
    loader = _loader(fmnist, every=500)
    cache = FeatureCache(tmp_path)
    good = cache.get_or_compute(lenet, loader, progress=False)
    (entry,) = tmp_path.rglob("taps-*.pt")
    entry.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = cache.get_or_compute(lenet, loader, progress=False)
    assert not again.from_cache
    _assert_same(good, again)
    assert FeatureCache(tmp_path).get_or_compute(lenet, loader, progress=False).from_cache


def test_cached_features_batches_and_subsets() -> None:
    f = torch.arange(20.0).reshape(10, 2)
    c = CachedFeatures(f, f * 2, {"t": f[:, :1]}, torch.arange(10))
    chunks = list(c.as_batches(4))
    assert [len(t) for _, t in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat([o.features for o, _ in chunks]), f)
    assert torch.equal(chunks[2][0].taps["t"], torch.tensor([[16.0], [18.0]]))
    s = c.subset(torch.tensor([9, 0]))
    assert torch.equal(s.logits, torch.tensor([[36.0, 38.0], [0.0, 2.0]]))
    assert torch.equal(s.targets, torch.tensor([9, 0]))
    with pytest.raises(ValueError, match="rows"):
        CachedFeatures(f, f[:5], {}, torch.arange(10))
    with pytest.raises(KeyError, match="not stored"):
        c.select_taps(["u"])


# -- sharded entries (ImageNet-scale outputs in bounded memory) -------------------------------
def test_sharded_entry_streams_the_same_rows_and_fits_the_same_state(
    tmp_path: Path, fmnist: FashionMNIST, lenet: OODBackbone
) -> None:
    from lightning_ood.detectors import KNN, Mahalanobis, ReAct
    from lightning_ood.features import ShardedFeatures, fit_from_cache

    loader = _loader(fmnist, every=40)  # 250 real test images, batches of 64
    cache = FeatureCache(tmp_path)
    whole = compute_features(lenet, loader, taps=["fc1"])
    sharded = cache.get_or_compute(lenet, loader, ["fc1"], progress=False, shard_rows=100)
    assert isinstance(sharded, ShardedFeatures) and not sharded.from_cache
    assert [e["rows"] for e in sharded.shards] == [100, 100, 50] and len(sharded) == 250
    shard_files = sorted(p.name for p in sharded.folder.iterdir())
    assert shard_files == ["shard-00000.pt", "shard-00001.pt", "shard-00002.pt"]
    # Another process finds the index and streams the same bytes; no temporary folder is left.
    hit = FeatureCache(tmp_path).get_or_compute(lenet, loader, ["fc1"], shard_rows=100)
    assert isinstance(hit, ShardedFeatures) and hit.from_cache
    _assert_same(whole, hit.load())
    assert not [p for p in tmp_path.rglob(".*tmp-*")]
    assert hit.meta["shapes"]["features"] == [250, 128] and hit.meta["rows"] == 250
    assert hit.select_taps([]).taps == [] and hit.load().taps.keys() == {"fc1"}
    # Fitting from the stream gives the state fitting from memory gives (batches of 50 divide
    # both the shards and the whole, so every accumulator sees the same batches).
    dets = {
        "maha": lambda: Mahalanobis(taps=["fc1"]),
        "react": lambda: ReAct(percentile=90.0, max_samples=1000),  # radix selection path
        "knn": lambda: KNN(k=5, bank_fraction=0.5, seed=3, store_bank=True),
    }
    streamed = {n: f() for n, f in dets.items()}
    in_memory = {n: f() for n, f in dets.items()}
    fit_from_cache(streamed.values(), lenet, hit, batch_size=50)
    fit_from_cache(in_memory.values(), lenet, whole, batch_size=50)
    for n in dets:
        a, b = streamed[n].state_dict(), in_memory[n].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=f"{n} {k}")


def test_sharded_write_interrupted_or_damaged_leaves_no_entry(
    tmp_path: Path, fmnist: FashionMNIST, lenet: OODBackbone
) -> None:
    loader = _loader(fmnist, every=100)  # 100 images
    cache = FeatureCache(tmp_path)

    def dying_stream() -> Iterator[tuple[BackboneOutput, Tensor]]:
        for i, batch in enumerate(compute_features(lenet, loader).as_batches(30)):
            if i == 2:
                raise KeyboardInterrupt  # Ctrl-C after one full shard was written
            yield batch

    with pytest.raises(KeyboardInterrupt):
        cache.save_stream(dying_stream(), "w", "d", "t", shard_rows=40)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len([p for p in tmp_path.rglob("*") if p.is_dir()]) == 1  # the entry's parent
    assert cache.load("w", "d", "t") is None
    stored = cache.save_stream(compute_features(lenet, loader).as_batches(30), "w", "d", "t",
                               shard_rows=40)  # fmt: skip
    (stored.folder / "shard-00001.pt").unlink()
    with pytest.warns(UserWarning, match="lacks shards"):
        assert cache.load("w", "d", "t") is None
    with pytest.raises(ValueError, match="shard_rows"):
        cache.save_stream(iter([]), "w", "d", "t", shard_rows=0)
    with pytest.raises(ValueError, match="no rows"):
        cache.save_stream(iter([]), "w", "d", "t", shard_rows=10)
    assert not [p for p in tmp_path.rglob(".*tmp-*")]


def test_a_shard_index_naming_files_outside_its_folder_is_not_read(
    tmp_path: Path, fmnist: FashionMNIST, lenet: OODBackbone
) -> None:
    """The index is data: a shard named by an absolute path or with ``..`` is recomputed, never
    loaded from elsewhere."""
    cache = FeatureCache(tmp_path / "cache")
    loader = _loader(fmnist, every=200)
    stored = cache.save_stream(compute_features(lenet, loader).as_batches(30), "w", "d", "t",
                               shard_rows=20)  # fmt: skip
    index = stored.folder.with_suffix(".pt")
    outside = tmp_path / "outside.pt"
    shutil.copy(stored.folder / "shard-00000.pt", outside)
    obj = torch.load(index, weights_only=True)
    for name in (str(outside), "../outside.pt"):
        obj["shards"][0]["file"] = name
        torch.save(obj, index)
        with pytest.warns(UserWarning, match="names shards outside"):
            assert cache.load("w", "d", "t") is None
