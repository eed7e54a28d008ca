"""KNN (Sun et al. 2022) and NNGuide (Park et al. 2023): the chunked exact top-k against
brute force, the seeded bank fraction (the same bank on any world size), checkpoints with and
without the bank, clear errors, and equality with an independent numpy formula and
pytorch-ood 0.4.0 on the same features."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from threaded_ranks import run_ranks, shard
from torch import Tensor, nn
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors import knn as knn_module
from lightning_ood.detectors.base import Detector, Reducer
from lightning_ood.detectors.knn import KNN, seeded_uniform, topk_scores
from lightning_ood.detectors.nnguide import NNGuide

N, Q, L = 300, 10, 3
CHUNKS = {"query_chunk": 7, "bank_chunk": 32}  # many chunks on both sides


def _data(n: int = N, seed: int = 0, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    return torch.randn(n, Q, generator=g) + 1.5 * torch.eye(L, Q)[y] + shift, y


@pytest.fixture(scope="module")
def net() -> LinearHeadNet:
    g = torch.Generator().manual_seed(1)
    return LinearHeadNet(torch.randn(L, Q, generator=g), torch.randn(L, generator=g) + 2).eval()


def _fit(det: Detector, net: LinearHeadNet, x: Tensor, y: Tensor, batch: int = 64) -> Detector:
    engine.fit_from_loader([det], net, list(zip(x.split(batch), y.split(batch), strict=True)))
    return det


def _score(det: Detector, net: LinearHeadNet, x: Tensor) -> Tensor:
    with torch.no_grad():
        return engine.score_batch({"d": det}, net.extract(x))["d"]


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True)


# -- search -----------------------------------------------------------------------------------
def test_chunked_topk_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    q, b = torch.randn(37, 5, generator=g), torch.randn(101, 5, generator=g)
    off = torch.rand(101, generator=g)
    want = (q @ b.T - off).topk(9, dim=1).values
    got = topk_scores(q, b, 9, offset=off, query_chunk=4, bank_chunk=10)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert topk_scores(q[:0], b, 3).shape == (0, 3)
    with pytest.raises(ValueError, match="k=102 exceeds the 101 bank entries"):
        topk_scores(q, b, 102)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_kth_distance_equals_cdist(net: LinearHeadNet, k: int) -> None:
    x, y = _data()
    xt, _ = _data(40, seed=4, shift=0.3)
    det = _fit(KNN(k=k, backend="torch", **CHUNKS), net, x, y)
    dist = torch.cdist(_unit(xt).double(), _unit(x).double())
    want = -dist.sort(dim=1).values[:, k - 1]
    torch.testing.assert_close(_score(det, net, xt).double(), want, rtol=0, atol=2e-6)
    # an all-zero feature row: distance 1 to every unit-norm bank entry
    zero = det.score(net.extract(torch.zeros(1, Q)))
    torch.testing.assert_close(zero, torch.tensor([-1.0]), rtol=0, atol=1e-6)


# -- the bank ---------------------------------------------------------------------------------
def test_bank_fraction_is_seeded_and_independent_of_the_batching(net: LinearHeadNet) -> None:
    x, y = _data()
    a = _fit(KNN(k=3, bank_fraction=0.4, seed=3), net, x, y, batch=64)
    b = _fit(KNN(k=3, bank_fraction=0.4, seed=3), net, x, y, batch=N)
    c = _fit(KNN(k=3, bank_fraction=0.4, seed=3), net, x, y, batch=11)
    keep = seeded_uniform(0, N, 3) < 0.4
    assert torch.equal(a.bank, _unit(x)[keep])
    assert torch.equal(b.bank, a.bank) and torch.equal(c.bank, a.bank)
    assert abs(int(keep.sum()) - 0.4 * N) < 3 * (N * 0.4 * 0.6) ** 0.5  # Binomial(N, 0.4)
    assert a.int_list("bank_shape") == [int(keep.sum()), Q]
    other = _fit(KNN(k=3, bank_fraction=0.4, seed=4), net, x, y)
    assert not torch.equal(other.bank_fingerprint, a.bank_fingerprint)
    full = _fit(KNN(k=3), net, x, y)
    assert torch.equal(full.bank, _unit(x))


def _fit_sharded(
    make: Callable[[], Detector],
    net: LinearHeadNet,
    x: Tensor,
    y: Tensor,
    world: int,
    batch: int,
    monkeypatch: pytest.MonkeyPatch,
) -> list[Detector]:
    """``make()`` fitted by ``world`` ranks at once, each on its EvalShardedSampler shard
    (rows r, r+w, ...) in batches of ``batch``; returns every rank's detector."""

    def fit(rank: int, reducer: Reducer) -> Detector:
        det = make()
        xs, ys = shard(x, rank, world), shard(y, rank, world)
        outputs = [
            (net.extract(a), b) for a, b in zip(xs.split(batch), ys.split(batch), strict=True)
        ]
        engine.fit_detectors([det], net, outputs, reducer)
        return det

    return run_ranks(world, fit, monkeypatch)


