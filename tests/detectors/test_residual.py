"""Residual (ViM's residual alone; OpenOOD v1.5 ``residual_postprocessor.py``): against
OpenOOD's formula written independently in numpy/sklearn, against ViM's own residual, the
streamed fit against one batch, two threaded ranks against one process, and the checkpoint
round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from threaded_ranks import run_ranks, shard
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.base import Detector, InvalidConfiguration, Reducer
from lightning_ood.detectors.residual import Residual
from lightning_ood.detectors.vim import ViM
from lightning_ood.models.base import BackboneOutput

N, Q, L = 240, 12, 4


def _data(n: int = N, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(Q) + 0.3 * torch.randn(Q, Q, generator=torch.Generator().manual_seed(9))
    return (torch.randn(n, Q, generator=g) * torch.linspace(0.3, 2.0, Q)) @ mix + 1.0


@pytest.fixture(scope="module")
def net() -> LinearHeadNet:
    g = torch.Generator().manual_seed(1)
    return LinearHeadNet(torch.randn(L, Q, generator=g), torch.randn(L, generator=g)).eval()


def _fit(det: Detector, net: LinearHeadNet, x: Tensor, batch: int = 50) -> Detector:
    y = torch.zeros(x.shape[0], dtype=torch.long)
    engine.fit_from_loader([det], net, list(zip(x.split(batch), y.split(batch), strict=True)))
    return det


def _score(det: Detector, x: Tensor) -> Tensor:
    return det.score(BackboneOutput(x, x.new_zeros(x.shape[0], L)))


def _openood_residual(train: np.ndarray, test: np.ndarray, w: np.ndarray, b: np.ndarray,
                      dim: int) -> np.ndarray:  # fmt: skip
    """OpenOOD's formula: u = -pinv(W) b, eigenvectors of EmpiricalCovariance(assume_centered)
    of train - u sorted by decreasing eigenvalue, those after the first ``dim``."""
    u = -np.linalg.pinv(w) @ b
    cov = EmpiricalCovariance(assume_centered=True).fit(train - u).covariance_
    vals, vecs = np.linalg.eigh(cov)
    ns = vecs[:, np.argsort(-vals)[dim:]]
    return -np.linalg.norm((test - u) @ ns, axis=-1)


def test_residual_matches_openood_formula(net: LinearHeadNet) -> None:
    x, test = _data(), _data(50, seed=3) * 1.5
    det = _fit(Residual(dim=5), net, x)
    fc = net.get_classifier()
    w, b = fc.weight.detach().double().numpy(), fc.bias.detach().double().numpy()
    ref = _openood_residual(x.double().numpy(), test.double().numpy(), w, b, 5)
    np.testing.assert_allclose(_score(det, test).numpy(), ref, rtol=1e-9, atol=1e-9)
    assert int(det.principal_dim) == 5
    assert tuple(det.residual_basis.shape) == (Q, Q - 5)


def test_residual_is_vims_virtual_logit_over_alpha(net: LinearHeadNet) -> None:
    x, test = _data(), _data(30, seed=4)
    res, vim = Residual(dim=6), ViM(dim=6)
    engine.fit_from_loader(
        [res, vim], net, list(zip(x.split(60), torch.zeros(N).long().split(60), strict=True))
    )
    expected = -vim.virtual_logit(test) / vim.alpha
    torch.testing.assert_close(_score(res, test), expected, rtol=1e-9, atol=1e-9)


def test_residual_default_dim_and_refusals(net: LinearHeadNet) -> None:
    det = _fit(Residual(), net, _data())
    assert int(det.principal_dim) == Q // 2  # ViM's default_dim for q < 768
    with pytest.raises(InvalidConfiguration, match="dim=12 must lie in"):
        _fit(Residual(dim=Q), net, _data())
    with pytest.raises(ValueError, match="dim"):
        Residual(dim=0)
    with pytest.raises(ValueError, match=r"shape \(B, 12\)"):
        _score(det, torch.zeros(2, 5))


def test_residual_streamed_threaded_ranks_and_round_trip(
    net: LinearHeadNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, test = _data(), _data(20, seed=5)
    one = _fit(Residual(dim=4), net, x, batch=N)
    streamed = _fit(Residual(dim=4), net, x, batch=7)
    torch.testing.assert_close(_score(streamed, test), _score(one, test), rtol=1e-10, atol=1e-10)

    def fit(rank: int, reducer: Reducer) -> Residual:
        det = Residual(dim=4)
        xs = shard(x, rank, 2)
        det.reset()
        for chunk in xs.split(32):
            det.update(BackboneOutput(chunk, chunk.new_zeros(len(chunk), L)), torch.zeros(0))
        det.finalize(net, reducer)
        return det

    for det in run_ranks(2, fit, monkeypatch):
        torch.testing.assert_close(_score(det, test), _score(one, test), rtol=1e-10, atol=1e-10)
    fresh = Residual(dim=4)
    fresh.load_state_dict(one.state_dict())
    assert "outer" not in one.state_dict()  # accumulators stay out of checkpoints
    torch.testing.assert_close(_score(fresh, test), _score(one, test))
