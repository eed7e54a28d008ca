"""LINe IntGrad contributions (paper eq. 9): equal to Taylor for a linear head, equal to an
independent numerical integral (scipy quad_vec of a hand-derived gradient) for an MLP head."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.integrate import quad_vec
from torch import Tensor, nn
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors import build_detector
from lightning_ood.detectors.line import (
    LINe,
    intgrad_contributions,
    taylor_contributions,
)
from lightning_ood.models.base import OODBackbone


class TanhMLPHeadNet(OODBackbone):
    """Inputs are the features; ``forward_head(h) = W tanh(A h + c) + b`` (a non-linear head
    whose last layer keeps LINe's (L, q) classifier shape)."""

    def __init__(self, q: int, num_classes: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_classes, self.num_features, self.input_shape = num_classes, q, (q,)
        self.pre = nn.Linear(q, q, dtype=torch.float64)
        self.fc = nn.Linear(q, num_classes, dtype=torch.float64)
        with torch.no_grad():  # large enough that tanh bends over the path α·h, α ∈ [0, 1]
            self.pre.weight.copy_(torch.randn(q, q, generator=g, dtype=torch.float64) * 1.5)
            self.pre.bias.copy_(torch.randn(q, generator=g, dtype=torch.float64))
            self.fc.weight.copy_(torch.randn(num_classes, q, generator=g, dtype=torch.float64))
            self.fc.bias.copy_(torch.randn(num_classes, generator=g, dtype=torch.float64))

    def forward_features(self, x: Tensor) -> Tensor:
        return x

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward_head(self, h: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.pre(h)))


def quad_contributions(model: TanhMLPHeadNet, h: Tensor, y: Tensor) -> np.ndarray:
    """h ⊙ ∫₀¹ ∇f_y(αh) dα by adaptive quadrature, with the gradient derived by hand:
    ∇f_y(u) = Aᵀ (W[y] ⊙ (1 - tanh²(A u + c))). No torch autograd involved."""
    a = model.pre.weight.detach().numpy()
    c = model.pre.bias.detach().numpy()
    w = model.fc.weight.detach().numpy()
    out = []
    for hi, yi in zip(h.numpy(), y.tolist(), strict=True):

        def grad(alpha: float, hi: np.ndarray = hi, yi: int = yi) -> np.ndarray:
            return a.T @ (w[yi] * (1.0 - np.tanh(a @ (alpha * hi) + c) ** 2))

        integral, err = quad_vec(grad, 0.0, 1.0, epsabs=1e-13, epsrel=1e-12)
        assert err < 1e-10
        out.append(hi * integral)
    return np.stack(out)


def mlp_data() -> tuple[TanhMLPHeadNet, Tensor, Tensor]:
    model = TanhMLPHeadNet(q=6, num_classes=3, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    h = torch.rand(15, 6, generator=g, dtype=torch.float64) * 2
    return model, h, torch.arange(15) % 3


def fit(det: LINe, model: OODBackbone, h: Tensor, y: Tensor) -> LINe:
    engine.fit_from_loader([det], model, list(zip(h.split(8), y.split(8), strict=True)))
    return det


# -- linear head: IntGrad is exact and equals Taylor and the closed form ----------------------
@pytest.mark.parametrize("steps", [1, 3, 32])
def test_linear_head_intgrad_equals_taylor_and_closed_form(steps: int) -> None:
    torch.manual_seed(0)
    model = LinearHeadNet(torch.randn(7, 20).double(), torch.randn(7).double()).eval()
    h = torch.rand(90, 20).double() * 2
    y = torch.arange(90) % 7
    per_sample = intgrad_contributions(model.forward_head, h, y, steps)
    torch.testing.assert_close(per_sample, h * model.fc.weight.detach()[y], rtol=0, atol=1e-12)
    torch.testing.assert_close(per_sample, taylor_contributions(model.forward_head, h, y))
    dets = {
        c: fit(LINe(contribution=c, intgrad_steps=steps), model, h, y)
        for c in ("closed_form", "autograd", "intgrad")
    }
    ref = dets["closed_form"]
    for det in dets.values():
        torch.testing.assert_close(
            det.contribution_matrix, ref.contribution_matrix, rtol=0, atol=1e-6
        )
        assert torch.equal(det.act_mask, ref.act_mask)
        torch.testing.assert_close(det.weight_threshold, ref.weight_threshold, rtol=0, atol=1e-6)
    x = torch.rand(40, 20).double() * 2
    with torch.no_grad():
        scores = engine.score_batch(dets, model.extract(x))
    torch.testing.assert_close(scores["intgrad"], scores["closed_form"], rtol=0, atol=1e-6)


# -- non-linear head: IntGrad is the path integral, not the Taylor term -----------------------
def test_mlp_head_intgrad_matches_quadrature_and_differs_from_taylor() -> None:
    model, h, y = mlp_data()
    expected = quad_contributions(model, h, y)
    got = intgrad_contributions(model.forward_head, h, y, steps=4096)
    # Midpoint rule: the error falls as steps⁻² (1.3e-3 at 32 steps here), ~2e-8 at 4096.
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    taylor = taylor_contributions(model.forward_head, h, y).numpy()
    assert np.abs(taylor - expected).max() > 0.1  # the head really is non-linear on the path
    # Completeness of integrated gradients: Σ_i s_i = f_y(h) - f_y(0).
    with torch.no_grad():
        f = model.forward_head(h).gather(1, y[:, None])[:, 0]
        f0 = model.forward_head(torch.zeros_like(h)).gather(1, y[:, None])[:, 0]
    np.testing.assert_allclose(expected.sum(1), (f - f0).numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.sum(1).numpy(), (f - f0).numpy(), rtol=0, atol=1e-6)


def test_mlp_head_detector_contribution_matrix_is_the_class_mean_of_the_integral() -> None:
    model, h, y = mlp_data()
    det = fit(LINe(contribution="intgrad", intgrad_steps=4096, p_a=50.0, p_w=50.0), model, h, y)
    per_sample = quad_contributions(model, h, y)
    class_mean = np.stack([per_sample[y.numpy() == k].mean(0) for k in range(3)], axis=1)
    np.testing.assert_allclose(det.contribution_matrix.numpy(), class_mean, rtol=0, atol=1e-6)
    taylor = fit(LINe(contribution="autograd", p_a=50.0, p_w=50.0), model, h, y)
    gap = (det.contribution_matrix - taylor.contribution_matrix).abs().max()
    assert gap > 0.05, gap


def test_midpoint_rule_error_shrinks_quadratically() -> None:
    """Doubling the steps divides the error by ~4 (midpoint rule); a left/right Riemann sum
    would only halve it."""
    model, h, y = mlp_data()
    expected = quad_contributions(model, h, y)
    errors = [
        np.abs(intgrad_contributions(model.forward_head, h, y, steps).numpy() - expected).max()
        for steps in (16, 32, 64)
    ]
    assert errors[0] > 1e-5  # coarse enough that the error is measurable
    for coarse, fine in itertools.pairwise(errors):
        assert 3.5 < coarse / fine < 4.5, errors


def test_chunking_over_steps_does_not_change_the_result() -> None:
    model, h, y = mlp_data()
    whole = intgrad_contributions(model.forward_head, h, y, steps=20)
    one_step_per_chunk = intgrad_contributions(model.forward_head, h, y, 20, max_elements=1)
    seven_per_chunk = intgrad_contributions(model.forward_head, h, y, 20, max_elements=7 * 90)
    torch.testing.assert_close(one_step_per_chunk, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(seven_per_chunk, whole, rtol=0, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # gradients w.r.t. h only


def test_intgrad_config_round_trip_and_bad_steps() -> None:
    det = LINe(contribution="intgrad", intgrad_steps=7)
    config = det.config()
    assert config["contribution"] == "intgrad" and config["intgrad_steps"] == 7
    rebuilt = build_detector("line", {k: v for k, v in config.items() if k != "type"})
    assert rebuilt.config() == config
    # intgrad_steps changes what update() accumulates: never finalize-only.
    assert "intgrad_steps" not in LINe.finalize_only
    # Every config names it; a config stored before IntGrad existed (no key) means the
    # default, so its checkpoint's fitted LINe still fits (no refit on load).
    closed = LINe(delta=1.0, p_a=90, p_w=90, intgrad_steps=5).config()
    assert closed == {
        "type": "line", "delta": 1.0, "p_a": 90.0, "p_w": 90.0, "clip": True,
        "act_prune": True, "weight_prune": True, "abs_contribution": False,
        "contribution": "closed_form", "intgrad_steps": 5, "name": "line",
    }  # fmt: skip
    before_intgrad = {k: v for k, v in LINe().config().items() if k != "intgrad_steps"}
    assert LINe().stored_state_fits(before_intgrad) == (True, "")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="intgrad_steps"):
            LINe(contribution="intgrad", intgrad_steps=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs `model`"):
        det.update(
            LinearHeadNet(torch.eye(2), torch.zeros(2)).extract(torch.rand(3, 2)),
            torch.tensor([0, 1, 0]),
        )