@pytest.mark.parametrize(
    "make",
    [
        lambda: KNN(k=3, bank_fraction=0.4, seed=1),
        lambda: KNN(k=3),  # the whole set: only the order of the ranks' shares is at stake
        lambda: NNGuide(k=3, bank_fraction=0.05, min_bank=40, seed=2),  # the floor tops up
    ],
    ids=["knn_fraction", "knn_full", "nnguide_floor"],
)
@pytest.mark.parametrize("world", [2, 3])
def test_bank_is_the_same_on_any_world_size(
    net: LinearHeadNet, make: Callable[[], Detector], world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank draws for the training-set positions of its shard (r + p * w) and finalize
    orders the gathered rows by position, so every rank's bank buffer (rows, order, metadata,
    fingerprint) is one process's, bit for bit. Before, each rank drew for its own stream
    positions 0, 1, ... and the bank was the ranks' shares concatenated: another sample of
    another size, in another order."""
    x, y = _data()
    one = _fit(make(), net, x, y, batch=50)
    for det in _fit_sharded(make, net, x, y, world, batch=16, monkeypatch=monkeypatch):
        for key, want in one.state_dict(keep_vars=True).items():  # NaN: uncalibrated
            torch.testing.assert_close(det.get_buffer(key), want, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(det.bank, one.bank)
    if one.bank_fraction < 1.0:  # a real sample of the set
        assert 0 < one.bank.shape[0] < N


def test_bank_refuses_a_reducer_that_does_not_span_the_ranks(
    net: LinearHeadNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streams numbered as shards of 2 ranks, finalized with a one-process reducer (each rank
    would keep a different bank): refused with the fix."""
    x, y = _data()
    monkeypatch.setattr(knn_module, "stream_layout", lambda: (0, 2))
    with pytest.raises(RuntimeError, match=r"2 torch.distributed ranks.*gathered 1 rank"):
        _fit(KNN(k=3, bank_fraction=0.5), net, x[::2], y[::2])


def test_checkpoint_without_bank_refuses_to_score_until_refit(net: LinearHeadNet) -> None:
    x, y = _data()
    xt, _ = _data(20, seed=2)
    det = _fit(KNN(k=5, bank_fraction=0.5), net, x, y)
    want = _score(det, net, xt)
    state = det.state_dict()
    assert "bank" not in state
    assert state["bank_shape"].tolist() == list(det.bank.shape)
    assert state["bank_sampling"].tolist() == [0.5, 0.0]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = KNN(k=5, bank_fraction=0.5)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    # fitted once (the flag and metadata are loaded), but not usable without its bank: it
    # reports unfitted so that `lightning-ood test` refits it instead of failing mid-run
    assert bool(fresh.fitted) and not fresh.bank_available and not fresh.is_fitted
    with pytest.raises(RuntimeError, match=r"store_bank: false.*refit: true.*store_bank: true"):
        _score(fresh, net, xt)
    _fit(fresh, net, x, y)  # the refit rebuilds the same bank
    assert torch.equal(fresh.bank_fingerprint, state["bank_fingerprint"])
    assert torch.equal(_score(fresh, net, xt), want)


def test_checkpoint_with_bank_scores_identically(net: LinearHeadNet) -> None:
    x, y = _data()
    xt, _ = _data(20, seed=2)
    for cls in (KNN, NNGuide):
        det = _fit(cls(k=5, bank_fraction=0.5, store_bank=True), net, x, y)
        state = det.state_dict()
        assert torch.equal(state["bank"], det.bank)
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        fresh = cls(k=5, bank_fraction=0.5, store_bank=True)
        fresh.load_state_dict(loaded)
        assert torch.equal(_score(fresh, net, xt), _score(det, net, xt)), cls
        # an instance with store_bank=False adopts a stored bank too
        other = cls(k=5, bank_fraction=0.5)
        other.load_state_dict(loaded)
        assert torch.equal(_score(other, net, xt), _score(det, net, xt)), cls
        # ... and a store_bank=True instance loads a metadata-only checkpoint, then refuses
        det.store_bank = False
        meta_only = cls(k=5, bank_fraction=0.5, store_bank=True)
        meta_only.load_state_dict(det.state_dict())
        with pytest.raises(RuntimeError, match="bank is not in memory"):
            _score(meta_only, net, xt)


