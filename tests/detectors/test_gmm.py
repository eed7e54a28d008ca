"""GMM: the class-conditional default against pytorch-ood 0.4.0's ``GMM`` (closed form, one
Gaussian per class), OpenOOD v1.5's label-free tied mixture on PCA features written
independently with sklearn/numpy (its score equals ours up to the Gaussian normalising
constant), the buffers against sklearn's ``score_samples``, two threaded ranks against one
process on a sampled bank, refusals, and the checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_ood.detector import GMM as PeerGMM
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from threaded_ranks import run_ranks, shard
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.base import InvalidConfiguration, Reducer
from lightning_ood.detectors.gmm import GMM
from lightning_ood.models.base import BackboneOutput

N, Q, L = 300, 6, 3
NET = LinearHeadNet(torch.randn(L, Q, generator=torch.Generator().manual_seed(1)),
                    torch.zeros(L)).eval()  # fmt: skip


def _data(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Per-class Gaussians with class-specific correlations, two clusters in class 0."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    mix = torch.eye(Q) + 0.4 * torch.randn(L, Q, Q, generator=torch.Generator().manual_seed(2))
    x = torch.einsum("nd,nde->ne", torch.randn(n, Q, generator=g), mix[y]) + 3 * torch.eye(L, Q)[y]
    x[(y == 0) & (torch.arange(n) % 2 == 0)] += 4.0
    return x.double(), y


def _fit(det: GMM, x: Tensor, y: Tensor, batch: int = 64) -> GMM:
    det.reset()
    for xs, ys in zip(x.split(batch), y.split(batch), strict=True):
        det.update(BackboneOutput(xs, xs.new_zeros(len(xs), L)), ys)
    det.finalize(NET)
    return det


def _score(det: GMM, x: Tensor) -> Tensor:
    return det.score(BackboneOutput(x, x.new_zeros(len(x), L)))


def test_gmm_default_matches_pytorch_ood() -> None:
    x, y = _data()
    test = torch.cat([_data(40, 1)[0], _data(40, 2)[0] * 2.0])
    det = _fit(GMM(), x, y)
    assert det.means.shape == (L, Q) and det.prec_chol.shape == (L, Q, Q)
    peer = PeerGMM(None, reg=1e-6).fit_features(x, y)
    torch.testing.assert_close(_score(det, test), -peer.predict_features(test), rtol=1e-9,
                               atol=1e-9)  # fmt: skip


def test_gmm_openood_setting_equals_its_formula_up_to_a_constant() -> None:
    x, y = _data()
    test = torch.cat([_data(40, 3)[0], _data(40, 4)[0] * 2.0])
    det = _fit(GMM(per_class=False, n_components=3, covariance_type="tied", reduce_dim=4), x, y)
    # OpenOOD: PCA(50).components_.T, GaussianMixture(tied, random_state=0), then
    # log(Σ_c w_c exp(-½ (z-μ_c)ᵀ Σ⁻¹ (z-μ_c)) + 1e-45)
    xn, tn = x.numpy(), test.numpy()
    transform = PCA(n_components=4).fit(xn).components_.T
    gm = GaussianMixture(n_components=3, random_state=0, covariance_type="tied")
    gm.fit(xn @ transform)
    z = tn @ transform
    terms = [
        np.exp(-0.5 * np.einsum("bd,de,be->b", z - m, gm.precisions_, z - m)) for m in gm.means_
    ]
    openood = np.log(np.stack(terms, 1) @ gm.weights_ + 1e-45)
    diff = _score(det, test).numpy() - openood
    # the normalising constant of the tied Gaussian: ½ log det Σ⁻¹ - d/2 log 2π
    const = 0.5 * np.linalg.slogdet(gm.precisions_)[1] - 2.0 * np.log(2 * np.pi)
    np.testing.assert_allclose(diff, const, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cov", ["full", "tied", "diag"])
def test_gmm_buffers_score_like_sklearn(cov: str) -> None:
    x, y = _data()
    test = _data(50, 5)[0]
    det = _fit(GMM(per_class=False, n_components=2, covariance_type=cov, seed=3), x, y)
    gm = GaussianMixture(n_components=2, covariance_type=cov, random_state=3).fit(x.numpy())
    np.testing.assert_allclose(_score(det, test).numpy(), gm.score_samples(test.numpy()),
                               rtol=1e-9, atol=1e-9)  # fmt: skip
    if cov != "diag":
        return
    # per class: π_k-weighted class mixtures, log Σ_k π_k p_k(x)
    det = _fit(GMM(n_components=2, covariance_type=cov, seed=3), x, y)
    per = [
        GaussianMixture(n_components=2, covariance_type=cov, random_state=3)
        .fit(x.numpy()[y.numpy() == k])
        .score_samples(test.numpy())
        for k in range(L)
    ]
    ref = np.log(np.exp(np.stack(per, 1)).sum(1) / L)  # balanced classes: π_k = 1/L
    np.testing.assert_allclose(_score(det, test).numpy(), ref, rtol=1e-9, atol=1e-9)


def test_gmm_threaded_ranks_engine_refusals_and_round_trip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x, y = _data()
    test = _data(30, 6)[0]
    one = _fit(GMM(n_components=2, bank_fraction=0.7, seed=1), x, y, batch=N)

    def fit(rank: int, reducer: Reducer) -> GMM:
        det = GMM(n_components=2, bank_fraction=0.7, seed=1)
        det.reset()
        xs, ys = shard(x, rank, 2), shard(y, rank, 2)
        for a, b in zip(xs.split(16), ys.split(16), strict=True):
            det.update(BackboneOutput(a, a.new_zeros(len(a), L)), b)
        det.finalize(NET, reducer)
        return det

    for det in run_ranks(2, fit, monkeypatch):
        torch.testing.assert_close(_score(det, test), _score(one, test), rtol=1e-12, atol=1e-12)
    monkeypatch.undo()  # one process again
    # through the engine (the toy net's features are its inputs)
    det = GMM(n_components=2, bank_fraction=0.7, seed=1)
    engine.fit_from_loader([det], NET, list(zip(x.float().split(50), y.split(50), strict=True)))
    torch.testing.assert_close(_score(det, test), _score(one, test), rtol=1e-5, atol=1e-5)
    fresh = GMM(n_components=2, bank_fraction=0.7, seed=1)
    fresh.load_state_dict(one.state_dict())
    assert sorted(one.state_dict()) == [
        "fitted", "log_weights", "means", "prec_chol", "projection", "threshold", "threshold_tpr"
    ]  # fmt: skip
    torch.testing.assert_close(_score(fresh, test), _score(one, test))
    with pytest.raises(InvalidConfiguration, match="class 0 has 100 training features"):
        _fit(GMM(n_components=101), x, y)
    with pytest.raises(InvalidConfiguration, match="reduce_dim=7 exceeds the feature width 6"):
        _fit(GMM(reduce_dim=7), x, y)
    with pytest.raises(ValueError, match="bank_fraction"):
        GMM(bank_fraction=0.0)
