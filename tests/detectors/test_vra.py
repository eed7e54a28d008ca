"""VRA (Xu et al. 2023): the authors' per-unit VRA/VRA+ formula and OpenOOD's global clamp in
numpy, pytorch-ood 0.4.0's VRA, the two-pass exact percentiles, two ranks against one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_ood.detector import VRA as PodVRA
from scipy.special import logsumexp
from threaded_ranks import run_ranks, shard
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine, tuning
from lightning_ood.detectors import DETECTORS
from lightning_ood.detectors.base import Detector, InvalidConfiguration, Reducer
from lightning_ood.detectors.vra import VRA

N, Q, L = 400, 12, 4


@pytest.fixture(scope="module")
def net() -> LinearHeadNet:
    g = torch.Generator().manual_seed(3)
    return LinearHeadNet(torch.randn(L, Q, generator=g), torch.randn(L, generator=g)).eval()


def _feats(n: int, seed: int) -> Tensor:
    """ReLU-like activations: a third exactly 0, the rest log-normal with per-unit scales."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, Q, generator=g).exp() * torch.linspace(0.5, 3.0, Q)
    return h * (torch.rand(n, Q, generator=g) > 0.33)


def _fit(det: Detector, net: LinearHeadNet, x: Tensor, batch: int = 64) -> Detector:
    y = torch.zeros(len(x), dtype=torch.long)
    engine.fit_from_loader([det], net, list(zip(x.split(batch), y.split(batch), strict=True)))
    return det


def _energy(net: LinearHeadNet, g: np.ndarray) -> np.ndarray:
    w, b = net.fc.weight.detach().numpy(), net.fc.bias.detach().numpy()
    return logsumexp(g @ w.T + b, axis=1)


@pytest.mark.parametrize(("low", "high", "gamma"), [(60.0, 90.0, 0.0), (60.0, 95.0, 0.6)])
def test_per_unit_equals_the_authors_formula(
    net: LinearHeadNet, low: float, high: float, gamma: float
) -> None:
    """The authors' code: featmin/featmax = per-unit quantiles of the training features, then
    x + λ, 0 where x + λ < featmin + λ, featmax where it exceeds featmax + λ (VRA: λ = 0,
    VRA+: λ > 0), then logsumexp of the head."""
    train, test = _feats(N, 0), _feats(64, 1)
    det = _fit(
        VRA(percentile_low=low, percentile_high=high, gamma=gamma, per_unit=True), net, train
    )
    feat = train.numpy().astype(np.float64)
    fmin, fmax = np.percentile(feat, low, axis=0), np.percentile(feat, high, axis=0)
    x = test.numpy().astype(np.float64) + gamma
    x = np.where(x < fmin + gamma, 0.0, x)
    x = np.where(x > fmax + gamma, np.broadcast_to(fmax, x.shape), x)
    np.testing.assert_allclose(det.low.numpy(), fmin, rtol=1e-6)
    np.testing.assert_allclose(det.high.numpy(), fmax, rtol=1e-6)
    got = det.score(net.extract(test)).numpy()
    np.testing.assert_allclose(got, _energy(net, x), rtol=1e-5)


def test_global_openood_variant_equals_its_formula(net: LinearHeadNet) -> None:
    """OpenOOD v1.5: thresholds over every activation (flattened), clip(min=α, max=β)."""
    train, test = _feats(N, 2), _feats(64, 3)
    det = _fit(VRA(percentile_low=10.0, percentile_high=90.0, variant="openood"), net, train)
    flat = train.numpy().astype(np.float64).flatten()
    lo, hi = np.percentile(flat, 10.0), np.percentile(flat, 90.0)
    assert float(det.low) == pytest.approx(lo, rel=1e-6)
    assert float(det.high) == pytest.approx(hi, rel=1e-6)
    want = _energy(net, np.clip(test.numpy().astype(np.float64), lo, hi))
    np.testing.assert_allclose(det.score(net.extract(test)).numpy(), want, rtol=1e-5)
    # the paper variant zeroes what lies below α instead of lifting it to α
    paper = _fit(VRA(percentile_low=10.0, percentile_high=90.0), net, train)
    t = test.numpy().astype(np.float64)
    g = np.where(t < lo, 0.0, np.where(t > hi, hi, t))
    np.testing.assert_allclose(paper.score(net.extract(test)).numpy(), _energy(net, g), rtol=1e-5)


