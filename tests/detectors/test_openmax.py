"""OpenMax (Bendale & Boult 2016): the Weibull MLE against scipy's ``weibull_min.fit``, the
whole score against OpenOOD v1.5's per-sample algorithm re-written independently in numpy/scipy
(libMR's translated tail fit), against pytorch-ood 0.4.0's ``OpenMax`` (label-based MAVs),
the two passes through the engine, two threaded ranks against one process, and the
checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_ood.detector import OpenMax as PeerOpenMax
from scipy.optimize import brentq
from scipy.spatial import distance as spd
from scipy.special import logsumexp
from scipy.stats import weibull_min
from threaded_ranks import run_ranks, shard
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.base import Reducer
from lightning_ood.detectors.openmax import OpenMax, weibull_mle
from lightning_ood.models.base import BackboneOutput

N, L = 400, 4
NET = LinearHeadNet(torch.eye(L).double(), torch.zeros(L).double()).eval()  # logits = inputs


def _logits(n: int = N, seed: int = 0, spread: float = 1.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    f = 3.0 * torch.eye(L, dtype=torch.float64)[y]
    return f + spread * torch.randn(n, L, generator=g, dtype=torch.float64), y


def _fit(det: OpenMax, f: Tensor, y: Tensor, batch: int = 64) -> OpenMax:
    engine.fit_from_loader([det], NET, list(zip(f.split(batch), y.split(batch), strict=True)))
    return det


def _score(det: OpenMax, f: Tensor) -> Tensor:
    return det.score(BackboneOutput(f, f))


def _mle_residual(x: np.ndarray, k: float) -> float:
    """The shape equation of the Weibull MLE, sum x^k ln x / sum x^k - 1/k - mean ln x."""
    w = np.exp(k * (np.log(x) - np.log(x).max()))
    return float((w * np.log(x)).sum() / w.sum() - 1.0 / k - np.log(x).mean())


def test_weibull_mle_solves_the_likelihood_equation_and_matches_scipy() -> None:
    """Our shape solves the MLE equation to rounding; scipy's ``weibull_min.fit(floc=0)``
    stops its root search earlier (residual ~1e-5), so it is matched to 1e-4 and our
    log-likelihood must be at least its."""
    rng = np.random.default_rng(0)
    tail = np.sort(rng.gamma(3.0, 2.0, 200))[-20:]
    samples = [
        weibull_min.rvs(2.0, scale=3.0, size=20, random_state=rng),
        weibull_min.rvs(0.7, scale=10.0, size=12, random_state=rng),
        weibull_min.rvs(30.0, scale=1.0, size=5, random_state=rng),
        tail - tail.min() + 10000.0,  # libMR's translated tail: shapes in the thousands
    ]
    rows = np.array([np.pad(x, (0, 20 - len(x)), constant_values=np.nan) for x in samples])
    valid = np.array([np.arange(20) < len(x) for x in samples])
    k, lam = weibull_mle(torch.tensor(rows), torch.tensor(valid))
    for i, x in enumerate(samples):
        c, _, s = weibull_min.fit(x, floc=0)
        assert abs(_mle_residual(x, float(k[i]))) < 1e-12 * max(1.0, abs(np.log(x)).max())
        assert float(k[i]) == pytest.approx(c, rel=1e-4)
        assert float(lam[i]) == pytest.approx(s, rel=1e-4)
        ours = weibull_min.logpdf(x, float(k[i]), 0, float(lam[i])).sum()
        assert ours >= weibull_min.logpdf(x, c, 0, s).sum() - 1e-9


def _weibull_brentq(x: np.ndarray) -> tuple[float, float]:
    """Weibull MLE (location 0): the shape by Brent's method on the likelihood equation."""
    c = brentq(lambda k: _mle_residual(x, k), 1e-3, 1e9, xtol=1e-12, rtol=1e-14)
    logx = np.log(x)
    scale = np.exp((logsumexp(c * logx) - np.log(len(x))) / c)
    return c, scale


def _dist(a: np.ndarray, m: np.ndarray, kind: str, eu_weight: float) -> float:
    if kind == "euclidean":
        return spd.euclidean(m, a)
    if kind == "cosine":
        return spd.cosine(m, a)
    return spd.euclidean(m, a) * eu_weight + spd.cosine(m, a)


