"""ViM (Wang et al. 2022) and RMDS (Ren et al. 2021): against the papers' formulas written
independently in numpy/sklearn, streamed fits against one batch, checkpoint round trips, and
pytorch-ood 0.4.0's ViM and RMD fed the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.covariance import EmpiricalCovariance
from threaded_ranks import run_ranks, shard
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.base import Detector, InvalidConfiguration, Reducer
from lightning_ood.detectors.knn import seeded_uniform
from lightning_ood.detectors.mahalanobis import squared_distances
from lightning_ood.detectors.rmds import RMDS
from lightning_ood.detectors.vim import ViM, default_dim
from lightning_ood.models.base import BackboneOutput

N, Q, L = 240, 12, 4


def _data(n: int = N, seed: int = 0, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    """Class-shifted Gaussians with a correlated, well-spread covariance."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    mix = torch.eye(Q) + 0.3 * torch.randn(Q, Q, generator=torch.Generator().manual_seed(9))
    scale = torch.linspace(0.3, 2.0, Q)
    x = (torch.randn(n, Q, generator=g) * scale) @ mix + 2.0 * torch.eye(L, Q)[y] + shift
    return x, y


@pytest.fixture(scope="module")
def net() -> LinearHeadNet:
    g = torch.Generator().manual_seed(1)
    return LinearHeadNet(torch.randn(L, Q, generator=g), torch.randn(L, generator=g)).eval()


def _fit(det: Detector, net: LinearHeadNet, x: Tensor, y: Tensor, batch: int = 50) -> Detector:
    """Fit through the engine's one path: an eval pass over (inputs, targets) batches."""
    engine.fit_from_loader([det], net, list(zip(x.split(batch), y.split(batch), strict=True)))
    return det


def _score(det: Detector, net: LinearHeadNet, x: Tensor) -> Tensor:
    with torch.no_grad():
        return engine.score_batch({"d": det}, net.extract(x))["d"]


def _head(net: LinearHeadNet) -> tuple[np.ndarray, np.ndarray]:
    fc = net.get_classifier()
    return fc.weight.detach().double().numpy(), fc.bias.detach().double().numpy()


