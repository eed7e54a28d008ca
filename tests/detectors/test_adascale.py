"""AdaSCALE (Regmi 2025): the score against OpenOOD's ``adascale_postprocessor.py`` +
``adascale_net.py`` re-written independently (top-k by ``torch.topk``, the perturbation of the
``int(CHW·o)`` smallest-gradient entries, statsmodels' right-continuous ECDF in numpy, the
masked top-k ratio), for both variants; the seeded fitting sample (independent of batching
and of the world size). Fitting is driven by hand (``update(..., inputs=)``): the engine's
training pass does not hand inputs to detectors yet (docs/methods.md#adascale)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threaded_ranks import run_ranks, shard
from torch import Tensor, nn

from lightning_ood.detectors.adascale import PERCENTILE_PAIRS, AdaScale, scale_ratio
from lightning_ood.detectors.base import Reducer
from lightning_ood.models.base import OODBackbone

C, H, W, Q, L = 2, 6, 6, 20, 4


class ConvNet(OODBackbone):
    """conv - tanh - linear features (no ReLU: no ties among the top activations) - head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, 3, 3, padding=1, dtype=torch.float64)
        self.fc = nn.Linear(3 * H * W, Q, dtype=torch.float64)
        self.head = nn.Linear(Q, L, dtype=torch.float64)
        self.num_classes, self.num_features, self.input_shape = L, Q, (C, H, W)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1)) + 0.5

    def get_classifier(self) -> nn.Linear:
        return self.head


@pytest.fixture(scope="module")
def net() -> ConvNet:
    torch.manual_seed(3)
    return ConvNet().eval()


def _x(n: int, seed: int, shift: float = 0.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, H, W, generator=g, dtype=torch.float64) + shift


def _fit(det: AdaScale, net: ConvNet, x: Tensor, batch: int = 16) -> AdaScale:
    det.reset()
    for xb in x.split(batch):
        with torch.no_grad():
            out = net.extract(xb)
        det.update(out, out.logits.argmax(dim=1), net, inputs=xb)
    det.finalize(net)
    return det


# -- OpenOOD, re-written ---------------------------------------------------------------------
def _ref_perturbed(net: ConvNet, x: Tensor, o: float) -> tuple[Tensor, Tensor]:
    data = x.clone().requires_grad_(True)
    out = net.extract(data)
    labels = out.logits.detach().argmax(dim=1)
    out.logits[torch.arange(len(labels)), labels].backward(torch.ones(len(labels)))
    grad = data.grad.detach()
    b = x.shape[0]
    n_pixels = int(C * H * W * o)
    _, idx = torch.topk(grad.abs().view(b, -1), n_pixels, dim=1, largest=False)
    mask = torch.zeros(b, C * H * W, dtype=torch.uint8).scatter_(1, idx, 1).view_as(x)
    with torch.no_grad():
        h_pert = net.extract(x + grad.sign() * mask * 0.5).features
    return out.features.detach(), h_pert


def _ref_sum_log(h: Tensor, hp: Tensor, k1: float, k2: float, lmbda: float) -> np.ndarray:
    k1_, k2_ = int(Q * k1 / 100), int(Q * k2 / 100)
    c_o = torch.gather(torch.relu(hp), 1, torch.topk(h, dim=1, k=k1_)[1]).sum(dim=1)
    shift = torch.gather((h - hp).abs(), 1, torch.topk(h, dim=1, k=k2_)[1]).sum(dim=1)
    return (c_o + lmbda * shift).numpy()


def _ref_ada_scale(x: Tensor, percentiles: Tensor) -> Tensor:
    n = x.shape[1]
    ks = n - torch.round(n * percentiles / 100.0).to(torch.int)
    values, _ = torch.topk(x, int(ks.max()), dim=1)
    mask = torch.arange(int(ks.max()))[None, :] < ks[:, None]
    return x.sum(dim=1, keepdim=True) / (values * mask).sum(dim=1, keepdim=True)


