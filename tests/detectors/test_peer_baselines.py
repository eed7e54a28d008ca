"""Baselines cross-checked against the peer library pytorch-ood 0.4.0 (a dev-only oracle).

For each detector both implementations see the SAME numbers: a float64 ``LinearHeadNet`` (its
features are its inputs; ``TapNet`` for image-shaped ODIN inputs), fitted on the same
``(x, y)`` batches. pytorch-ood returns outlier scores (higher = more OOD), ours are
in-distribution scores (higher = more ID), so every relation below carries a sign; where a
convention differs (a normalising constant, a dtype, a ridge) the comment names the line on
both sides — ours ``lightning_ood/detectors/<name>.py``, theirs
``pytorch_ood/detector/<name>.py`` (0.4.0) — and the test asserts the exact relation. Each
pair is also checked against the paper's equation written independently in numpy here.

Conventions found (ours vs theirs):

* MSP, MaxLogit, Energy (T = 1, 2), ODIN with epsilon 0: ours = -theirs.
* GEN: theirs averages over the top-M (gen.py:102) where ours sums (gen.py:20) and clamps
  the probabilities to [1e-7, 1 - 1e-7] (gen.py:96): ours = -min(M, L) * theirs away from the
  clamp.
* ReAct: theirs takes ``np.percentile`` of ALL training activations (react.py:135, 160), the
  same exact estimator as ours (react.py:79 → linear_head.py ``ActivationSampler``, also exact
  past ``max_samples`` with a second pass); the percentile is a fraction (0.9) there.
* DICE: ``p`` is a fraction there, a percentage here; theirs thresholds with
  ``torch.quantile`` in float32 (dice.py:136-146), ours with an exact float64 percentile
  (dice.py:79-81); no class composes DICE with ReAct there, so it is composed by hand.
* Mahalanobis: theirs sums the centred outer products without dividing by N, adds a 1e-6
  ridge and inverts (mahalanobis.py:123-127) and scores half the distance (mahalanobis.py:140);
  ours divides by N and takes ``pinv`` (mahalanobis.py:181-185): ours = -2N * theirs up to the
  ridge. Its buffers follow the default dtype (mahalanobis.py:115-116), so it runs in float64.
* ODIN epsilon > 0: theirs averages the loss (odin.py:73), ours sums it (odin.py:78): same
  sign. A zero gradient steps by 0 there (``Tensor.sign``, odin.py:75) and by -epsilon here
  (``>= 0`` → +1, odin.py:80, as the ODIN reference code's ``torch.ge``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import numpy as np
import pytest
import torch
from pytorch_ood import detector as pood
from pytorch_ood.detector.odin import odin_preprocessing
from torch import Tensor
from toys import LinearHeadNet, TapNet, fitted

from lightning_ood import engine
from lightning_ood.detectors import ODIN, Detector
from lightning_ood.models.base import OODBackbone

L, Q, N = 5, 12, 240  # classes, feature width, training samples
RTOL, ATOL = 1e-5, 1e-9
Batches = list[tuple[Tensor, Tensor]]


# -- toy data and helpers ------------------------------------------------------------------------
def toy(seed: int = 0) -> tuple[LinearHeadNet, Batches, Tensor]:
    """A float64 linear head on non-negative class-clustered features, the training batches
    (every class present) and 40 test inputs (half shifted, so that ReAct clips).

    Every number is drawn in float32 and widened, so the peer's float32 casts (DICE) start
    from the same values."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(L, Q, generator=g) * 2
    y = torch.arange(N) % L
    h = (centres[y] + 0.5 * torch.randn(N, Q, generator=g)).abs().double()
    xt = torch.cat([torch.rand(20, Q, generator=g) * 2, torch.rand(20, Q, generator=g) * 4 + 1])
    w = (0.5 * torch.randn(L, Q, generator=g)).double()
    b = (0.1 * torch.randn(L, generator=g)).double()
    batches = list(zip(h.split(64), y.split(64), strict=True))
    return LinearHeadNet(w, b), batches, xt.double()


def train(batches: Batches) -> tuple[Tensor, Tensor]:
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def head(model: LinearHeadNet) -> tuple[np.ndarray, np.ndarray]:
    return model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()


def ours(det: Detector, model: OODBackbone, x: Tensor) -> Tensor:
    """Our scores of ``x`` through the engine (with the network and inputs, for ODIN); the
    forward runs under ``no_grad`` as in ``engine.eval_pass``."""
    with torch.no_grad():
        out = model.extract(x)
    return engine.score_batch({"d": det}, out, model, x)["d"]


