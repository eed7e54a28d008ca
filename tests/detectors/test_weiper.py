"""WeiPer+KLD (Granz et al., NeurIPS 2024): the score against an independent numpy
re-implementation of the authors' formula (``weiper_kldiv/utils.py``: per-sample histograms
with outer ±inf bins, the replicate-padded uniform smoothing of the test density, the
symmetric KL divergence, MSP over the perturbed heads), the perturbation's geometry (Eq. 1),
seeding, and two threaded ranks fitting like one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threaded_ranks import run_ranks, shard
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.base import Reducer
from lightning_ood.detectors.weiper import WeiPer

N, Q, L = 240, 12, 3
SMALL = {"n_repeats": 5, "n_bins": 20, "smoothing": 4, "smoothing_perturbed": 5}


def _data(n: int = N, seed: int = 0, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    x = torch.relu(torch.randn(n, Q, generator=g, dtype=torch.float64) + 2.0 * torch.eye(L, Q)[y])
    return x + shift, y


@pytest.fixture(scope="module")
def net() -> LinearHeadNet:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(L, Q, generator=g, dtype=torch.float64)
    return LinearHeadNet(w, torch.randn(L, generator=g, dtype=torch.float64)).eval()


def _fit(det: WeiPer, net: LinearHeadNet, x: Tensor, y: Tensor, batch: int = 64) -> WeiPer:
    outputs = [(net.extract(a), b) for a, b in zip(x.split(batch), y.split(batch), strict=True)]
    engine.fit_detectors([det], net, outputs)
    return det


# -- the reference formula, in numpy ----------------------------------------------------------
def _ref_density(values: np.ndarray, lo: float, hi: float, n_bins: int) -> np.ndarray:
    """batch_histogram(..., bins_min_max=(lo, hi), probability=True) of each row: bins
    linspace(lo, hi + 1e-8) with -inf/+inf outer bins, fractions of the row's values, outer
    bins dropped after normalising over all of them. (n_samples, n_bins)."""
    edges = np.concatenate([[-np.inf], np.linspace(lo, hi + 1e-8, n_bins + 1), [np.inf]])
    ind = (values[:, None, :] < edges[1:, None]) & (values[:, None, :] >= edges[:-1, None])
    dens = ind.mean(axis=2)  # (n, n_bins + 2)
    return dens[:, 1:-1] / dens.sum(axis=1, keepdims=True)


def _ref_smooth(d: np.ndarray, s: int) -> np.ndarray:
    """UniformKernel: Conv1d(kernel s, padding='same', replicate), weights 1/s."""
    left = (s - 1) // 2
    padded = np.concatenate(
        [np.repeat(d[:, :1], left, 1), d, np.repeat(d[:, -1:], s - 1 - left, 1)], 1
    )
    return np.stack([padded[:, i : i + s].mean(axis=1) for i in range(d.shape[1])], axis=1)


def _ref_kldiv(p: np.ndarray, q: np.ndarray, s: int, eps: float) -> np.ndarray:
    """kldiv(p = train mean, q = test densities, kernel, symmetric=True)."""
    q_ = _ref_smooth(q, s) + eps
    p_ = p + eps
    p_, q_ = p_ / p_.sum(), q_ / q_.sum(axis=1, keepdims=True)
    log_ratio = np.log(q_) - np.log(p_)
    return -(p_ * log_ratio).sum(axis=1) - (q_ * -log_ratio).sum(axis=1)


def _ref_score(det: WeiPer, x_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    w_t = det.weight_perturbed.double().numpy()
    b_t = det.bias_perturbed.double().numpy()
    z_train, z = x_train @ w_t.T + b_t, x @ w_t.T + b_t
    nb = det.n_bins
    lo, hi = x_train.min(), x_train.max()
    lo_w, hi_w = z_train.min(), z_train.max()
    p = _ref_density(x_train, lo, hi, nb).mean(axis=0)
    p_w = _ref_density(z_train, lo_w, hi_w, nb).mean(axis=0)
    kl = _ref_kldiv(p, _ref_density(x, lo, hi, nb), det.smoothing, det.epsilon)
    kl_w = _ref_kldiv(
        p_w, _ref_density(z, lo_w, hi_w, nb), det.smoothing_perturbed, det.epsilon_perturbed
    )
    c = det.weight.shape[0]
    zr = z.reshape(len(z), -1, c)
    prob = np.exp(zr - zr.max(axis=2, keepdims=True))
    prob /= prob.sum(axis=2, keepdims=True)
    msp = prob.max(axis=2).mean(axis=1)
    return -(kl + det.lambda_1 * kl_w - det.lambda_2 * msp)


@pytest.mark.parametrize("extra", [{}, {"lambda_1": 0.1, "lambda_2": 5.0, "smoothing": 1}])
def test_weiper_matches_the_reference_formula_in_numpy(net: LinearHeadNet, extra: dict) -> None:
    x, y = _data()
    det = _fit(WeiPer(**{**SMALL, **extra}), net, x, y)
    test = torch.cat([_data(40, seed=3)[0], _data(40, seed=4, shift=0.7)[0], -_data(8, 5)[0]])
    got = engine.score_batch({"w": det}, net.extract(test))["w"]
    want = _ref_score(det, x.numpy(), test.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    # the training densities are the mean per-sample histograms (each sums to <= 1)
    assert float(det.density.sum()) == pytest.approx(1.0)
    assert float(det.density_perturbed.sum()) == pytest.approx(1.0)


def test_perturbation_is_eq1_and_seeded(net: LinearHeadNet) -> None:
    """Each perturbed row is w_c moved by exactly δ‖w_c‖; the draw depends on the seed only."""
    x, y = _data()
    a = _fit(WeiPer(**SMALL, perturbation_distance=2.0, seed=7), net, x, y)
    b = _fit(WeiPer(**SMALL, perturbation_distance=2.0, seed=7), net, x[:100], y[:100], batch=9)
    c = _fit(WeiPer(**SMALL, perturbation_distance=2.0, seed=8), net, x, y)
    w = net.fc.weight.detach()
    moved = a.weight_perturbed.reshape(SMALL["n_repeats"], L, Q) - w
    torch.testing.assert_close(moved.norm(dim=2), 2.0 * w.norm(dim=1).expand(5, L))
    torch.testing.assert_close(a.bias_perturbed, net.fc.bias.detach().repeat(5))
    assert torch.equal(a.weight_perturbed, b.weight_perturbed)
    assert not torch.equal(a.weight_perturbed, c.weight_perturbed)


def test_ood_scores_lower(net: LinearHeadNet) -> None:
    """A shifted set scores below held-out ID samples (AUROC > 0.9 on the toy)."""
    x, y = _data()
    det = _fit(WeiPer(**SMALL), net, x, y)
    s_id = engine.score_batch({"w": det}, net.extract(_data(200, seed=3)[0]))["w"]
    s_ood = engine.score_batch({"w": det}, net.extract(_data(200, seed=4, shift=1.5)[0]))["w"]
    auroc = (s_id[:, None] > s_ood[None, :]).double().mean()
    assert float(auroc) > 0.9


def test_two_ranks_fit_like_one_process(
    net: LinearHeadNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranges gathered, histograms summed: every rank's buffers equal one process's."""
    x, y = _data()
    one = _fit(WeiPer(**SMALL), net, x, y)

    def fit(rank: int, reducer: Reducer) -> WeiPer:
        det = WeiPer(**SMALL)
        xs, ys = shard(x, rank, 2), shard(y, rank, 2)
        outputs = [(net.extract(a), b) for a, b in zip(xs.split(16), ys.split(16), strict=True)]
        engine.fit_detectors([det], net, outputs, reducer)
        return det

    for det in run_ranks(2, fit, monkeypatch):
        for key, want in one.state_dict().items():
            torch.testing.assert_close(det.get_buffer(key), want, equal_nan=True)


def test_finalize_without_the_second_pass_is_refused(net: LinearHeadNet) -> None:
    x, y = _data()
    det = WeiPer(**SMALL)
    det.reset()
    det.update(net.extract(x), y, net)
    with pytest.raises(RuntimeError, match="two passes"):
        det.finalize(net)