def test_clear_errors(net: LinearHeadNet) -> None:
    x, y = _data(60)
    with pytest.raises(ValueError, match=r"k=500 exceeds the bank size 60"):
        _fit(KNN(k=500), net, x, y)
    det = _fit(KNN(k=5), net, x, y)
    det.k = 61  # a finalize-only change is checked again at scoring time
    with pytest.raises(ValueError, match=r"k=61 exceeds the bank size 60"):
        _score(det, net, x)
    with pytest.raises(ValueError, match="bank_fraction=0"):
        KNN(bank_fraction=0)
    with pytest.raises(ValueError, match="k=0"):
        NNGuide(k=0)
    with pytest.raises(ValueError, match="backend='annoy'"):
        KNN(backend="annoy")
    with pytest.raises(ValueError, match=r"features must have shape \(B, 10\)"):
        _fit(KNN(k=5), net, x, y).search(torch.zeros(2, 4))


# The faiss backend (with and without faiss installed): test_knn_faiss.py.


# -- NNGuide ----------------------------------------------------------------------------------
def _numpy_nnguide(xtr: np.ndarray, ltr: np.ndarray, x: np.ndarray, lx: np.ndarray, k: int):
    """Park et al. Sec. 3: energy(x) * mean of the k largest <x/|x|, E(x_i) x_i/|x_i|>."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    bank = unit(xtr) * logsumexp(ltr, axis=1)[:, None]
    sims = np.sort(unit(x) @ bank.T, axis=1)[:, ::-1][:, :k]
    return logsumexp(lx, axis=1) * sims.mean(axis=1)


def test_nnguide_matches_the_paper_formula_in_numpy(net: LinearHeadNet) -> None:
    x, y = _data()
    xt, _ = _data(40, seed=4, shift=0.5)
    det = _fit(NNGuide(k=20, bank_fraction=1.0, **CHUNKS), net, x, y)
    with torch.no_grad():
        ltr, lt = net(x).double().numpy(), net(xt).double().numpy()
    want = _numpy_nnguide(x.double().numpy(), ltr, xt.double().numpy(), lt, 20)
    np.testing.assert_allclose(_score(det, net, xt).double().numpy(), want, rtol=1e-5)
    # the fraction keeps the seeded rows, scaled by their energy (no floor: min_bank=0)
    part = _fit(NNGuide(k=20, bank_fraction=0.3, seed=2, min_bank=0), net, x, y)
    keep = (seeded_uniform(0, N, 2) < 0.3).numpy()
    want = _numpy_nnguide(x.double().numpy()[keep], ltr[keep], xt.double().numpy(), lt, 20)
    np.testing.assert_allclose(_score(part, net, xt).double().numpy(), want, rtol=1e-5)


# -- pytorch-ood ------------------------------------------------------------------------------
def test_knn_matches_pytorch_ood(net: LinearHeadNet) -> None:
    """pytorch-ood 0.4.0 ``KNN.predict_features`` (detector/knn.py:124-131): the distance to
    the k-th nearest normalised training feature, i.e. minus our score."""
    from pytorch_ood.detector import KNN as PoodKNN

    x, y = _data()
    xt, _ = _data(40, seed=4, shift=0.3)
    theirs = PoodKNN(None, k=50).fit_features(x, y).predict_features(xt)
    ours = _score(_fit(KNN(k=50, **CHUNKS), net, x, y), net, xt)
    torch.testing.assert_close(ours.double(), -theirs.double(), rtol=1e-5, atol=1e-6)


def test_nnguide_matches_pytorch_ood(net: LinearHeadNet) -> None:
    """pytorch-ood 0.4.0 ``NNGuide.predict_features`` (detector/nnguide.py:177-204) returns
    ``-(guidance * energy)`` with the same energy-scaled bank: minus our score."""
    from pytorch_ood.detector import NNGuide as PoodNNGuide

    x, y = _data()
    xt, _ = _data(40, seed=4, shift=0.3)
    head = nn.Linear(Q, L)
    head.load_state_dict(net.get_classifier().state_dict())
    ref = PoodNNGuide(None, head=head, k=10).fit_features(x, y)
    with torch.no_grad():
        theirs = ref.predict_features(xt)
    ours = _score(_fit(NNGuide(k=10, bank_fraction=1.0, **CHUNKS), net, x, y), net, xt)
    torch.testing.assert_close(ours.double(), -theirs.double(), rtol=1e-5, atol=1e-5)