def _openood(det: AdaScale, net: ConvNet, x_fit: Tensor, x: Tensor) -> np.ndarray:
    h, hp = _ref_perturbed(net, x_fit, det.o)
    fit_log = np.sort(_ref_sum_log(h, hp, det.k1, det.k2, det.lmbda))
    h, hp = _ref_perturbed(net, x, det.o)
    stat = _ref_sum_log(h, hp, det.k1, det.k2, det.lmbda)
    ecdf = np.searchsorted(fit_log, stat, side="right") / len(fit_log)  # statsmodels' ECDF
    lo, hi = det.percentiles
    percentile = torch.from_numpy(lo + (1 - ecdf) * (hi - lo))
    scale = _ref_ada_scale(torch.relu(h), percentile)
    fc = net.get_classifier()
    with torch.no_grad():
        logits = fc(h) * scale**2.0 if det.variant == "l" else fc(h * torch.exp(scale))
    return torch.logsumexp(logits, dim=1).numpy()


@pytest.mark.parametrize("variant", ["a", "l"])
def test_adascale_matches_openood_formula(net: ConvNet, variant: str) -> None:
    det = _fit(AdaScale(variant=variant, k1=25.0, k2=10.0, num_samples=1000), net, _x(48, 0))
    test = torch.cat([_x(16, 1), _x(16, 2, shift=1.5)])
    with torch.no_grad():
        out = net.extract(test)
    got = det.score(out, net, test)
    want = _openood(det, net, _x(48, 0), test)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10)


def test_scale_ratio_is_the_reference_ratio_and_zero_rows_give_zero() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(12, 30, generator=g, dtype=torch.float64))
    p = torch.linspace(60, 98, 12, dtype=torch.float64)
    torch.testing.assert_close(scale_ratio(a, p), _ref_ada_scale(a, p))
    # 30 * 99 % rounds to 30: the reference's empty top-k gives inf, here k = 1
    assert bool(torch.isinf(_ref_ada_scale(a[:1], torch.tensor([99.0], dtype=torch.float64))))
    want = a[:1].sum() / a[:1].max()
    torch.testing.assert_close(scale_ratio(a[:1], torch.tensor([99.0]))[0, 0], want)
    assert float(scale_ratio(torch.zeros(1, 30), torch.tensor([80.0]))) == 0.0


def test_fitting_sample_is_seeded_and_independent_of_batching(net: ConvNet) -> None:
    """num_samples < N: the samples of smallest seeded draw by position, whatever the batches."""
    x = _x(64, 0)
    a = _fit(AdaScale(k1=25.0, k2=10.0, num_samples=20, seed=5), net, x, batch=16)
    b = _fit(AdaScale(k1=25.0, k2=10.0, num_samples=20, seed=5), net, x, batch=7)
    assert a.reference.shape == (20,)
    torch.testing.assert_close(a.reference, b.reference, rtol=1e-12, atol=0)


def test_two_ranks_fit_like_one_process(net: ConvNet, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _x(64, 0)
    one = _fit(AdaScale(k1=25.0, k2=10.0, num_samples=20, seed=5), net, x)

    def fit(rank: int, reducer: Reducer) -> AdaScale:
        det = AdaScale(k1=25.0, k2=10.0, num_samples=20, seed=5)
        det.reset()
        for xb in shard(x, rank, 2).split(9):
            with torch.no_grad():
                out = net.extract(xb)
            det.update(out, out.logits.argmax(dim=1), net, inputs=xb)
        det.finalize(net, reducer)
        return det

    for det in run_ranks(2, fit, monkeypatch):
        torch.testing.assert_close(det.reference, one.reference, rtol=1e-12, atol=0)


def test_declarations_and_clear_errors(net: ConvNet) -> None:
    assert AdaScale.search_space["percentiles"] == PERCENTILE_PAIRS
    assert len(PERCENTILE_PAIRS) == 36 and (75.0, 85.0) in PERCENTILE_PAIRS
    assert AdaScale.finalize_only == {"percentiles", "variant"}
    with pytest.raises(ValueError, match="p_min <= p_max"):
        AdaScale(percentiles=[90, 80])
    det = AdaScale()
    det.reset()
    with torch.no_grad():
        out = net.extract(_x(4, 0))
    with pytest.raises(ValueError, match="needs model= and inputs="):
        det.update(out, out.logits.argmax(dim=1), net)
