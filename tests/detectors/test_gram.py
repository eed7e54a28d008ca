"""Gram (Sastry & Oore 2020): Gram features and scores against an independent numpy
re-implementation of the reference formula (matrix products, seeded hold-out), pytorch-ood
0.4.0's Gram on the same network, the batching- and world-size-independent hold-out,
refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from pytorch_ood.detector import Gram as PodGram
from scipy.special import softmax
from threaded_ranks import run_ranks, shard
from torch import Tensor
from toys import TapNet

from lightning_ood import engine
from lightning_ood.detectors import DETECTORS, build_detector
from lightning_ood.detectors.base import Detector, InvalidConfiguration, Reducer
from lightning_ood.detectors.gram import Gram, gram_features
from lightning_ood.detectors.knn import seeded_uniform

N, POWERS = 600, [1, 2, 3]


@pytest.fixture(scope="module")
def net() -> TapNet:
    torch.manual_seed(0)
    net = TapNet().eval()
    with torch.no_grad():  # centre the logits so that every class gets predicted
        net.head.bias -= net(torch.randn(2000, 2, 4, 4)).mean(dim=0)
    return net


def _data(net: TapNet, n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs and labels: the network's prediction for 80 %, a random class for the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=g)
    with torch.no_grad():
        pred = net(x).argmax(dim=1)
    noisy = torch.rand(n, generator=g) < 0.2
    y = torch.where(noisy, torch.randint(0, 3, (n,), generator=g), pred)
    assert set(pred.tolist()) == {0, 1, 2}
    return x, y


def _fit(det: Detector, net: TapNet, x: Tensor, y: Tensor, batch: int = 64) -> Detector:
    engine.fit_from_loader([det], net, list(zip(x.split(batch), y.split(batch), strict=True)))
    return det


def _score(det: Detector, net: TapNet, x: Tensor) -> np.ndarray:
    with torch.no_grad():
        return det.score(net.extract(x, taps=det.taps)).numpy()


def _numpy_gram(f: np.ndarray, p: int) -> np.ndarray:
    """The reference G_p: (F^p)(F^p)ᵀ by matrix product, row sums, sign·|.|^(1/p)."""
    a = (f.reshape(f.shape[0], f.shape[1], -1)) ** p
    g = np.einsum("bcs,bds->bcd", a, a).sum(axis=2)
    return np.sign(g) * np.abs(g) ** (1.0 / p)


def _numpy_taps(net: TapNet, x: Tensor) -> tuple[list[np.ndarray], np.ndarray]:
    with torch.no_grad():
        out = net.extract(x, taps=["conv", "fc"])
    return [out.tap(t).double().numpy() for t in ("conv", "fc")], out.logits.double().numpy()


def _dev(g: np.ndarray, mn: np.ndarray, mx: np.ndarray) -> np.ndarray:
    lo = np.maximum(mn - g, 0) / np.abs(mn + 1e-6)
    hi = np.maximum(g - mx, 0) / np.abs(mx + 1e-6)
    return (lo + hi).sum(axis=1)


def test_gram_features_equal_the_matrix_product_form() -> None:
    f = torch.randn(5, 3, 4, 2, dtype=torch.float64)
    got = gram_features(f, [1, 2, 5]).numpy()
    for i, p in enumerate([1, 2, 5]):
        np.testing.assert_allclose(got[:, i], _numpy_gram(f.numpy(), p), rtol=1e-10)
    flat = torch.randn(4, 6, dtype=torch.float64)  # a (B, C) tap: S = 1
    np.testing.assert_allclose(
        gram_features(flat, [3]).numpy()[:, 0], _numpy_gram(flat.numpy(), 3), rtol=1e-10
    )


@pytest.mark.parametrize(("samples", "by_conf"), [("predicted", True), ("correct", False)])
def test_holdout_score_equals_numpy_reference(net: TapNet, samples: str, by_conf: bool) -> None:
    """The authors' code (defaults): samples predicted as c bound class c and every deviation
    is divided by the MSP; or correctly classified samples and plain deviations. The seeded
    held-out tenth (by training-set position) is kept out of the ranges and gives E_l from
    its predicted-class deviations."""
    x, y = _data(net)
    make = lambda: Gram(  # noqa: E731
        taps=["conv", "fc"], powers=POWERS, seed=5, samples=samples, divide_by_confidence=by_conf
    )
    det = _fit(make(), net, x, y, batch=50)
    feats, logits = _numpy_taps(net, x)
    pred, yy = logits.argmax(1), y.numpy()
    held = (seeded_uniform(0, N, 5) < 0.1).numpy()
    bound = ~held & (pred == yy) if samples == "correct" else ~held
    cls = pred if samples == "predicted" else yy
    grams = [[_numpy_gram(f, p) for p in POWERS] for f in feats]
    mins = [[np.stack([g[bound & (cls == c)].min(0) for c in range(3)]) for g in t] for t in grams]
    maxs = [[np.stack([g[bound & (cls == c)].max(0) for c in range(3)]) for g in t] for t in grams]

    def delta(ts: list[list[np.ndarray]], lg: np.ndarray) -> np.ndarray:
        pr = lg.argmax(1)
        d = np.stack(
            [
                sum(_dev(g, mins[i][j][pr], maxs[i][j][pr]) for j, g in enumerate(t))
                for i, t in enumerate(ts)
            ],
            axis=1,
        )
        msp = softmax(lg, axis=1).max(axis=1, keepdims=True)
        return d / msp if by_conf else d

    norm = delta([[g[held] for g in t] for t in grams], logits[held]).mean(axis=0)
    np.testing.assert_allclose(det.normalizers.numpy(), norm, rtol=1e-9)
    xt, _ = _data(net, 64, seed=1)
    ft, lt = _numpy_taps(net, xt)
    want = -(delta([[_numpy_gram(f, p) for p in POWERS] for f in ft], lt) / norm).sum(1)
    np.testing.assert_allclose(_score(det, net, xt), want, rtol=1e-9)
    # the same split and ranges for any batching
    np.testing.assert_allclose(_score(_fit(make(), net, x, y, batch=N), net, xt), want, rtol=1e-9)


def test_label_ranges_equal_pytorch_ood(net: TapNet) -> None:
    """pytorch-ood bounds class c by every sample labelled c, does not divide by the MSP, and
    with no hold-out its E_l is 1: our samples=label, normalizer=none,
    divide_by_confidence=false, on the same taps (conv map, fc pre-activation)."""
    x, y = _data(net, seed=2)
    pod = PodGram(
        head=lambda d: net.head(torch.relu(d)),
        feature_layers=[lambda a: net.act(net.conv(a)), lambda d: net.fc(d.flatten(1))],
        num_classes=3,
        num_poles_list=POWERS,
    )
    pod.validation_fraction = 0.0
    pod.to("cpu")
    pod.fit(list(zip(x.split(64), y.split(64), strict=True)))
    det = Gram(
        taps=["conv", "fc"],
        powers=POWERS,
        samples="label",
        normalizer="none",
        divide_by_confidence=False,
    )
    _fit(det, net, x, y)
    xt, _ = _data(net, 64, seed=3)
    with torch.no_grad():
        want = -pod.predict(xt).numpy()
    np.testing.assert_allclose(_score(det, net, xt), want, rtol=1e-4, atol=1e-5)


def test_two_ranks_equal_one_process(net: TapNet, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _data(net, N + 1, seed=4)
    one = _fit(Gram(powers=POWERS), net, x, y)
    assert one.taps == ("conv", "fc")  # taps=None: every tap of the backbone

    # the network's hooks are not thread-safe: every rank's outputs are computed up front
    shards = [
        [
            (net.extract(a, taps=["conv", "fc"]), b)
            for a, b in zip(shard(x, r, 2).split(40), shard(y, r, 2).split(40), strict=True)
        ]
        for r in range(2)
    ]

    def fit(rank: int, reducer: Reducer) -> Detector:
        det = Gram(powers=POWERS)
        engine.fit_detectors([det], net, shards[rank], reducer)  # a list: restartable
        return det

    for det in run_ranks(2, fit, monkeypatch):
        for key in ("mins", "maxs", "tap_sizes"):
            assert torch.equal(det.get_buffer(key), one.get_buffer(key))
        torch.testing.assert_close(det.normalizers, one.normalizers, rtol=1e-12, atol=0)


def test_state_dict_round_trip_and_refusals(net: TapNet) -> None:
    assert DETECTORS["gram"] is Gram
    x, y = _data(net)
    det = _fit(Gram(powers=POWERS), net, x, y)
    buf = io.BytesIO()
    torch.save(det.state_dict(), buf)
    buf.seek(0)
    again = build_detector("gram", det.config())
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.taps == ("conv", "fc")
    xt, _ = _data(net, 16, seed=9)
    np.testing.assert_array_equal(_score(again, net, xt), _score(det, net, xt))
    # the validation normaliser waits for the validation split
    val = _fit(Gram(powers=POWERS, normalizer="validation"), net, x, y)
    assert val.uses_validation_data and not val.is_fitted
    with torch.no_grad():
        val.fit_validation(net.extract(xt, taps=val.taps), torch.zeros(16, dtype=torch.long))
    assert val.is_fitted and bool((val.normalizers > 0).all())
    with pytest.raises(InvalidConfiguration, match=r"classes \[2\] have no bounding"):
        _fit(Gram(powers=POWERS, samples="label"), net, x, torch.where(y == 2, 0, y))
    with pytest.raises(ValueError, match="powers must be a list of distinct integers"):
        Gram(powers=[0, 1])
