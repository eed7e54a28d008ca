"""GradNorm, NCI and fDBD: the closed forms against autograd and independent numpy formulas,
streaming (multi-batch, multi-rank) training means, state and errors, and pytorch-ood 0.4.0's
GradNorm / NCI / fDBD as peer oracles."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors import DETECTORS, build_detector
from lightning_ood.detectors.base import Detector, Reducer
from lightning_ood.detectors.fdbd import FDBD
from lightning_ood.detectors.gradnorm import GradNorm, gradnorm_score
from lightning_ood.detectors.nci import NCI
from lightning_ood.models.base import BackboneOutput


def d64(*rows: object) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def problem(
    seed: int = 0, n_train: int = 120, n_test: int = 24, q: int = 16, classes: int = 7
) -> tuple[LinearHeadNet, Tensor, Tensor]:
    """A float64 linear head and ReLU training/test features (inputs of LinearHeadNet)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, q, generator=g, dtype=torch.float64)
    b = torch.randn(classes, generator=g, dtype=torch.float64)
    train = (torch.randn(n_train, q, generator=g, dtype=torch.float64) + 0.5).relu()
    test = (torch.randn(n_test, q, generator=g, dtype=torch.float64) + 0.3).relu()
    return LinearHeadNet(w, b).eval(), train, test


def loader(x: Tensor, batch: int) -> list[tuple[Tensor, Tensor]]:
    return [(c, torch.zeros(len(c), dtype=torch.long)) for c in x.split(batch)]


def fit(
    det: Detector, model: LinearHeadNet, train: Tensor | None = None, batch: int = 32
) -> Detector:
    engine.fit_from_loader([det], model, None if train is None else loader(train, batch))
    return det


def score(det: Detector, model: LinearHeadNet, h: Tensor) -> Tensor:
    with torch.no_grad():
        return engine.score_batch({"d": det}, model.extract(h))["d"]


# == GradNorm ======================================================================================
def autograd_gradnorm(
    model: LinearHeadNet, h: Tensor, temperature: float, include_bias: bool, reduce: str = "kl"
) -> Tensor:
    """Per-sample backward passes through a copy of the head (the paper's definition):
    ``reduce="kl"``: D_KL(u || softmax(f/T)) written out; ``"sum"``: the authors' loss
    ``sum_c -log softmax(f/T)_c`` (test_ood.py ``iterate_data_gradnorm``)."""
    scores = []
    for x in h:
        fc = nn.Linear(model.num_features, model.num_classes, dtype=h.dtype)
        fc.load_state_dict(model.fc.state_dict())
        log_p = torch.log_softmax(fc(x[None]) / temperature, dim=1)[0]
        u = torch.full_like(log_p, 1.0 / log_p.numel())
        loss = (u * (u.log() - log_p)).sum() if reduce == "kl" else -log_p.sum()
        params = [fc.weight, fc.bias] if include_bias else [fc.weight]
        grads = torch.autograd.grad(loss, params)
        scores.append(sum(g.abs().sum() for g in grads))
    return torch.stack(scores)


@pytest.mark.parametrize("include_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_gradnorm_closed_form_equals_autograd_per_sample(
    temperature: float, include_bias: bool
) -> None:
    model, _, h = problem(1)
    h = torch.cat([h, -h[:3], torch.zeros(1, h.shape[1], dtype=h.dtype)])  # signs, zero
    det = fit(GradNorm(temperature=temperature, include_bias=include_bias), model)
    want = autograd_gradnorm(model, h, temperature, include_bias)
    torch.testing.assert_close(score(det, model, h), want, rtol=1e-12, atol=1e-15)