# -- ViM ---------------------------------------------------------------------------------------
def _numpy_vim(
    xtr: np.ndarray, w: np.ndarray, b: np.ndarray, d: int, alpha_rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """ViM's u, residual basis and α (paper Sec. 3), with sklearn's uncentred covariance;
    α's denominator over ``alpha_rows`` (default: all training rows)."""
    u = -np.linalg.pinv(w) @ b
    cov = EmpiricalCovariance(assume_centered=True).fit(xtr - u).covariance_
    vals, vecs = np.linalg.eigh(cov)
    ns = vecs[:, np.argsort(vals)[: xtr.shape[1] - d]]
    rows = xtr if alpha_rows is None else alpha_rows
    alpha = (xtr @ w.T + b).max(1).mean() / np.linalg.norm((rows - u) @ ns, axis=1).mean()
    return u, ns, float(alpha)


def _numpy_vim_score(x: np.ndarray, w, b, u, ns, alpha) -> np.ndarray:
    return logsumexp(x @ w.T + b, axis=1) - alpha * np.linalg.norm((x - u) @ ns, axis=1)


def test_default_dim_is_the_authors_rule() -> None:
    assert [default_dim(q) for q in (4096, 2048, 2047, 768, 767, 512, 342)] == [
        1000,
        1000,
        512,
        512,
        383,
        256,
        171,
    ]


def test_vim_matches_the_paper_formula_in_numpy(net: LinearHeadNet) -> None:
    x, y = _data()
    xt, _ = _data(30, seed=5, shift=0.5)
    det = _fit(ViM(), net, x, y)
    assert int(det.principal_dim) == Q // 2
    w, b = _head(net)
    xd = x.double().numpy()
    u, ns, alpha = _numpy_vim(xd, w, b, Q // 2)
    np.testing.assert_allclose(det.origin.numpy(), u, rtol=1e-10, atol=1e-12)
    # the residual subspace (its projector; eigenvector signs are arbitrary)
    proj = det.residual_basis.numpy() @ det.residual_basis.numpy().T
    np.testing.assert_allclose(proj, ns @ ns.T, atol=1e-9)
    # α's numerator averages the network's float32 max-logits (numpy: float64 logits)
    assert float(det.alpha) == pytest.approx(alpha, rel=1e-7)
    want = _numpy_vim_score(xt.double().numpy(), w, b, u, ns, alpha)
    np.testing.assert_allclose(_score(det, net, xt).numpy(), want, rtol=1e-7, atol=1e-7)
    # another finalize-only dim gives another subspace and other scores
    det3 = _fit(ViM(dim=3), net, x, y)
    u3, ns3, alpha3 = _numpy_vim(xd, w, b, 3)
    want3 = _numpy_vim_score(xt.double().numpy(), w, b, u3, ns3, alpha3)
    np.testing.assert_allclose(_score(det3, net, xt).numpy(), want3, rtol=1e-7, atol=1e-7)
    assert np.abs(want3 - want).max() > 1e-3


def test_vim_streamed_fit_equals_one_batch(net: LinearHeadNet) -> None:
    x, y = _data()
    xt, _ = _data(30, seed=5)
    one = _fit(ViM(dim=5), net, x, y, batch=N)
    many = _fit(ViM(dim=5), net, x, y, batch=17)
    assert float(many.alpha) == pytest.approx(float(one.alpha), rel=1e-12)
    torch.testing.assert_close(_score(many, net, xt), _score(one, net, xt), rtol=1e-10, atol=1e-10)


def test_vim_alpha_subsample_is_seeded_split_invariant_and_exact_on_its_rows(
    net: LinearHeadNet,
) -> None:
    """With max_samples below N x q, α's residual mean runs on the m = max_samples // q rows of
    smallest seeded priority, whatever the batching; the max-logit mean stays exact."""
    x, y = _data()
    m = 60
    kw = {"dim": 4, "max_samples": m * Q, "seed": 7}
    a = _fit(ViM(**kw), net, x, y, batch=13)
    b_ = _fit(ViM(**kw), net, x, y, batch=N)
    assert float(a.alpha) == float(b_.alpha)
    rows = torch.sort(seeded_uniform(0, N, 7), stable=True).indices[:m]
    w, bias = _head(net)
    xd = x.double().numpy()
    _, _, alpha_sub = _numpy_vim(xd, w, bias, 4, alpha_rows=xd[rows.numpy()])
    assert float(a.alpha) == pytest.approx(alpha_sub, rel=1e-7)
    _, _, alpha_all = _numpy_vim(xd, w, bias, 4)
    assert alpha_sub != pytest.approx(alpha_all, rel=1e-6)  # really a subsample ...
    assert alpha_sub == pytest.approx(alpha_all, rel=0.1)  # ... and a close estimate
    other = _fit(ViM(**{**kw, "seed": 8}), net, x, y)
    assert float(other.alpha) != float(a.alpha)


@pytest.mark.parametrize("world", [2, 3])
def test_vim_alpha_subsample_is_the_same_on_any_world_size(
    net: LinearHeadNet, world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DDP each rank gives its rows the priorities of their training-set positions
    (r + p * w), so the union's m smallest are one process's m smallest, averaged in the same
    order: α equals one process's exactly, and the basis (from all-reduced float64 sums, whose
    order of addition differs) to rounding. Before, each rank drew priorities for its own
    positions 0, 1, ...: another subsample for every world size."""
    x, y = _data()
    kw = {"dim": 4, "max_samples": 60 * Q, "seed": 7}
    one = _fit(ViM(**kw), net, x, y, batch=N)

    def fit(rank: int, reducer: Reducer) -> ViM:
        det = ViM(**kw)
        xs, ys = shard(x, rank, world), shard(y, rank, world)
        outputs = [(net.extract(a), b) for a, b in zip(xs.split(9), ys.split(9), strict=True)]
        engine.fit_detectors([det], net, outputs, reducer)
        return det

    for det in run_ranks(world, fit, monkeypatch):
        assert float(det.alpha) == pytest.approx(float(one.alpha), rel=1e-12)
        assert torch.equal(det.origin, one.origin) and int(det.principal_dim) == 4
        proj = det.residual_basis @ det.residual_basis.T  # the subspace, not its basis' signs
        torch.testing.assert_close(
            proj, one.residual_basis @ one.residual_basis.T, atol=1e-12, rtol=0
        )


def test_vim_checkpoint_round_trip(net: LinearHeadNet) -> None:
    x, y = _data()
    xt, _ = _data(20, seed=3)
    det = _fit(ViM(dim=5), net, x, y)
    state = det.state_dict()
    assert {"origin", "residual_basis", "alpha", "principal_dim", "weight", "bias"} <= set(state)
    assert not {"outer", "feature_sum", "count", "max_logit_sum"} & set(state)
    fresh = ViM(dim=5)
    fresh.load_state_dict(state)
    assert fresh.is_fitted
    assert torch.equal(_score(fresh, net, xt), _score(det, net, xt))


def test_vim_refuses_bad_dimensions(net: LinearHeadNet) -> None:
    with pytest.raises(ValueError, match="dim=0 is out of range"):
        ViM(dim=0)
    with pytest.raises(ValueError, match="max_samples"):
        ViM(max_samples=0)
    x, y = _data(40)
    with pytest.raises(ValueError, match=r"dim=12 must lie in \[1, 11\].*q=12"):
        _fit(ViM(dim=Q), net, x, y)
    det = _fit(ViM(dim=4), net, x, y)
    with pytest.raises(ValueError, match=r"features must have shape \(B, 12\)"):
        det.score(BackboneOutput(torch.zeros(2, 5), torch.zeros(2, L)))
    # features of rank 5 (5 live units): about u they span 6 dimensions, so for dim >= 6 the
    # residual is float rounding (once fitted with alpha ~1e12, which made noise the score)
    g = torch.Generator().manual_seed(3)
    low = torch.relu(torch.randn(40, 5, generator=g)) @ torch.randn(5, Q, generator=g)
    with pytest.raises(InvalidConfiguration, match=r"dimension 6 .*float rounding.*lower dim"):
        _fit(ViM(dim=6), net, low, y)
    assert float(_fit(ViM(dim=5), net, low, y).alpha) < 1e3


def test_vim_matches_pytorch_ood(net: LinearHeadNet) -> None:
    """pytorch-ood 0.4.0 ``ViM.predict_features`` (detector/vim.py:145-164) returns
    ``alpha·‖x^{P⊥}‖ - logsumexp(logits)``: our score negated, computed in float32."""
    from pytorch_ood.detector import ViM as PoodViM

    x, y = _data()
    xt, _ = _data(30, seed=5, shift=0.5)
    fc = net.get_classifier()
    ref = PoodViM(None, d=5, w=fc.weight, b=fc.bias).fit_features(x, y)
    theirs = ref.predict_features(xt).double()
    ours = _score(_fit(ViM(dim=5), net, x, y), net, xt)
    assert float(_fit(ViM(dim=5), net, x, y).alpha) == pytest.approx(ref.alpha, rel=1e-5)
    torch.testing.assert_close(ours, -theirs, rtol=1e-5, atol=1e-5)


# -- RMDS --------------------------------------------------------------------------------------
def _numpy_rmds(xtr: np.ndarray, ytr: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Ren et al. Sec. 3 with sklearn's EmpiricalCovariance (OpenOOD's estimator):
    ``-min_k (MD_k(x) - MD_0(x))``."""
    means = np.stack([xtr[ytr == k].mean(0) for k in range(L)])
    prec = EmpiricalCovariance().fit(xtr - means[ytr]).precision_
    bg = EmpiricalCovariance().fit(xtr)
    md = np.stack([np.einsum("bi,ij,bj->b", x - m, prec, x - m) for m in means], axis=1)
    d0 = x - bg.location_
    md0 = np.einsum("bi,ij,bj->b", d0, bg.precision_, d0)
    return -(md - md0[:, None]).min(axis=1)


def test_rmds_matches_the_paper_formula_with_sklearn(net: LinearHeadNet) -> None:
    x, y = _data()
    xt, _ = _data(30, seed=5, shift=0.7)
    det = _fit(RMDS(), net, x, y)
    want = _numpy_rmds(x.double().numpy(), y.numpy(), xt.double().numpy())
    np.testing.assert_allclose(_score(det, net, xt).numpy(), want, rtol=1e-8, atol=1e-8)
    # not plain Mahalanobis: the background term moves the scores
    rel = det.relative_distances(xt)
    md0 = squared_distances(xt, det.background_mean[None], det.background_precision)
    assert (rel + md0 - squared_distances(xt, det.means, det.precision)).abs().max() < 1e-9
    assert md0.min() > 1.0
    np.testing.assert_allclose(
        det.background_mean.numpy(), x.double().mean(0).numpy(), rtol=1e-12, atol=1e-12
    )


def test_rmds_streamed_fit_equals_one_batch_and_round_trips(net: LinearHeadNet) -> None:
    x, y = _data()
    xt, _ = _data(30, seed=5)
    one = _fit(RMDS(), net, x, y, batch=N)
    many = _fit(RMDS(), net, x, y, batch=23)
    torch.testing.assert_close(_score(many, net, xt), _score(one, net, xt), rtol=1e-10, atol=1e-9)
    state = many.state_dict()
    assert not {"outer", "class_sum", "class_count"} & set(state)
    fresh = RMDS()
    fresh.load_state_dict(state)
    assert torch.equal(_score(fresh, net, xt), _score(many, net, xt))


def test_rmds_refuses_missing_classes_and_bad_labels(net: LinearHeadNet) -> None:
    x, y = _data(40)
    with pytest.raises(ValueError, match=r"classes \[3\] have no training samples"):
        _fit(RMDS(), net, x, y.clamp(max=2))
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        _fit(RMDS(), net, x, y + 1)
    with pytest.raises(RuntimeError, match="not fitted"):
        RMDS().score(net.extract(x))


def test_rmds_matches_pytorch_ood_up_to_its_covariance_scale(net: LinearHeadNet) -> None:
    """pytorch-ood 0.4.0 ``RMD`` (detector/rmd.py:108-112, mahalanobis.py:118-127) sums the
    centred outer products without dividing by N (plus a 1e-6 ridge) for both Gaussians, so
    its distances are ours / N, and its score is ``min_k(MD_k - MD_0)``: ours = -N * theirs."""
    from pytorch_ood.detector import RMD

    x, y = _data()
    xt, _ = _data(30, seed=5, shift=0.7)
    ours = _score(_fit(RMDS(), net, x, y), net, xt)
    # In float32 its MD_k - MD_0 cancellation costs ~2e-4 relative; its buffers follow the
    # default dtype, so run it in float64 to compare at 1e-5.
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs = RMD(None).fit_features(x.double(), y).predict_features(xt.double())
    finally:
        torch.set_default_dtype(dtype)
    torch.testing.assert_close(ours, -N * theirs, rtol=1e-5, atol=1e-6)
