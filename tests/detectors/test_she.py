"""SHE (Zhang et al. 2023): against pytorch-ood 0.4.0's ``SHE`` and OpenOOD v1.5's three
metrics written independently in numpy, the correct-only pattern rule on a hand-made toy,
the refusal of a class without correct samples, two threaded ranks against one process, and
the checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_ood.detector import SHE as PeerSHE
from threaded_ranks import run_ranks, shard
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.base import Reducer
from lightning_ood.detectors.she import SHE

N, Q, L = 240, 6, 3


@pytest.fixture(scope="module")
def net() -> LinearHeadNet:
    g = torch.Generator().manual_seed(1)
    return LinearHeadNet(torch.randn(L, Q, generator=g).double(), torch.zeros(L).double()).eval()


def _data(net: LinearHeadNet, n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Features around each class's head row; labels right for ~3/4 of them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    x = net.fc.weight.detach()[y] * 2 + torch.randn(n, Q, generator=g, dtype=torch.float64)
    return x, y


def _fit(det: SHE, net: LinearHeadNet, x: Tensor, y: Tensor, batch: int = 50) -> SHE:
    engine.fit_from_loader([det], net, list(zip(x.split(batch), y.split(batch), strict=True)))
    return det


def _score(det: SHE, net: LinearHeadNet, x: Tensor) -> Tensor:
    with torch.no_grad():
        return det.score(net.extract(x))


@pytest.mark.parametrize("metric", ["inner_product", "euclidean", "cosine"])
def test_she_matches_openood_metrics_in_numpy(net: LinearHeadNet, metric: str) -> None:
    x, y = _data(net)
    test, _ = _data(net, 50, seed=2)
    det = _fit(SHE(metric=metric), net, x, y)
    xn, yn, w = x.numpy(), y.numpy(), net.fc.weight.detach().numpy()
    correct = (xn @ w.T).argmax(1) == yn
    patterns = np.stack([xn[correct & (yn == k)].mean(0) for k in range(L)])
    tn = test.numpy()
    s = patterns[(tn @ w.T).argmax(1)]
    ref = {
        "inner_product": (tn * s).sum(1),
        "euclidean": -np.sqrt(((tn - s) ** 2).sum(1)),
        "cosine": (tn * s).sum(1) / np.linalg.norm(tn, axis=1) / np.linalg.norm(s, axis=1),
    }[metric]
    assert 0.5 < correct.mean() < 1.0  # the correct-only rule drops some samples
    np.testing.assert_allclose(_score(det, net, test).numpy(), ref, rtol=1e-10)


def test_she_matches_pytorch_ood(net: LinearHeadNet) -> None:
    x, y = _data(net)
    test, _ = _data(net, 50, seed=3)
    det = _fit(SHE(), net, x, y)
    peer = PeerSHE(encoder=None, head=net.fc).fit_features(x, y)
    with torch.no_grad():
        torch.testing.assert_close(_score(det, net, test), -peer.predict_features(test))


def test_she_all_samples_option_and_refusal() -> None:
    net = LinearHeadNet(torch.eye(2).double(), torch.zeros(2).double()).eval()
    x = torch.tensor([[2.0, 0.0], [4.0, 1.0], [3.0, 1.0], [0.0, 5.0]]).double()
    y = torch.tensor([0, 0, 1, 1])
    every = _fit(SHE(correct_only=False), net, x, y)
    torch.testing.assert_close(every.patterns, torch.tensor([[3.0, 0.5], [1.5, 3.0]]).double())
    with pytest.raises(ValueError, match=r"classes \[1\] have no correctly .*correct_only: false"):
        _fit(SHE(), net, x[:3], y[:3])  # (3, 1), labelled 1, is predicted as 0
    det = _fit(SHE(), net, x, y)  # class 1: only (0, 5); class 0: (2, 0), (4, 1)
    torch.testing.assert_close(det.patterns, torch.tensor([[3.0, 0.5], [0.0, 5.0]]).double())
    # h = (1, 2) is predicted as class 1: <h, (0, 5)> = 10
    assert float(_score(det, net, torch.tensor([[1.0, 2.0]]).double())) == pytest.approx(10.0)


def test_she_threaded_ranks_and_round_trip(
    net: LinearHeadNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = _data(net)
    test, _ = _data(net, 20, seed=4)
    one = _fit(SHE(), net, x, y, batch=N)

    def fit(rank: int, reducer: Reducer) -> SHE:
        det = SHE()
        det.reset()
        xs = shard(x, rank, 2)
        det.update(net.extract(xs), shard(y, rank, 2))
        det.finalize(net, reducer)
        return det

    with torch.no_grad():
        dets = run_ranks(2, fit, monkeypatch)
    for det in dets:
        torch.testing.assert_close(_score(det, net, test), _score(one, net, test))
    fresh = SHE()
    fresh.load_state_dict(one.state_dict())
    assert sorted(one.state_dict()) == ["fitted", "patterns", "threshold", "threshold_tpr"]
    torch.testing.assert_close(_score(fresh, net, test), _score(one, net, test))
