"""CORE (Yang, Kim & Bahk 2026): against the equations re-implemented in numpy (projection by
the pseudo-inverse, not the detector's SVD basis), a hand-computed 4-d toy, the orthogonality
and invariances the split must have, two threaded ranks against one process, the checkpoint
round trip and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from threaded_ranks import run_ranks, shard
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.base import InvalidConfiguration, Reducer
from lightning_ood.detectors.core import CORE, orthogonal_residual
from lightning_ood.detectors.energy import Energy
from lightning_ood.models.base import BackboneOutput
from lightning_ood.tuning import fit_candidates

N, Q, L = 240, 12, 4
F64 = torch.float64


def _net(seed: int = 1, n_classes: int = L, q: int = Q) -> LinearHeadNet:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_classes, q, generator=g, dtype=F64)
    return LinearHeadNet(w, torch.randn(n_classes, generator=g, dtype=F64)).eval()


def _data(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Non-negative, class-structured features (q = 12) and their labels (every class)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    centres = torch.rand(L, Q, generator=torch.Generator().manual_seed(7), dtype=F64) * 3
    x = (centres[y] + 0.5 * torch.randn(n, Q, generator=g, dtype=F64)).relu()
    return x, y


def _out(net: LinearHeadNet, x: Tensor) -> BackboneOutput:
    return BackboneOutput(x, net.fc(x).detach())


def _fit(det: CORE, net: LinearHeadNet, x: Tensor, y: Tensor, batch: int = 50) -> CORE:
    engine.fit_from_loader([det], net, list(zip(x.split(batch), y.split(batch), strict=True)))
    return det


def _reference(
    net: LinearHeadNet,
    train: Tensor,
    labels: Tensor,
    test: Tensor,
    center: str = "none",
    which: str = "predicted",
    normalize: str = "zscore",
) -> np.ndarray:
    """CORE in numpy: P = W⁺W projects onto the row space of W; class means by label;
    E = logsumexp(Wh + b); R = cos((I - P)(h - o), (I - P)(μ_ŷ - o)); z-scores (numpy std,
    ddof 0) or min-max over the training scores, summed."""
    w = net.fc.weight.detach().numpy()
    b = net.fc.bias.detach().numpy()
    h, y = train.numpy(), labels.numpy()
    o = h.mean(axis=0) if center == "mean" else np.zeros(h.shape[1])
    perp = np.eye(w.shape[1]) - np.linalg.pinv(w) @ w
    means = np.stack([h[y == k].mean(axis=0) for k in range(w.shape[0])])
    m = (means - o) @ perp
    m /= np.linalg.norm(m, axis=1, keepdims=True)

    def parts(f: np.ndarray) -> np.ndarray:
        logits = f @ w.T + b
        r = (f - o) @ perp
        cos = (r @ m.T) / np.linalg.norm(r, axis=1, keepdims=True)
        res = cos.max(axis=1) if which == "max" else cos[np.arange(len(f)), logits.argmax(1)]
        return np.stack([logsumexp(logits, axis=1), res], axis=1)

    fit = parts(h)
    if normalize == "zscore":
        loc, scale = fit.mean(axis=0), fit.std(axis=0)
    else:
        loc, scale = fit.min(axis=0), fit.max(axis=0) - fit.min(axis=0)
    return ((parts(test.numpy()) - loc) / scale).sum(axis=1)


@pytest.mark.parametrize(
    ("center", "which", "normalize"),
    [("none", "predicted", "zscore"), ("mean", "max", "zscore"), ("mean", "predicted", "minmax")],
)
def test_core_matches_numpy_formula(center: str, which: str, normalize: str) -> None:
    net = _net()
    x, y = _data()
    test = _data(60, seed=3)[0] * 1.3
    det = _fit(CORE(center=center, residual_class=which, normalize=normalize), net, x, y)
    ref = _reference(net, x, y, test, center, which, normalize)
    np.testing.assert_allclose(det.score(_out(net, test)).numpy(), ref, rtol=1e-9, atol=1e-9)
    assert tuple(det.basis.shape) == (Q, L)  # rank(W) = L = 4 of q = 12
    # the normalised training scores: each part has mean 0 (zscore) / spans [0, 1] (minmax)
    z = (det.raw_scores(_out(net, x)) - det.loc) / det.scale
    if normalize == "zscore":
        torch.testing.assert_close(z.mean(0), torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(2, dtype=F64))
    else:
        torch.testing.assert_close(z.min(0).values, torch.zeros(2, dtype=F64))
        torch.testing.assert_close(z.max(0).values, torch.ones(2, dtype=F64))


def test_core_hand_computed_toy() -> None:
    """q = 4, W = [e1; e2], b = 0: the confidence part is (h1, h2), the residual (0, 0, h3, h4).
    Class 0: (2,0,1,0), (3,0,1,2) -> residual mean (0,0,1,1); class 1: (0,2,0,1), (0,2,0,3)
    -> (0,0,0,2). Training cosines 1/√2, 3/√10, 1, 1; energies log(e²+1), log(e³+1),
    log(1+e²), log(1+e²)."""
    w = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=F64)
    net = LinearHeadNet(w, torch.zeros(2, dtype=F64)).eval()
    x = torch.tensor([[2, 0, 1, 0], [3, 0, 1, 2], [0, 2, 0, 1], [0, 2, 0, 3]], dtype=F64)
    y = torch.tensor([0, 0, 1, 1])
    det = _fit(CORE(), net, x, y, batch=3)
    e = np.log1p(np.exp([2.0, 3.0, 2.0, 2.0]))
    r = np.array([1 / np.sqrt(2), 3 / np.sqrt(10), 1.0, 1.0])
    np.testing.assert_allclose(det.loc.numpy(), [e.mean(), r.mean()], rtol=1e-12)
    np.testing.assert_allclose(det.scale.numpy(), [e.std(), r.std()], rtol=1e-12)
    np.testing.assert_allclose(
        det.unit_means.numpy(), [[0, 0, 2**-0.5, 2**-0.5], [0, 0, 0, 1]], atol=1e-15
    )
    # test h = (1, 0, 1, 5): logits (1, 0), predicted class 0; residual (0, 0, 1, 5)
    t = torch.tensor([[1.0, 0, 1, 5]], dtype=F64)
    e_t, cos0, cos1 = np.log1p(np.e), 6 / np.sqrt(52), 5 / np.sqrt(26)
    raw = det.raw_scores(_out(net, t))[0].numpy()
    np.testing.assert_allclose(raw, [e_t, cos0], rtol=1e-12)
    expected = (e_t - e.mean()) / e.std() + (cos0 - r.mean()) / r.std()
    np.testing.assert_allclose(det.score(_out(net, t)).numpy(), [expected], rtol=1e-12)
    best = _fit(CORE(residual_class="max"), net, x, y)  # class 1's mean is closer in angle
    np.testing.assert_allclose(best.raw_scores(_out(net, t))[0, 1].item(), cos1, rtol=1e-12)


def test_core_split_is_orthogonal_and_invariant() -> None:
    net = _net()
    x, y = _data()
    det = _fit(CORE(), net, x, y)
    w, b = net.fc.weight.detach(), net.fc.bias.detach()
    h = _data(40, seed=5)[0]
    r = orthogonal_residual(h, det.basis, det.origin)
    par = h - r
    # the residual is orthogonal to every classifier row; the logits come from h_∥ alone
    torch.testing.assert_close(r @ w.T, torch.zeros(40, L, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close((par * r).sum(1), torch.zeros(40, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(par @ w.T + b, h @ w.T + b, rtol=1e-12, atol=1e-12)
    # the confidence part is the energy score exactly
    out = _out(net, h)
    assert torch.equal(det.raw_scores(out)[:, 0], Energy().score(out))
    # the residual part ignores any move inside the span of W's rows (logits held fixed)
    moved = BackboneOutput(h + torch.randn(40, L, dtype=F64) @ w, out.logits)
    torch.testing.assert_close(det.raw_scores(moved)[:, 1], det.raw_scores(out)[:, 1])
    # ... and is scale-invariant (a cosine); ViM's origin u = -W⁺b lies in that span
    scaled = BackboneOutput(3.0 * h, out.logits)
    torch.testing.assert_close(det.raw_scores(scaled)[:, 1], det.raw_scores(out)[:, 1])
    u = -(torch.linalg.pinv(w) @ b)
    torch.testing.assert_close(orthogonal_residual(h, det.basis, u), r, rtol=1e-12, atol=1e-12)


def test_core_streamed_threaded_ranks_and_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net()
    x, y = _data()
    test = _data(30, seed=6)[0]
    one = _fit(CORE(center="mean"), net, x, y, batch=N)
    streamed = _fit(CORE(center="mean"), net, x, y, batch=7)
    expect = one.score(_out(net, test))
    torch.testing.assert_close(streamed.score(_out(net, test)), expect, rtol=1e-10, atol=1e-10)

    def fit(rank: int, reducer: Reducer) -> CORE:
        det = CORE(center="mean")
        xs, ys = shard(x, rank, 2), shard(y, rank, 2)
        det.reset()
        while True:  # the engine's passes, by hand: update ... next_pass ... finalize
            for xc, yc in zip(xs.split(32), ys.split(32), strict=True):
                det.update(_out(net, xc), yc, net)
            if not det.next_pass(reducer):
                break
        det.finalize(net, reducer)
        return det

    for det in run_ranks(2, fit, monkeypatch):
        torch.testing.assert_close(det.score(_out(net, test)), expect, rtol=1e-10, atol=1e-10)
    fresh = CORE(center="mean")
    fresh.load_state_dict(one.state_dict())
    assert "class_sum" not in one.state_dict()  # accumulators stay out of checkpoints
    torch.testing.assert_close(fresh.score(_out(net, test)), expect)


def test_core_refusals() -> None:
    net = _net()
    x, y = _data()
    with pytest.raises(ValueError, match=r"center='median' is not supported"):
        CORE(center="median")
    with pytest.raises(ValueError, match="normalize='softmax' is not supported"):
        CORE(normalize="softmax")
    one_pass = CORE()
    one_pass.reset()
    one_pass.update(_out(net, x), y, net)
    with pytest.raises(RuntimeError, match="needs two passes"):
        one_pass.finalize(net)
    assert one_pass.next_pass(Reducer())
    with pytest.raises(ValueError, match="needs `model`"):
        one_pass.update(_out(net, x), y)
    with pytest.raises(ValueError, match=r"classes \[3\] have no training samples"):
        _fit(CORE(), net, x[y < 3], y[y < 3])
    wide = _net(n_classes=Q + 2)  # 14 rows span all 12 dimensions: no residual
    labels = torch.arange(N) % (Q + 2)
    with pytest.raises(InvalidConfiguration, match="orthogonal residual is empty"):
        _fit(CORE(), wide, x, labels)
    flat = LinearHeadNet(torch.zeros(L, Q, dtype=F64), torch.zeros(L, dtype=F64)).eval()
    with pytest.raises(InvalidConfiguration, match="energy score is constant"):
        _fit(CORE(), flat, x, y)
    det = _fit(CORE(), net, x, y)
    with pytest.raises(RuntimeError, match="consumed by an earlier finalize"):
        det.finalize(net)
    with pytest.raises(ValueError, match=r"shape \(B, 12\)"):
        det.score(BackboneOutput(torch.zeros(2, 5, dtype=F64), torch.zeros(2, L, dtype=F64)))


def test_core_tuning_candidates_share_the_first_pass() -> None:
    """The declared search space (center × normalize) fitted as tuning does (one accumulation
    per center, copies finalised under each normalize, CORE's second pass shared) scores like
    each candidate fitted alone."""
    net = _net()
    x, y = _data()
    test = _data(20, seed=8)[0]
    space = CORE.search_space
    assert dict(space) == {"center": ("none", "mean"), "normalize": ("zscore", "minmax")}
    configs = [{"center": c, "normalize": n} for c in space["center"] for n in space["normalize"]]
    cands = [CORE(name=f"core{i}", **cfg) for i, cfg in enumerate(configs)]
    batches = list(zip(x.split(64), y.split(64), strict=True))
    outputs = [(_out(net, xb), yb) for xb, yb in batches]
    fitted, groups, invalid = fit_candidates(cands, net, outputs)
    assert (groups, invalid, len(fitted)) == (2, {}, 4)
    for det, cfg in zip(fitted, configs, strict=True):
        alone = _fit(CORE(**cfg), net, x, y, batch=64)
        torch.testing.assert_close(det.score(_out(net, test)), alone.score(_out(net, test)))