def fit_ours(
    spec: dict[str, object], model: OODBackbone, batches: Batches | None = None
) -> Detector:
    """One detector built from a config entry and fitted by ``engine.fit_from_loader``."""
    return fitted({"d": spec}, model, batches)["d"]


def close(got: Tensor | np.ndarray, want: Tensor | np.ndarray) -> None:
    """Equal within 1e-5 relative (float64 on both sides)."""
    np.testing.assert_allclose(as_np(got), as_np(want), rtol=RTOL, atol=ATOL)


def as_np(t: Tensor | np.ndarray) -> np.ndarray:
    return t.detach().numpy() if isinstance(t, Tensor) else np.asarray(t)


@contextlib.contextmanager
def float64_default() -> Iterator[None]:
    """pytorch-ood allocates some buffers with the default dtype (mahalanobis.py:115-116)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


def np_lse(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return m[:, 0] + np.log(np.exp(z - m).sum(axis=1))


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_logits(model: LinearHeadNet, x: Tensor | np.ndarray) -> np.ndarray:
    w, b = head(model)
    return np.asarray(x) @ w.T + b


# -- logit-only scores ---------------------------------------------------------------------------
def test_msp_is_minus_max_softmax() -> None:
    """ours msp.py:21 max softmax; theirs softmax.py:73 ``-softmax(z/t).max``, t = 1."""
    model, _, xt = toy()
    got = ours(fit_ours({"type": "msp"}, model), model, xt)
    theirs = pood.MaxSoftmax(model).predict(xt)
    assert got.dtype == theirs.dtype == torch.float64
    close(got, -theirs)
    close(got, np_softmax(np_logits(model, xt)).max(axis=1))  # Hendrycks & Gimpel: max_k S_k
    assert float(got.min()) > 1.0 / L and float(got.max()) < 1.0  # not a degenerate case


def test_maxlogit_is_minus_theirs() -> None:
    """ours maxlogit.py:23 ``amax``; theirs maxlogit.py:64 ``-max``."""
    model, _, xt = toy()
    got = ours(fit_ours({"type": "maxlogit"}, model), model, xt)
    close(got, -pood.MaxLogit(model).predict(xt))
    close(got, np_logits(model, xt).max(axis=1))


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_energy_is_minus_the_free_energy(t: float) -> None:
    """ours energy.py:16 ``T·logsumexp(z/T)``; theirs energy.py:70 ``-T·logsumexp(z/T)``."""
    model, _, xt = toy()
    got = ours(fit_ours({"type": "energy", "temperature": t}, model), model, xt)
    close(got, -pood.EnergyBased(model, t=t).predict(xt))
    close(got, t * np_lse(np_logits(model, xt) / t))  # Liu et al. eq. (2), negated


@pytest.mark.parametrize(
    ("gamma", "m_ours", "m_theirs"), [(0.1, 100, None), (0.1, 5, 5), (0.5, 3, 3), (1.0, 1, 1)]
)
def test_gen_is_minus_m_times_theirs(gamma: float, m_ours: int, m_theirs: int | None) -> None:
    """ours gen.py:19-20 SUM over the top-M; theirs gen.py:99-102 MEAN over the top-M (``None``
    = every class), on probabilities clamped to [1e-7, 1 - 1e-7] (gen.py:96):
    ours = -min(M, L) * theirs wherever the clamp is inactive."""
    model, _, xt = toy()
    z = np_logits(model, xt)
    p = np_softmax(z)
    assert p.min() > 1e-6 and p.max() < 1 - 1e-6  # their clamp leaves these untouched
    got = ours(fit_ours({"type": "gen", "gamma": gamma, "M": m_ours}, model), model, xt)
    theirs = pood.GEN(model, gamma=gamma, M=m_theirs).predict(xt)
    close(got, -min(m_ours, L) * theirs)
    top = np.sort(p, axis=1)[:, ::-1][:, : min(m_ours, L)]
    close(got, -(top**gamma * (1 - top) ** gamma).sum(axis=1))  # Liu et al. 2023, negated


# -- ReAct -----------------------------------------------------------------------------------------
def np_react(model: LinearHeadNet, x: Tensor, c: float, t: float = 1.0) -> np.ndarray:
    """Sun et al. 2021: energy of W·min(h, c) + b."""
    return t * np_lse(np_logits(model, np.minimum(x.numpy(), c)) / t)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_react_fixed_clip(t: float) -> None:
    """ours react.py:86 ``clamp(max=c)`` then energy; theirs react.py:190 ``clip(max=c)``,
    head, then ``detector`` (EnergyBased.score; ``t`` passed through for T = 2)."""
    model, _, xt = toy()
    got = ours(fit_ours({"type": "react", "clip": 1.5, "temperature": t}, model), model, xt)
    energy = partial(pood.EnergyBased.score, t=t)
    ref = pood.ReAct(model.forward_features, model.fc, threshold=1.5, detector=energy)
    close(got, -ref.predict(xt))
    close(got, np_react(model, xt, 1.5, t))
    assert (xt > 1.5).any()  # the clip is active


@pytest.mark.parametrize("max_samples", [1 << 26, 1000])
def test_react_percentile_equals_theirs_exactly(max_samples: int) -> None:
    """Both take the exact linear-interpolation percentile of ALL training activations: ours
    react.py:79 (``ActivationSampler``; beyond ``max_samples`` = 1000 < N·Q = 2880 by an exact
    radix selection over a second pass), theirs react.py:135 + 160 (``np.percentile`` of every
    flattened activation; ``percentile`` a fraction: 0.9 ↔ 90)."""
    model, batches, xt = toy()
    det = fit_ours(
        {"type": "react", "percentile": 90.0, "max_samples": max_samples}, model, batches
    )
    ref = pood.ReAct(model.forward_features, model.fc, percentile=0.9).fit(batches)
    h, _ = train(batches)
    c = float(np.percentile(h.numpy(), 90.0))
    # 0.9 * 100 = 90.00000000000001 on their side: equal to rounding, not bit for bit
    assert float(det.clip_value) == pytest.approx(ref.threshold, rel=1e-12)
    assert float(det.clip_value) == pytest.approx(c, rel=1e-12)
    got = ours(det, model, xt)
    close(got, -ref.predict(xt))
    close(got, np_react(model, xt, c))


# -- DICE ------------------------------------------------------------------------------------------
def np_dice_mask(model: LinearHeadNet, h: Tensor, p: float) -> np.ndarray:
    """Sun & Li 2022: keep the weights whose contribution ā ⊙ W exceeds its p-th percentile."""
    w, _ = head(model)
    v = h.numpy().mean(axis=0)[None, :] * w
    return v > np.percentile(v, p)


def np_dice(model: LinearHeadNet, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    w, b = head(model)
    return np_lse(x @ (w * mask).T + b)


@pytest.mark.parametrize("p", [50.0, 90.0])
def test_dice_with_p_as_a_fraction(p: float) -> None:
    """ours dice.py:79-81 (float64 mean, exact percentile, strict ``>``) and dice.py:89-91;
    theirs dice.py:136-146 (float32 mean and weights, ``torch.quantile``, strict ``>``) and
    dice.py:116-118: the same mask, ours = -theirs to float32 rounding of the weights."""
    model, batches, xt = toy()
    det = fit_ours({"type": "dice", "p": p}, model, batches)
    ref = pood.DICE(model.forward_features, model.fc.weight, model.fc.bias, p=p / 100).fit(batches)
    h, _ = train(batches)
    want_mask = np_dice_mask(model, h, p)
    assert torch.equal(det.mask, ref.masked_w != 0)  # no weight is 0 in the toy head
    assert np.array_equal(det.mask.numpy(), want_mask)
    assert int(det.mask.sum()) == round(L * Q * (1 - p / 100))
    assert float(det.prune_threshold) == pytest.approx(ref.threshold, rel=1e-5)
    got = ours(det, model, xt)
    close(got, -ref.predict(xt))
    close(got, np_dice(model, xt.numpy(), want_mask))


def test_dice_react_composed_by_hand() -> None:
    """pytorch-ood 0.4.0 has no DICE+ReAct (its DICE takes an encoder and a logit scorer, no
    clip): compose it as ours does (dice_react.py: mask from the UNCLIPPED training mean, test
    features clipped at the exact training percentile) — their DICE fitted on the raw features,
    scoring features clipped at their ReAct threshold."""
    model, batches, xt = toy()
    det = fit_ours({"type": "dice_react", "p": 70.0, "percentile": 90.0}, model, batches)
    react = pood.ReAct(model.forward_features, model.fc, percentile=0.9).fit(batches)
    dice = pood.DICE(None, model.fc.weight, model.fc.bias, p=0.7).fit_features(*train(batches))
    theirs = dice.predict_features(xt.clip(max=react.threshold))
    assert float(det.clip_value) == pytest.approx(react.threshold, rel=1e-12)
    assert torch.equal(det.mask, dice.masked_w != 0)
    got = ours(det, model, xt)
    close(got, -theirs)
    h, _ = train(batches)
    c = np.percentile(h.numpy(), 90.0)
    close(got, np_dice(model, np.minimum(xt.numpy(), c), np_dice_mask(model, h, 70.0)))
    # the clip matters: unclipped DICE with the same mask scores otherwise
    assert not np.allclose(got.numpy(), np_dice(model, xt.numpy(), det.mask.numpy()))


# -- Mahalanobis -----------------------------------------------------------------------------------
def np_mahalanobis_fit(h: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Lee et al. 2018 eq. (1): class means and Σ = 1/N Σ_k Σ_{i: y_i = k} (f_i - μ_k)(·)ᵀ."""
    f, labels = h.numpy(), y.numpy()
    means = np.stack([f[labels == k].mean(axis=0) for k in range(L)])
    centred = f - means[labels]
    return means, centred.T @ centred / len(f)