def test_equals_pytorch_ood(net: LinearHeadNet) -> None:
    """pytorch-ood's VRA clamps every element between its own per-element quantiles (per unit
    for (B, q) features) and scores -energy: our per-unit openood variant, negated."""
    train, test = _feats(N, 4), _feats(64, 5)
    pod = PodVRA(backbone=lambda x: x, head=net.fc, lower_percentile=0.05, upper_percentile=0.9)
    pod.fit_feature_maps(train, torch.zeros(N, dtype=torch.long))
    det = _fit(
        VRA(percentile_low=5.0, percentile_high=90.0, per_unit=True, variant="openood"), net, train
    )
    with torch.no_grad():
        want = -pod.predict_feature_maps(test).numpy()
    np.testing.assert_allclose(det.score(net.extract(test)).numpy(), want, rtol=1e-5)


def test_two_pass_percentiles_equal_the_in_memory_ones(net: LinearHeadNet) -> None:
    train = _feats(N, 6)
    small = _fit(VRA(max_samples=1000), net, train, batch=100)  # 4,800 values: radix
    big = _fit(VRA(), net, train)
    assert small.max_samples == 1000
    assert torch.equal(small.low, big.low) and torch.equal(small.high, big.high)


def test_two_ranks_give_one_process_thresholds(
    net: LinearHeadNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = _feats(N + 1, 7)
    for per_unit in (False, True):
        one = _fit(VRA(per_unit=per_unit), net, train)

        def fit(rank: int, reducer: Reducer, per_unit: bool = per_unit) -> Detector:
            det = VRA(per_unit=per_unit)
            x = shard(train, rank, 2)
            outs = [(net.extract(a), torch.zeros(len(a), dtype=torch.long)) for a in x.split(50)]
            engine.fit_detectors([det], net, outs, reducer)
            return det

        for det in run_ranks(2, fit, monkeypatch):
            torch.testing.assert_close(det.low, one.low, rtol=0, atol=0)
            torch.testing.assert_close(det.high, one.high, rtol=0, atol=0)


def test_config_and_refusals(net: LinearHeadNet) -> None:
    assert DETECTORS["vra"] is VRA
    assert VRA.search_space == {
        "percentile_high": (85, 90, 95, 99),
        "percentile_low": (1, 5, 10, 15),
    }
    with pytest.raises(ValueError, match=r"percentile_low=50\.0 exceeds percentile_high=40\.0"):
        VRA(percentile_low=50.0, percentile_high=40.0)
    with pytest.raises(ValueError, match="gamma > 0"):
        VRA(gamma=0.5, variant="openood")
    with pytest.raises(InvalidConfiguration, match="raise max_samples or use per_unit: false"):
        _fit(VRA(per_unit=True, max_samples=100), net, _feats(N, 8))


@pytest.mark.parametrize("max_samples", [1 << 26, 1000])  # in memory; radix passes
def test_tuning_candidates_share_one_pass(net: LinearHeadNet, max_samples: int) -> None:
    """The percentiles are finalize-only: the four candidates form one accumulation group
    (the radix passes shared too) and each equals a detector fitted alone."""
    x = _feats(N, 9)
    outs = [(net.extract(a), torch.zeros(len(a), dtype=torch.long)) for a in x.split(64)]
    cands = [
        VRA(percentile_low=lo, percentile_high=hi, max_samples=max_samples, name=f"v{lo}_{hi}")
        for lo in (1.0, 10.0)
        for hi in (85.0, 99.0)
    ]
    fitted, groups, invalid = tuning.fit_candidates(cands, net, outs)
    assert groups == 1 and not invalid and len(fitted) == 4
    for det in fitted:
        alone = VRA(
            percentile_low=det.percentile_low,
            percentile_high=det.percentile_high,
            max_samples=max_samples,
        )
        engine.fit_detectors([alone], net, outs)
        assert torch.equal(det.low, alone.low) and torch.equal(det.high, alone.high)
