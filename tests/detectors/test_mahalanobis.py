"""Mahalanobis (Lee et al. 2018): streamed class means / tied covariance against numpy and
sklearn, scores against a per-class numpy loop, spatial pooling, DDP reduction, input
pre-processing against an autograd oracle, and the layer ensemble."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.linear_model import LogisticRegressionCV
from torch import Tensor, nn

from lightning_ood import engine
from lightning_ood.detectors import Reducer, build_detector
from lightning_ood.detectors.mahalanobis import Mahalanobis
from lightning_ood.models.base import BackboneOutput, OODBackbone

L, C = 3, 4


class ToyNet(OODBackbone):
    """conv(2->3) - tanh [tap "conv", (B, 3, 4, 4)] - mean pool - fc(3->4) - tanh - fc(4->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.Tanh()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)
        self.num_classes, self.num_features, self.input_shape = 3, 4, (2, 4, 4)
        self.tap_layers = {"conv": "act"}

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(self.act(self.conv(x)).mean((2, 3))))

    def get_classifier(self) -> nn.Linear:
        return self.head

    def by_hand(self, x: Tensor) -> dict[str, Tensor]:
        conv = torch.tanh(self.conv(x))
        feats = torch.tanh(self.fc(conv.mean((2, 3))))
        return {"conv": conv, "features": feats, "logits": self.head(feats)}


def _toy_data(n: int = 90, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Class-shifted Gaussians with a correlated covariance."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    mix = torch.tensor([[1.0, 0.3, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0], [0.2, 0, 1, 0], [0, 0, 0.4, 1]])
    x = torch.randn(n, C, generator=g) @ mix + 2.0 * torch.eye(L, C)[y]
    return x, y


#: A fixed linear head for the synthetic outputs (logits = features @ HEAD).
HEAD = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5], [0.3, 0.0, 1.0], [0.0, -0.4, 0.2]])


def _out(features: Tensor, taps: dict[str, Tensor] | None = None) -> BackboneOutput:
    return BackboneOutput(features, features @ HEAD, taps or {})


def _fit(det: Mahalanobis, x: Tensor, y: Tensor, batches: int = 3, **taps: Tensor) -> Mahalanobis:
    """Fit ``det`` through the engine on synthetic outputs of ``x`` (and ``taps``), in
    ``batches`` chunks."""
    chunks = torch.arange(len(x)).chunk(batches)
    outputs = [(_out(x[i], {k: v[i] for k, v in taps.items()}), y[i]) for i in chunks]
    engine.fit_detectors([det], ToyNet(), outputs)
    return det


def _numpy_fit(x: np.ndarray, y: np.ndarray, n: int = L) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the pooled within-class covariance, sum_k (n_k - 1) cov_k / N."""
    means = np.stack([x[y == k].mean(0) for k in range(n)])
    cov = sum((np.sum(y == k) - 1) * np.cov(x[y == k].T) for k in range(n)) / len(x)
    return means, cov


def _numpy_scores(x: np.ndarray, means: np.ndarray, prec: np.ndarray) -> np.ndarray:
    d = np.stack([np.einsum("bi,ij,bj->b", x - m, prec, x - m) for m in means], 1)
    return -d.min(1)


def test_means_covariance_precision_match_numpy_and_sklearn() -> None:
    x, y = _toy_data()
    det = _fit(Mahalanobis(), x, y)
    assert det.taps == ("features",) and det.is_fitted
    means, cov = _numpy_fit(x.double().numpy(), y.numpy())
    np.testing.assert_allclose(det.means(0).numpy(), means, rtol=1e-12)
    np.testing.assert_allclose(det.covariance(0).numpy(), cov, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(det.precision(0).numpy(), np.linalg.pinv(cov), rtol=1e-8)
    # the reference: sklearn EmpiricalCovariance on class-centred features
    centred = x.double().numpy() - means[y.numpy()]
    sk = EmpiricalCovariance(assume_centered=False).fit(centred)
    np.testing.assert_allclose(det.precision(0).numpy(), sk.precision_, rtol=1e-8)
    assert det.means(0).dtype == torch.float64


def test_scores_match_a_per_class_numpy_loop() -> None:
    x, y = _toy_data()
    det = _fit(Mahalanobis(), x, y)
    xt = torch.randn(7, C) * 3
    got = det.score(_out(xt))
    assert got.shape == (7,) and got.dtype == torch.float32
    want = _numpy_scores(xt.double().numpy(), det.means(0).numpy(), det.precision(0).numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    # hand case: at a class mean the score is 0, the maximum
    assert det.score(_out(det.means(0).float())).abs().max() < 1e-5


def test_conv_taps_are_spatially_mean_pooled() -> None:
    x, y = _toy_data()
    g = torch.Generator().manual_seed(3)
    spatial = x[:, :, None, None] + torch.randn(len(x), C, 3, 5, generator=g)
    det = _fit(Mahalanobis(taps=["conv", "features"]), x, y, conv=spatial)
    pooled = spatial.double().mean((2, 3)).numpy()
    means, cov = _numpy_fit(pooled, y.numpy())
    # pooling runs in the tap's float32, the statistics in float64
    np.testing.assert_allclose(det.means(0).numpy(), means, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(det.covariance(0).numpy(), cov, rtol=1e-6, atol=1e-7)
    comps = det.score_components(_out(x[:5], {"conv": spatial[:5]}))
    want = _numpy_scores(pooled[:5], means, np.linalg.pinv(cov))
    np.testing.assert_allclose(comps[:, 0].numpy(), want, rtol=1e-6)
    # no combiner fitted: the default (last) component
    assert torch.equal(det.score(_out(x[:5], {"conv": spatial[:5]})), comps[:, 1])


class _PairReducer(Reducer):
    """Sums each tensor with the other rank's tensor of the same call order."""

    def __init__(self, other: list[Tensor] | None = None) -> None:
        self.other, self.seen = other, []

    def sum(self, t: Tensor) -> Tensor:
        self.seen.append(t.clone())
        return t if self.other is None else t + self.other[len(self.seen) - 1]


