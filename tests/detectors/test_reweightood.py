"""ReweightOOD's test-time score (Regmi et al., CVPRW 2024): against OpenOOD v1.5's
``reweightood_postprocessor.py`` formula re-written with sklearn (class means and an
``EmpiricalCovariance`` of the class-centred normalised features, max over classes of minus the
squared Mahalanobis distance), against pytorch-ood 0.4.0's Mahalanobis on the same normalised
features, and two threaded ranks fitting like one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fit_toys import fit_on, fit_two_ranks, head_net
from sklearn.covariance import EmpiricalCovariance
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.reweightood import ReweightOOD

N, Q, L = 300, 6, 3


def _data(n: int = N, seed: int = 0, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    x = torch.randn(n, Q, generator=g, dtype=torch.float64) + 3.0 * torch.eye(L, Q)[y]
    return x + shift, y


@pytest.fixture(scope="module")
def net() -> LinearHeadNet:
    return head_net(L, Q)


def _openood(x_train: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """OpenOOD's setup + postprocess on z = x/‖x‖."""

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    z, zt = unit(x_train), unit(x)
    means = np.stack([z[y == c].mean(axis=0) for c in range(L)])
    centred = np.concatenate([z[y == c] - means[c] for c in range(L)])
    precision = EmpiricalCovariance(assume_centered=False).fit(centred).precision_
    scores = np.stack([-(((zt - m) @ precision) * (zt - m)).sum(axis=1) for m in means], axis=1)
    return scores.max(axis=1)


def test_reweightood_matches_openood_formula_with_sklearn(net: LinearHeadNet) -> None:
    x, y = _data()
    det = fit_on(ReweightOOD(), net, x, y)
    test = torch.cat([_data(50, seed=3)[0], _data(50, seed=4, shift=2.0)[0]])
    got = engine.score_batch({"r": det}, net.extract(test))["r"]
    want = _openood(x.numpy(), y.numpy(), test.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


def test_reweightood_matches_pytorch_ood_mahalanobis_on_normalised_features(
    net: LinearHeadNet,
) -> None:
    """pytorch-ood sums the centred outer products without dividing by N (plus a 1e-6 ridge)
    and halves the distance: its outlier score is d²/(2N)."""
    from pytorch_ood.detector import Mahalanobis as PoodMahalanobis

    x, y = _data()
    det = fit_on(ReweightOOD(), net, x, y)
    test = torch.cat([_data(50, seed=3)[0], _data(50, seed=4, shift=2.0)[0]])
    unit = lambda a: a / a.norm(dim=1, keepdim=True)  # noqa: E731
    pood = PoodMahalanobis(None).fit_features(unit(x).float(), y)
    ref = pood.predict_features(unit(test).float())
    got = engine.score_batch({"r": det}, net.extract(test))["r"]
    torch.testing.assert_close(-got / (2 * N), ref.double(), rtol=1e-4, atol=1e-6)


def test_normalize_false_is_plain_mahalanobis(net: LinearHeadNet) -> None:
    x, y = _data()
    det = fit_on(ReweightOOD(normalize=False), net, x, y)
    d = x.numpy()
    means = np.stack([d[y.numpy() == c].mean(axis=0) for c in range(L)])
    cov = sum((d[y.numpy() == c] - means[c]).T @ (d[y.numpy() == c] - means[c]) for c in range(L))
    prec = np.linalg.inv(cov / N)
    t = _data(20, seed=5)[0].numpy()
    want = np.max([-(((t - m) @ prec) * (t - m)).sum(axis=1) for m in means], axis=0)
    got = engine.score_batch({"r": det}, net.extract(torch.from_numpy(t)))["r"]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)


def test_two_ranks_fit_like_one_process(
    net: LinearHeadNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = _data()
    one = fit_on(ReweightOOD(), net, x, y)

    for det in fit_two_ranks(lambda: ReweightOOD(), net, x, y, monkeypatch, 32):
        torch.testing.assert_close(det.means, one.means, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(det.precision, one.precision, rtol=1e-9, atol=1e-9)


def test_a_class_without_training_samples_is_refused(net: LinearHeadNet) -> None:
    x, y = _data()
    keep = y != 2
    with pytest.raises(ValueError, match=r"classes \[2\] have no training samples"):
        fit_on(ReweightOOD(), net, x[keep], y[keep])