def test_gradnorm_by_hand_and_the_reference_scale() -> None:
    # W = I, b = 0, h = [1, -2]: p = softmax([1, -2]) = [s, 1 - s] with s = sigmoid(3);
    # ||p - u||_1 = 2 (s - 1/2), ||h||_1 = 3.
    model = LinearHeadNet(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    h = d64([1.0, -2.0])
    s = 1 / (1 + math.exp(-3.0))
    torch.testing.assert_close(score(fit(GradNorm(), model), model, h), d64(3 * 2 * (s - 0.5)))
    with_bias = fit(GradNorm(include_bias=True), model)
    torch.testing.assert_close(score(with_bias, model, h), d64(4 * 2 * (s - 0.5)))
    # The authors' loss sums -log p over the L classes instead of averaging: L times ours.
    big, _, x = problem(2, classes=5)
    ours = score(fit(GradNorm(temperature=2.0), big), big, x)
    reference = autograd_gradnorm(big, x, 2.0, False, reduce="sum")
    torch.testing.assert_close(reference, 5 * ours, rtol=1e-12, atol=0)


@pytest.mark.parametrize("include_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradnorm_equals_pytorch_ood(temperature: float, include_bias: bool) -> None:
    """pytorch_ood/detector/gradnorm.py: per-sample torch.func gradients of
    ``-(logits/T).log_softmax().mean()`` (cross-entropy to uniform: the KL up to a constant, so
    the same gradient) of the selected parameters, score negated. Weight only = ours by
    default; every parameter of the head = ``include_bias``."""
    detector = importlib.import_module("pytorch_ood.detector")  # dev extra
    model, _, h = problem(3)
    ours = score(fit(GradNorm(temperature=temperature, include_bias=include_bias), model), model, h)
    select = None if include_bias else (lambda name: name == "weight")
    peer = detector.GradNorm(model.fc, param_filter=select, temperature=temperature)
    torch.testing.assert_close(ours, -peer.predict(h), rtol=1e-10, atol=0)


def test_gradnorm_function_matches_the_detector() -> None:
    model, _, h = problem(4)
    logits = model.fc(h).detach()
    det = fit(GradNorm(temperature=3.0, include_bias=True), model)
    torch.testing.assert_close(gradnorm_score(h, logits, 3.0, True), score(det, model, h))


# == NCI ===========================================================================================
def nci_numpy(
    train: np.ndarray, w: np.ndarray, b: np.ndarray, h: np.ndarray, alpha: float, cosine: bool
) -> np.ndarray:
    """OpenOOD v1.5 nci_postprocessor.py, written out in numpy (per-sample rows)."""
    mu = train.mean(axis=0)
    out = np.empty(len(h))
    for i, x in enumerate(h):
        c = int(np.argmax(w @ x + b))
        z = x - mu
        p = w[c] @ z / np.linalg.norm(z)
        if cosine:
            p /= np.linalg.norm(w[c])
        out[i] = p + alpha * np.abs(x).sum()
    return out


@pytest.mark.parametrize(("alpha", "cosine"), [(0.0, False), (1e-4, False), (0.1, True)])
def test_nci_equals_numpy_formula(alpha: float, cosine: bool) -> None:
    model, train, h = problem(5)
    det = fit(NCI(alpha=alpha, cosine=cosine), model, train)
    w, b = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    want = nci_numpy(train.numpy(), w, b, h.numpy(), alpha, cosine)
    np.testing.assert_allclose(score(det, model, h).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(det.feature_mean.numpy(), train.numpy().mean(axis=0), rtol=1e-14)
    assert float(det.count) == len(train) and det.feature_sum.numel() == 0  # sums dropped


def test_nci_by_hand() -> None:
    # W = [[1, 0], [0, 2]], b = 0, μ_G = [1, 1] (train [0, 0], [2, 2]); h = [3, 1]:
    # ŷ = 0 (logits [3, 2]), h - μ = [2, 0]: pScore = 2 / 2 = 1; ||h||_1 = 4.
    model = LinearHeadNet(d64([1.0, 0.0], [0.0, 2.0]), d64(0.0, 0.0))
    det = fit(NCI(alpha=0.5), model, d64([0.0, 0.0], [2.0, 2.0]))
    torch.testing.assert_close(score(det, model, d64([3.0, 1.0])), d64(1.0 + 0.5 * 4))
    # h = [1, 3]: ŷ = 1 (logits [1, 6]), h - μ = [0, 2]: w_1·z / ||z|| = 4 / 2 = 2 (cosine: 1)
    torch.testing.assert_close(score(det, model, d64([1.0, 3.0])), d64(2.0 + 0.5 * 4))
    cos = fit(NCI(alpha=0.5, cosine=True), model, d64([0.0, 0.0], [2.0, 2.0]))
    torch.testing.assert_close(score(cos, model, d64([1.0, 3.0])), d64(1.0 + 0.5 * 4))
    # a feature exactly at the centre: pScore 0, not NaN
    torch.testing.assert_close(score(det, model, d64([1.0, 1.0])), d64(0.0 + 0.5 * 2))


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_nci_equals_pytorch_ood(alpha: float) -> None:
    """pytorch_ood/detector/nci.py ``predict_features``: -(w_ŷ·z/||z||) - alpha ||h||_1 with
    z = h - mean(train), in float32 (it casts features with ``.float()``)."""
    detector = importlib.import_module("pytorch_ood.detector")  # dev extra
    model, train, h = problem(6)
    ours = score(fit(NCI(alpha=alpha), model, train), model, h)
    head = nn.Linear(model.num_features, model.num_classes)
    head.load_state_dict({k: v.float() for k, v in model.fc.state_dict().items()})
    peer = detector.NCI(nn.Identity(), head, alpha=alpha).fit_features(train.float())
    theirs = -peer.predict_features(h.float()).double()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# == fDBD ==========================================================================================
def fdbd_numpy(
    train: np.ndarray, w: np.ndarray, b: np.ndarray, h: np.ndarray, distance: bool = True
) -> np.ndarray:
    """The paper's formula with an explicit loop over classes: the mean, over c != ŷ, of the
    distance |(w_ŷ - w_c)·h + b_ŷ - b_c| / ||w_ŷ - w_c|| over ||h - μ|| (or ||h||)."""
    mu = train.mean(axis=0)
    out = np.empty(len(h))
    for i, x in enumerate(h):
        y = int(np.argmax(w @ x + b))
        d = [
            abs((w[y] - w[c]) @ x + b[y] - b[c]) / np.linalg.norm(w[y] - w[c])
            for c in range(len(w))
            if c != y
        ]
        out[i] = np.mean(d) / np.linalg.norm(x - mu if distance else x)
    return out


@pytest.mark.parametrize("distance", [True, False])
def test_fdbd_equals_numpy_formula(distance: bool) -> None:
    model, train, h = problem(7)
    det = fit(FDBD(distance_as_normalizer=distance), model, train)
    w, b = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    want = fdbd_numpy(train.numpy(), w, b, h.numpy(), distance)
    np.testing.assert_allclose(score(det, model, h).numpy(), want, rtol=1e-12)
    # the authors' run_cifar.py sums over the classes instead: (L - 1) times ours
    mu = train.numpy().mean(axis=0)
    logits = h.numpy() @ w.T + b
    top = logits.max(axis=1, keepdims=True)
    denom = np.linalg.norm(w[:, None, :] - w[None, :, :], axis=2) + np.eye(len(w))
    pred = logits.argmax(axis=1)
    summed = (np.abs(logits - top) / denom[pred]).sum(axis=1)
    summed /= np.linalg.norm(h.numpy() - (mu if distance else 0.0), axis=1)
    np.testing.assert_allclose(summed, (len(w) - 1) * score(det, model, h).numpy(), rtol=1e-12)


def test_fdbd_by_hand() -> None:
    # W = [[1, 0], [0, 1], [-1, 0]], b = 0, h = [2, 1]: logits [2, 1, -2], ŷ = 0.
    # Boundary 0|1: |2 - 1| / ||[1, -1]|| = 1/√2; boundary 0|2: |2 + 2| / ||[2, 0]|| = 2.
    model = LinearHeadNet(d64([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]), d64(0.0, 0.0, 0.0))
    train = d64([0.0, 0.0], [2.0, 0.0])  # μ = [1, 0]: ||h - μ|| = √2, ||h|| = √5
    mean_distance = (1 / math.sqrt(2) + 2) / 2
    det = fit(FDBD(), model, train)
    torch.testing.assert_close(
        score(det, model, d64([2.0, 1.0])), d64(mean_distance / math.sqrt(2))
    )
    norm = fit(FDBD(distance_as_normalizer=False), model, train)
    torch.testing.assert_close(
        score(norm, model, d64([2.0, 1.0])), d64(mean_distance / math.sqrt(5))
    )
    s2 = math.sqrt(2)
    torch.testing.assert_close(det.boundary_norm, d64([1, s2, 2], [s2, 1, s2], [2, s2, 1]))


def test_fdbd_equals_pytorch_ood() -> None:
    """pytorch_ood/detector/fdbd.py ``predict_features``: the same mean over the L - 1
    non-predicted classes over ||z - μ||, negated, in float32."""
    detector = importlib.import_module("pytorch_ood.detector")  # dev extra
    model, train, h = problem(8)
    ours = score(fit(FDBD(), model, train), model, h)
    head = nn.Linear(model.num_features, model.num_classes)
    head.load_state_dict({k: v.float() for k, v in model.fc.state_dict().items()})
    peer = detector.fDBD(nn.Identity(), head).fit_features(train.float())
    theirs = -peer.predict_features(h.float()).double()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_fdbd_refuses_heads_without_boundaries() -> None:
    w = d64([1.0, 0.0], [0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="classes 0 and 2 have identical weight vectors"):
        fit(FDBD(), LinearHeadNet(w, d64(0.0, 1.0, 2.0)), d64([1.0, 1.0]))
    with pytest.raises(ValueError, match="the head has 1 class"):
        fit(FDBD(), LinearHeadNet(d64([1.0, 0.0]), d64(0.0)), d64([1.0, 1.0]))


# == the training mean: streaming, ranks, state ====================================================
class OtherRank(Reducer):
    """Rank 0's view of a 2-rank run: ``sum`` adds the other rank's tensor of the same shape."""

    def __init__(self, other: Detector) -> None:
        self.other = {tuple(t.shape): t for t in (other.feature_sum, other.count)}

    def sum(self, t: Tensor) -> Tensor:
        return t + self.other[tuple(t.shape)]


def accumulated(det: Detector, model: LinearHeadNet, rows: Tensor) -> Detector:
    """``det`` after the engine's accumulation pass over ``rows`` (one rank's shard; no
    batch at all when empty), not finalized."""
    passes = engine.eval_pass(model, loader(rows, 16) if len(rows) else [])
    engine.fit_detectors([det], model, engine.labelled(passes), finalize=False)
    return det


@pytest.mark.parametrize("make", [NCI, FDBD])
def test_streaming_fit_equals_one_batch_and_ranks_combine(make: type[Detector]) -> None:
    model, train, h = problem(9, n_train=101)
    one = fit(make(), model, train, batch=len(train))
    many = fit(make(), model, train, batch=16)  # 7 batches, the last one short
    torch.testing.assert_close(many.feature_mean, one.feature_mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(score(many, model, h), score(one, model, h), rtol=1e-12, atol=0)

    # Two ranks: each sums its shard; finalize adds the other's sums (reducer.sum).
    rank0 = accumulated(make(), model, train[:60])
    engine.finalize_detectors([rank0], model, OtherRank(accumulated(make(), model, train[60:])))
    assert float(rank0.count) == 101
    torch.testing.assert_close(rank0.feature_mean, one.feature_mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(score(rank0, model, h), score(one, model, h), rtol=1e-12, atol=0)
    # a rank that saw no batch still joins the reduction with zero sums
    idle = accumulated(make(), model, train[:0])
    assert idle.feature_sum.numel() == 0
    engine.finalize_detectors([idle], model, OtherRank(accumulated(make(), model, train)))
    torch.testing.assert_close(idle.feature_mean, one.feature_mean, rtol=1e-14, atol=0)


@pytest.mark.parametrize(("make", "kwargs"), [(NCI, {"alpha": 0.01, "cosine": True}), (FDBD, {})])
def test_checkpoint_round_trip(make: type[Detector], kwargs: dict) -> None:
    model, train, h = problem(10)
    det = fit(make(**kwargs), model, train)
    fresh = make(**kwargs)
    fresh.load_state_dict(det.state_dict())
    assert fresh.is_fitted and fresh.config() == det.config()
    assert torch.equal(score(fresh, model, h), score(det, model, h))


@pytest.mark.parametrize("make", [GradNorm, NCI, FDBD])
def test_fitted_flag_and_wrong_width(make: type[Detector]) -> None:
    model, train, h = problem(11)
    det = make()
    assert det.requires_fit and not det.is_fitted
    with pytest.raises(RuntimeError, match=r"detector '\w+' .* is not fitted"):
        det.score(model.extract(h))
    if make is GradNorm:  # the head only
        assert not engine.reads_training_data(det)
        engine.fit_detectors([det], model)
    else:  # the training mean
        assert engine.reads_training_data(det)
        with pytest.raises(ValueError, match="are fitted on the training set"):
            engine.fit_detectors([det], model)
        with pytest.raises(RuntimeError, match="no training sample was seen"):
            det.finalize(model)
        assert not det.is_fitted
        fit(det, model, train)
    assert det.is_fitted
    with pytest.raises(ValueError, match=r"features must have shape \(B, 16\), got \(2, 3\)"):
        det.score(BackboneOutput(torch.zeros(2, 3), torch.zeros(2, 7)))
    empty = torch.zeros(0, 16, dtype=torch.float64)
    assert det.score(BackboneOutput(empty, torch.zeros(0, 7))).shape == (0,)
    det.mark_unfitted()
    with pytest.raises(RuntimeError, match="not fitted"):
        det.score(model.extract(h))


def test_bad_hyperparameters_are_named() -> None:
    with pytest.raises(ValueError, match=r"GradNorm: hyperparameter temperature=0.0 is out"):
        GradNorm(temperature=0.0)
    with pytest.raises(ValueError, match=r"GradNorm: hyperparameter include_bias='yes' must be"):
        GradNorm(include_bias="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"NCI: hyperparameter alpha=-0.1 is out of range"):
        NCI(alpha=-0.1)
    with pytest.raises(ValueError, match=r"NCI: hyperparameter cosine='false' must be"):
        NCI(cosine="false")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"FDBD: hyperparameter distance_as_normalizer=1 must"):
        FDBD(distance_as_normalizer=1)  # type: ignore[arg-type]


def test_declared_contract() -> None:
    assert (GradNorm.kind, NCI.kind, FDBD.kind) == ("gradnorm", "nci", "fdbd")
    assert GradNorm.search_space == {}
    assert NCI.search_space == {"alpha": (1e-4, 1e-3, 1e-2, 1e-1)}
    assert FDBD.search_space == {"distance_as_normalizer": (True, False)}
    assert GradNorm.finalize_only == {"temperature", "include_bias"}
    assert NCI.finalize_only == {"alpha", "cosine"}
    assert FDBD.finalize_only == {"distance_as_normalizer"}
    assert not GradNorm.uses_training_data and NCI.uses_training_data and FDBD.uses_training_data
    assert NCI().config() == {"type": "nci", "alpha": 1e-4, "cosine": False, "name": "nci"}


@pytest.mark.parametrize(("kind", "cls"), [("gradnorm", GradNorm), ("nci", NCI), ("fdbd", FDBD)])
def test_registry(kind: str, cls: type[Detector]) -> None:
    assert kind in DETECTORS, f"{kind!r} is missing from the detector registry"
    assert DETECTORS[kind] is cls
    assert isinstance(build_detector("x", {"type": kind}), cls)