class _Doubling(Reducer):
    def sum(self, t: Tensor) -> Tensor:
        return 2 * t


def test_finalize_reduces_sums_across_ranks() -> None:
    x, y = _toy_data(91)
    full = _fit(Mahalanobis(), x, y)
    # update/finalize called directly: each rank's sums meet a hand-made reducer, twice below
    rank1 = Mahalanobis()
    for idx in torch.arange(50, 91).chunk(2):
        rank1.update(_out(x[idx]), y[idx])
    recorder = _PairReducer()
    rank1.finalize(ToyNet(), recorder)
    rank0 = Mahalanobis()
    rank0.update(_out(x[:50]), y[:50])
    rank0.finalize(ToyNet(), _PairReducer(recorder.seen))
    torch.testing.assert_close(rank0.means(0), full.means(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rank0.precision(0), full.precision(0), rtol=1e-9, atol=1e-9)
    # duplicating every sum (two identical ranks) leaves means and covariance unchanged
    doubled = Mahalanobis()
    doubled.update(_out(x), y)
    doubled.finalize(ToyNet(), _Doubling())
    torch.testing.assert_close(doubled.covariance(0), full.covariance(0), rtol=1e-10, atol=1e-12)
    # finalize leaves the local sums alone, so calling it again gives the same result
    doubled.finalize(ToyNet(), _Doubling())
    torch.testing.assert_close(doubled.means(0), full.means(0), rtol=1e-12, atol=1e-12)


def test_state_dict_loads_into_a_fresh_instance_bit_identically() -> None:
    x, y = _toy_data()
    det = _fit(Mahalanobis(taps=["features", "logits"]), x, y, batches=2)
    det.fit_combiner(-torch.rand(40, 2), -torch.rand(40, 2) - 0.5)
    state = det.state_dict()
    assert not any(k.startswith(("class_sum", "outer", "covariance", "class_count")) for k in state)
    fresh = Mahalanobis(taps=["features", "logits"])
    fresh.load_state_dict(state)
    out = _out(x[:6])
    assert torch.equal(fresh.score(out), det.score(out))
    assert torch.equal(fresh.score_components(out), det.score_components(out))


def _oracle_preprocessed(
    model: ToyNet, det: Mahalanobis, x: Tensor, eps: float, std: Tensor
) -> np.ndarray:
    cols = []
    for i, t in enumerate(det.taps):
        mu, prec = det.means(i), det.precision(i)
        xg = x.clone().requires_grad_(True)
        f = model.by_hand(xg)[t]
        f = (f.mean((2, 3)) if f.ndim == 4 else f).double()
        d_all = torch.stack([(((f - m) @ prec) * (f - m)).sum(1) for m in mu], 1)
        k = d_all.detach().argmin(1)
        d = torch.stack([d_all[b, k[b]] for b in range(len(x))])
        (g,) = torch.autograd.grad(0.5 * d.mean(), xg)  # the reference's loss
        sign = (torch.ge(g, 0).float() - 0.5) * 2
        xt = x - eps * sign / std.view(1, -1, 1, 1)
        with torch.no_grad():
            ft = model.by_hand(xt)[t]
            ft = (ft.mean((2, 3)) if ft.ndim == 4 else ft).double().numpy()
        cols.append(_numpy_scores(ft, mu.numpy(), prec.numpy()))
    return np.stack(cols, 1)


def test_input_preprocessing_matches_autograd_oracle_and_raises_the_score() -> None:
    torch.manual_seed(0)
    model = ToyNet().eval()
    xs, ys = torch.randn(60, 2, 4, 4), torch.arange(60) % L
    with torch.no_grad():
        train = model.extract(xs, taps=["conv"])
    fitted = {
        eps: Mahalanobis(taps=["conv", "features"], epsilon=eps, input_std=[0.5, 0.25])
        for eps in (0.0, 0.01)
    }
    engine.fit_detectors(fitted.values(), model, [(train, ys)])
    assert fitted[0.01].needs_input_grad and not fitted[0.0].needs_input_grad
    x = torch.randn(6, 2, 4, 4)
    with torch.no_grad():
        out = model.extract(x, taps=["conv"])
    got = fitted[0.01].score_components(out, model, x)
    want = _oracle_preprocessed(model, fitted[0.01], x, 0.01, torch.tensor([0.5, 0.25]))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    # moving toward the closest class raises every score (to first order)
    assert (got > fitted[0.0].score_components(out)).all()
    with pytest.raises(ValueError, match="need `model` and `inputs`"):
        fitted[0.01].score_components(out)


def test_layer_ensemble_matches_sklearn_decision_function() -> None:
    x, y = _toy_data()
    det = _fit(Mahalanobis(taps=["features", "logits"]), x, y)
    g = torch.Generator().manual_seed(2)
    cid, cood = -torch.rand(50, 2, generator=g), -torch.rand(50, 2, generator=g) * 3 - 0.2
    det.fit_combiner(cid, cood)
    comps = torch.cat([cid, cood]).double().numpy()
    labels = np.r_[np.ones(50), np.zeros(50)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        oracle = LogisticRegressionCV(random_state=42, max_iter=1000).fit(comps, labels)
    np.testing.assert_allclose(
        det.combine(torch.cat([cid, cood])).numpy(), oracle.decision_function(comps), rtol=1e-5
    )


def test_config_and_registry() -> None:
    det = Mahalanobis(epsilon=0.001, input_std=0.5, name="maha")
    cfg = det.config()
    assert cfg == {
        "type": "mahalanobis",
        "taps": None,
        "epsilon": 0.001,
        "input_std": 0.5,
        "combiner": "cv",
        "standardize": False,
        "default_layer": -1,
        "name": "maha",
    }
    assert build_detector("maha", cfg).config() == cfg
    assert Mahalanobis.requires_fit and Mahalanobis.uses_training_data


def test_bad_fits_and_hyperparameters_are_explained() -> None:
    x, y = _toy_data()
    # update/finalize called directly: the test is the error each of them raises
    with pytest.raises(RuntimeError, match="before any update"):
        Mahalanobis().finalize(ToyNet())
    det = Mahalanobis()
    det.update(_out(x), torch.where(y == 2, 0, y))
    with pytest.raises(ValueError, match=r"classes \[2\] have no training samples"):
        det.finalize(ToyNet())
    with pytest.raises(ValueError, match="label 3"):
        Mahalanobis().update(_out(x), y + 1)
    fitted = _fit(Mahalanobis(), x, y)
    with pytest.raises(ValueError, match="refit"):
        fitted.score(BackboneOutput(torch.randn(2, C + 1), torch.randn(2, L)))
    with pytest.raises(ValueError, match="epsilon"):
        Mahalanobis(epsilon=-1.0)
    with pytest.raises(ValueError, match="combiner"):
        Mahalanobis(combiner="forest")
    with pytest.raises(RuntimeError, match="not fitted"):
        Mahalanobis().score(_out(x))


def test_lenet_on_fashion_mnist_matches_numpy(shared_data: Path) -> None:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    from lightning_ood.models import create_model

    raw = shared_data / "FashionMNIST" / "raw"
    imgs = read_image_file(str(raw / "train-images-idx3-ubyte"))[:600]
    labels = read_label_file(str(raw / "train-labels-idx1-ubyte"))[:600]
    x = ((imgs.float() / 255 - 0.2860) / 0.3530).unsqueeze(1)
    torch.manual_seed(0)
    net = create_model("lenet").eval()
    det = Mahalanobis(taps=["conv1", "conv2", "fc1", "logits"])
    engine.fit_from_loader([det], net, [(x[i], labels[i]) for i in torch.arange(600).chunk(4)])
    with torch.no_grad():
        out = net.extract(x[:600], taps=det.taps)
        comps = det.score_components(out)
    y = labels.numpy()
    for i, t in enumerate(det.taps):
        f = out.tap(t)
        f = (f.mean((2, 3)) if f.ndim == 4 else f).double().numpy()
        means, cov = _numpy_fit(f, y, 10)
        np.testing.assert_allclose(det.means(i).numpy(), means, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(det.covariance(i).numpy(), cov, rtol=1e-4, atol=1e-7)
        want = _numpy_scores(f, det.means(i).numpy(), det.precision(i).numpy())
        np.testing.assert_allclose(comps[:, i].numpy(), want, rtol=1e-4, atol=1e-3)