def np_mahalanobis(x: np.ndarray, means: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Lee et al. eq. (2): M(x) = max_k -(f(x) - μ_k)ᵀ Σ⁻¹ (f(x) - μ_k)."""
    prec = np.linalg.inv(cov)
    d = np.stack([np.einsum("bi,ij,bj->b", x - m, prec, x - m) for m in means], axis=1)
    return -d.min(axis=1)


def test_mahalanobis_is_minus_2n_times_theirs() -> None:
    """ours mahalanobis.py:181 Σ = S / N, :185 ``pinv``, score -min_k d_k; theirs
    mahalanobis.py:123 S (centred outer products, NOT divided by N), :126 + 1e-6·I, :127
    ``inv``, :140 + :159 score ½·min_k d_k: ours = -2N * theirs up to the ridge
    (1e-6 / λ_min(S) < 1e-7 here, and the scores agree to 1e-7)."""
    model, batches, xt = toy()
    det = fit_ours({"type": "mahalanobis"}, model, batches)
    with float64_default():
        ref = pood.Mahalanobis(model.forward_features).fit(batches)
        theirs = ref.predict(xt)
    assert ref.mu.dtype == ref.cov.dtype == torch.float64
    eye = torch.eye(Q, dtype=torch.float64)
    torch.testing.assert_close(det.means(0), ref.mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(N * det.covariance(0) + 1e-6 * eye, ref.cov, rtol=1e-12, atol=1e-9)
    assert 1e-6 / float(torch.linalg.eigvalsh(ref.cov).min()) < 1e-7
    got = ours(det, model, xt)
    close(got, -2 * N * theirs)
    np.testing.assert_allclose(got.numpy(), -2 * N * theirs.numpy(), rtol=1e-7)
    means, cov = np_mahalanobis_fit(*train(batches))
    close(det.covariance(0), cov)
    close(got, np_mahalanobis(xt.numpy(), means, cov))


def test_mahalanobis_input_preprocessing_is_minus_2n_times_theirs() -> None:
    """Lee et al.'s x̃ = x - ε·sign(∇ₓ d_k̂(x)), k̂ the closest class: ours
    mahalanobis.py:214-215 (``>= 0`` → +1), theirs MahalanobisODIN mahalanobis.py:298-316
    (``mean(½ d_k̂)``: the same sign; ``torch.sign``); the features of the linear toy are its
    inputs, so the gradient 2·Σ⁻¹(x - μ_k̂) is never 0 here and both steps agree."""
    model, batches, xt = toy()
    eps = 0.05
    det = fit_ours({"type": "mahalanobis", "epsilon": eps}, model, batches)
    with float64_default():
        ref = pood.MahalanobisODIN(model.forward_features, eps=eps).fit(batches)
        theirs = ref.predict(xt.clone())
    got = ours(det, model, xt)
    close(got, -2 * N * theirs)
    means, cov = np_mahalanobis_fit(*train(batches))
    prec = np.linalg.inv(cov)
    x = xt.numpy()
    d = np.stack([np.einsum("bi,ij,bj->b", x - m, prec, x - m) for m in means], axis=1)
    grad = 2 * (x - means[d.argmin(axis=1)]) @ prec
    assert (grad != 0).all()
    want = np_mahalanobis(x - eps * np.sign(grad), means, cov)
    close(got, want)
    assert (want > np_mahalanobis(x, means, cov)).all()  # the step raises every score


# -- ODIN ------------------------------------------------------------------------------------------
def np_odin(model: LinearHeadNet, x: Tensor, t: float, eps: float, std: np.ndarray) -> np.ndarray:
    """Liang et al. 2018 on f(x) = Wx + b: ∇ₓ(-log S_ŷ(x; T)) = Wᵀ(S(x; T) - e_ŷ) / T;
    x' = x - ε·sign(∇)/std; score max_k S_k(x'; T)."""
    w, _ = head(model)
    s = np_softmax(np_logits(model, x) / t)
    onehot = np.eye(L)[s.argmax(axis=1)]
    grad = (s - onehot) @ w / t
    assert (grad != 0).all()
    x_new = x.numpy() - eps * np.sign(grad) / std
    return np_softmax(np_logits(model, x_new) / t).max(axis=1)


@pytest.mark.parametrize("t", [1.0, 10.0, 1000.0])
def test_odin_without_perturbation_is_temperature_scaled_msp(t: float) -> None:
    """epsilon 0: ours odin.py:102 max softmax(z/T) of the clean logits; theirs odin.py:177-179
    ``-softmax(z(x̂)/T).max`` with x̂ = x - 0·sign (odin.py:80), and MaxSoftmax with t = T."""
    model, _, xt = toy()
    got = ours(fit_ours({"type": "odin", "temperature": t, "epsilon": 0.0}, model), model, xt)
    close(got, -pood.ODIN(model, eps=0.0, temperature=t).predict(xt))
    close(got, -pood.MaxSoftmax(model, t=t).predict(xt))
    close(got, np_softmax(np_logits(model, xt) / t).max(axis=1))


@pytest.mark.parametrize(("t", "eps"), [(1.0, 0.05), (1000.0, 0.0014)])
def test_odin_perturbation_on_a_linear_toy(t: float, eps: float) -> None:
    """Same model, same inputs, the per-channel std matched (ours ``input_std``, theirs
    ``norm_std``; both divide the signed step along dim 1: odin.py:87-88 / odin.py:76-78).
    Theirs averages the cross-entropy over the batch (odin.py:73, ``F.cross_entropy``), ours
    sums it (odin.py:78): the gradient differs by 1/B, its sign does not."""
    model, _, xt = toy()
    std = np.linspace(0.5, 2.0, Q)
    spec = {"type": "odin", "temperature": t, "epsilon": eps, "input_std": std.tolist()}
    det = fit_ours(spec, model)
    got = ours(det, model, xt)
    theirs = pood.ODIN(model, eps=eps, temperature=t, norm_std=std.tolist()).predict(xt)
    close(got, -theirs)
    close(got, np_odin(model, xt, t, eps, std))
    ref_x = odin_preprocessing(model, xt, eps=eps, temperature=t, norm_std=std.tolist())
    close(det.perturb(model, xt), ref_x)
    clean = np_softmax(np_logits(model, xt) / t).max(axis=1)
    assert (got.numpy() > clean).all()  # the step raises every score


def test_odin_perturbation_on_image_inputs() -> None:
    """TapNet (2-channel 4x4 inputs, conv + ReLU): the per-channel std broadcast over H, W
    alike on both sides; every input gradient is non-zero, so the sign conventions agree."""
    torch.manual_seed(3)
    model = TapNet().double().eval()
    x = torch.randn(16, 2, 4, 4, dtype=torch.float64)
    std, t, eps = [0.25, 0.5], 1000.0, 0.01
    unit = odin_preprocessing(model, x, eps=1.0, temperature=t)
    assert ((x - unit).abs() > 0.5).all()  # sign(∇) is ±1 everywhere: no zero gradient
    det = fit_ours({"type": "odin", "temperature": t, "epsilon": eps, "input_std": std}, model)
    got = ours(det, model, x)
    close(got, -pood.ODIN(model, eps=eps, temperature=t, norm_std=std).predict(x))
    close(det.perturb(model, x), odin_preprocessing(model, x, eps=eps, temperature=t, norm_std=std))


def test_odin_zero_gradient_convention_differs() -> None:
    """Where ∇ₓ is exactly 0 (an input the logits ignore) ours steps by -ε (odin.py:80,
    ``grad >= 0`` → +1, the ODIN reference's ``torch.ge``) and theirs by 0 (odin.py:75,
    ``Tensor.sign``); elsewhere the perturbed inputs agree, and the score cannot tell."""
    model, _, xt = toy()
    with torch.no_grad():
        model.fc.weight[:, 0] = 0.0  # feature 0 never reaches the logits
    eps, t = 0.1, 1.0
    det = ODIN(temperature=t, epsilon=eps)
    mine = det.perturb(model, xt)
    theirs = odin_preprocessing(model, xt, eps=eps, temperature=t)
    torch.testing.assert_close(mine[:, 0], xt[:, 0] - eps, rtol=0, atol=0)
    torch.testing.assert_close(theirs[:, 0], xt[:, 0], rtol=0, atol=0)
    close(mine[:, 1:], theirs[:, 1:])
    close(ours(det, model, xt), -pood.ODIN(model, eps=eps, temperature=t).predict(xt))