def _openood(train: np.ndarray, y: np.ndarray, test: np.ndarray, tailsize: int, alpha: int,
             kind: str, eu_weight: float) -> np.ndarray:  # fmt: skip
    """OpenOOD v1.5's OpenMax, sample by sample, with scipy in place of libMR (its MLE solved
    by Brent's method: scipy's ``weibull_min.fit`` stops ~1e-5 short of the root)."""
    correct = train.argmax(1) == y
    mavs, models = [], []
    for k in range(L):
        av = train[correct & (y == k)]
        mav = av.mean(0)
        d = np.array([_dist(a, mav, kind, eu_weight) for a in av])
        tail = np.sort(d)[-tailsize:]
        c, scale = _weibull_brentq(tail + 10000 - tail.min())
        mavs.append(mav)
        models.append((c, scale, tail.min()))
    weights = [((alpha + 1) - i) / float(alpha) for i in range(1, alpha + 1)]
    out = []
    for s in test:
        omega = np.zeros(L)
        omega[s.argsort()[::-1][:alpha]] = weights
        revised, unknown = [], 0.0
        for k in range(L):
            c, scale, low = models[k]
            w = weibull_min.cdf(_dist(s, mavs[k], kind, eu_weight) + 10000 - low, c, 0, scale)
            revised.append(s[k] * (1 - w * omega[k]))
            unknown += s[k] - revised[-1]
        e = np.exp(np.array([unknown, *revised]))
        out.append(-e[0] / e.sum())
    return np.array(out)


@pytest.mark.parametrize(
    ("kind", "alpha", "eu_weight"), [("euclidean", 3, 0.5), ("cosine", 2, 0.5), ("eucos", 4, 0.5)]
)
def test_openmax_matches_openood_algorithm(kind: str, alpha: int, eu_weight: float) -> None:
    f, y = _logits()
    test = torch.cat([_logits(30, 1)[0], _logits(30, 2, spread=4.0)[0]])
    det = _fit(OpenMax(tailsize=15, alpha=alpha, distance=kind, eu_weight=eu_weight), f, y)
    ref = _openood(f.numpy(), y.numpy(), test.numpy(), 15, alpha, kind, eu_weight)
    np.testing.assert_allclose(_score(det, test).numpy(), ref, rtol=1e-9, atol=1e-12)
    assert ref.std() > 1e-3  # the unknown probability varies over the test set


def test_openmax_matches_pytorch_ood_on_label_means() -> None:
    f, y = _logits()
    test = torch.cat([_logits(30, 3)[0], _logits(30, 4, spread=4.0)[0]])
    det = _fit(OpenMax(tailsize=20, alpha=3, correct_only=False), f, y)
    peer = PeerOpenMax(None, tailsize=20, alpha=3, euclid_weight=1.0).fit_logits(f, y)
    expected = -peer.predict_logits(test)
    # pytorch-ood fits its Weibulls with scipy's numerical ``exponweib.fit`` (shape ~1e-7
    # relative from the exact MLE): agreement to 1e-5
    torch.testing.assert_close(_score(det, test), expected.double(), rtol=1e-5, atol=1e-9)
    # the paper's rejection quantity: the largest known-class OpenMax probability
    det.score_type = "max_known"
    p = det.probabilities(test)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(60, dtype=torch.float64))
    torch.testing.assert_close(_score(det, test), p[:, 1:].max(dim=1).values)


def test_openmax_two_passes_threaded_ranks_and_round_trip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    f, y = _logits()
    test = _logits(25, 5, spread=2.0)[0]
    one = _fit(OpenMax(tailsize=10), f, y, batch=N)
    torch.testing.assert_close(_score(_fit(OpenMax(tailsize=10), f, y, batch=9), test),
                               _score(one, test), rtol=1e-12, atol=1e-12)  # fmt: skip

    def fit(rank: int, reducer: Reducer) -> OpenMax:
        det = OpenMax(tailsize=10)
        out, t = BackboneOutput(shard(f, rank, 2), shard(f, rank, 2)), shard(y, rank, 2)
        det.reset()
        det.update(out, t)
        assert det.next_pass(reducer)
        det.update(out, t)
        assert not det.next_pass(reducer)
        det.finalize(NET, reducer)
        return det

    for det in run_ranks(2, fit, monkeypatch):
        torch.testing.assert_close(_score(det, test), _score(one, test), rtol=1e-12, atol=1e-12)
    fresh = OpenMax(tailsize=10)
    fresh.load_state_dict(one.state_dict())
    torch.testing.assert_close(_score(fresh, test), _score(one, test))
    lone = OpenMax()
    lone.reset()
    lone.update(BackboneOutput(f, f), y)
    with pytest.raises(RuntimeError, match="two passes"):
        lone.finalize(NET)
    with pytest.raises(ValueError, match=r"classes \[3\] have no correctly classified"):
        _fit(OpenMax(), f[y != 3], y[y != 3])
