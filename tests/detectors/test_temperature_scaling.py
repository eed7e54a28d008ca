"""Temperature scaling (Guo et al. 2017): T against a direct scipy minimisation of the NLL,
scores against pytorch-ood 0.4.0's TemperatureScaling, two ranks against one, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_ood.detector import TemperatureScaling as PodTemperatureScaling
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from threaded_ranks import run_ranks, shard
from torch import Tensor

from lightning_ood.detectors import DETECTORS, build_detector
from lightning_ood.detectors.base import InvalidConfiguration, Reducer
from lightning_ood.detectors.temperature_scaling import TemperatureScaling
from lightning_ood.models.base import BackboneOutput


def _val(n: int = 400, scale: float = 4.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Over-confident logits: the right class gets a bonus, then everything is scaled up,
    so the NLL-optimal T is above 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    logits = torch.randn(n, 5, generator=g, dtype=torch.float64)
    logits[torch.arange(n), y] += 1.0
    return scale * logits, y


def _out(logits: Tensor) -> BackboneOutput:
    return BackboneOutput(torch.zeros(len(logits), 3), logits)


def _scipy_temperature(logits: Tensor, y: Tensor) -> float:
    """argmin over log T of the mean NLL, by scipy's bounded Brent method in numpy."""
    z, t = logits.numpy(), y.numpy()

    def nll(log_t: float) -> float:
        return -float(np.mean(log_softmax(z / math.exp(log_t), axis=1)[np.arange(len(t)), t]))

    res = minimize_scalar(nll, bounds=(-5, 5), method="bounded", options={"xatol": 1e-12})
    return math.exp(res.x)


@pytest.mark.parametrize("scale", [0.3, 4.0])
def test_temperature_equals_a_direct_scipy_minimisation(scale: float) -> None:
    logits, y = _val(scale=scale)
    det = TemperatureScaling()
    det.fit_validation(_out(logits), y)
    want = _scipy_temperature(logits, y)
    assert float(det.fitted_temperature) == pytest.approx(want, rel=1e-6)
    assert (float(det.fitted_temperature) > 1.0) == (scale > 1.0)
    assert float(det.nll_after) < float(det.nll_before)
    # deterministic: a second fit gives the same T bit for bit
    again = TemperatureScaling()
    again.fit_validation(_out(logits), y)
    assert float(again.fitted_temperature) == float(det.fitted_temperature)


def test_scores_equal_pytorch_ood_msp_of_f_over_t() -> None:
    """pytorch-ood's TemperatureScaling (50 L-BFGS steps at lr 0.01, so only near the optimum)
    scores -max softmax(f/T) with its own T; ours with that T fixed gives the negation, and
    our fitted T has an NLL no higher than its."""
    logits, y = _val()
    pod = PodTemperatureScaling(model=None).fit_logits(logits.float(), y)
    t_pod = float(pod.t.detach())
    test = _val(n=64, seed=1)[0].float()
    ours = TemperatureScaling(temperature=t_pod)
    ours.finalize(None)  # type: ignore[arg-type]
    np.testing.assert_allclose(
        ours.score(_out(test)).numpy(), -pod.predict_logits(test).detach().numpy(), rtol=1e-6
    )
    fitted = TemperatureScaling()
    fitted.fit_validation(_out(logits), y)
    nll = torch.nn.functional.cross_entropy
    assert float(nll(logits / float(fitted.fitted_temperature), y)) <= float(nll(logits / t_pod, y))


def test_two_ranks_fit_the_same_temperature(monkeypatch: pytest.MonkeyPatch) -> None:
    logits, y = _val(n=301)
    one = TemperatureScaling()
    one.fit_validation(_out(logits), y)

    def fit(rank: int, reducer: Reducer) -> float:
        det = TemperatureScaling()
        det.fit_validation(_out(shard(logits, rank, 2)), shard(y, rank, 2), reducer)
        return float(det.fitted_temperature)

    for t in run_ranks(2, fit, monkeypatch):
        assert t == pytest.approx(float(one.fitted_temperature), rel=1e-9)


def test_unfitted_fixed_and_refused() -> None:
    assert DETECTORS["temperature_scaling"] is TemperatureScaling
    det = build_detector("ts", {"type": "temperature_scaling"})
    assert det.uses_validation_data and not det.uses_training_data
    with pytest.raises(RuntimeError, match="not fitted"):
        det.score(_out(torch.zeros(2, 3)))
    fixed = TemperatureScaling(temperature=2.0)
    assert not fixed.uses_validation_data
    fixed.finalize(None)  # type: ignore[arg-type]
    got = fixed.score(_out(torch.tensor([[2.0, 0.0]])))
    assert float(got) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert fixed.config() == {
        "type": "temperature_scaling",
        "temperature": 2.0,
        "max_iter": 100,
        "name": "temperature_scaling",
    }
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        det.fit_validation(_out(torch.zeros(2, 2)), torch.tensor([0, 2]))
    separable = torch.tensor([[9.0, 0.0], [0.0, 9.0]])
    with pytest.raises(InvalidConfiguration, match=r"all 2 validation samples.*T -> 0"):
        det.fit_validation(_out(separable), torch.tensor([0, 1]))
    with pytest.raises(InvalidConfiguration, match=r"T -> inf"):
        det.fit_validation(_out(separable), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"temperature=-1.0 is out of range"):
        TemperatureScaling(temperature=-1.0)
