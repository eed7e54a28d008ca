"""Temperature scaling (Guo et al., ICML 2017, "On Calibration of Modern Neural Networks"):
the maximum softmax probability of f(x)/T, with T fitted on the labelled ID validation split
by minimising the negative log-likelihood (docs/methods.md#temperature_scaling)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.detectors.base import (
    Detector,
    InvalidConfiguration,
    OptInput,
    OptModel,
    Reducer,
)
from lightning_ood.detectors.hparams import HParam, integer, optional, positive
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


def validation_nll(logits: Tensor, target: Tensor, temperature: float) -> float:
    """Mean NLL of softmax(f/T) against ``target`` (Guo et al.'s objective), in float64."""
    return float(F.cross_entropy(logits.double() / temperature, target.long()))


def fit_temperature(logits: Tensor, target: Tensor, max_iter: int = 100) -> float:
    """argmin_T mean NLL(softmax(f/T), y) over ``logits`` (N, L) and ``target`` (N,).

    L-BFGS (strong-Wolfe line search) on t = log T from T = 1, in float64: T stays positive
    without a constraint, and the result is a deterministic function of the inputs.
    The objective is convex in 1/T, so its one minimum is the global one; it has none (T
    runs to 0) when every validation sample is classified correctly, and none at a finite T
    when the labelled logit is on average no higher than the mean logit: both are refused.
    """
    z = logits.detach().double()
    y = target.detach().long().reshape(-1)
    # With β = 1/T, NLL(β) = mean(logsumexp(β z) - β z_y) is convex; its slope at β = 0 is
    # mean(mean_k z_k - z_y) and as β -> inf it tends to mean(max_k z_k - z_y) from above.
    z_y = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], -math.inf).amax(dim=1)
    if bool((z_y > others).all()):
        raise InvalidConfiguration(
            f"temperature_scaling: all {z.shape[0]} validation samples are classified "
            "correctly, so the NLL falls for ever as T -> 0 (no finite minimum); use more "
            "validation data or set a fixed `temperature`"
        )
    if float((z.mean(dim=1) - z_y).mean()) >= 0:
        raise InvalidConfiguration(
            f"temperature_scaling: the {z.shape[0]} validation logits score the labelled class "
            "no higher than the average class, so the NLL falls for ever as T -> inf (no "
            "finite minimum); check the labels or set a fixed `temperature`"
        )
    t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [t],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z * torch.exp(-t), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    log_t = float(t.detach())
    if not math.isfinite(log_t) or abs(log_t) > math.log(1e6):
        raise InvalidConfiguration(
            f"temperature_scaling: the L-BFGS fit of log T on {z.shape[0]} validation rows "
            f"ended at log T = {log_t:.3g}; raise `max_iter` or set a fixed `temperature`"
        )
    return math.exp(log_t)


@register_detector
class TemperatureScaling(Detector):
    """Maximum softmax probability of f(x)/T, T fitted by NLL on the ID validation split.

    ``temperature`` None (the method): T is fitted in :meth:`fit_validation`, which the engine
    calls once with every labelled ID validation output; until then the detector is unfitted.
    A fixed ``temperature`` needs no data (it is then ODIN with ε = 0).
    """

    kind = "temperature_scaling"
    requires_fit = True
    uses_training_data = False
    temperature = HParam(
        None,
        optional(positive()),
        doc="fixed T > 0, or None to fit T by NLL on the labelled ID validation split",
    )
    max_iter = HParam(
        100, integer(1), stage="finalize", doc="L-BFGS iterations of the NLL fit on log T"
    )

    @property
    def uses_validation_data(self) -> bool:  # type: ignore[override]
        """Only a fitted T reads the validation split."""
        return self.temperature is None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.register_buffer("fitted_temperature", torch.tensor(math.nan, dtype=f64))
        # validation NLL at T = 1 and at the fitted T, for the record
        self.register_buffer("nll_before", torch.tensor(math.nan, dtype=f64))
        self.register_buffer("nll_after", torch.tensor(math.nan, dtype=f64))

    def reset(self) -> None:
        self.fitted.fill_(False)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """A fixed T is the fitted state; a fitted T waits for :meth:`fit_validation`."""
        if self.temperature is not None:
            self.fitted_temperature.fill_(self.temperature)
            self.fitted.fill_(True)

    def fit_validation(
        self, out: BackboneOutput, target: Tensor, reducer: Reducer | None = None
    ) -> None:
        """Fit T on the validation logits of every rank (gathered in rank order)."""
        if self.temperature is not None:
            self.finalize(None, reducer)  # type: ignore[arg-type]
            return
        reducer = reducer or Reducer()
        logits = reducer.cat(out.logits.detach().double())
        y = reducer.cat(target.detach().reshape(-1).long().to(out.logits.device))
        owner = f"{self.name} (temperature_scaling).fit_validation"
        if logits.shape[0] == 0 or logits.shape[0] != y.shape[0]:
            raise ValueError(
                f"{owner}: needs one label per validation logit row, got {logits.shape[0]} "
                f"rows and {y.shape[0]} labels"
            )
        if bool((y < 0).any()) or bool((y >= logits.shape[1]).any()):
            raise ValueError(
                f"{owner}: labels must lie in [0, {logits.shape[1]}) (the logits width), got "
                f"[{int(y.min())}, {int(y.max())}]; the validation split must be labelled ID data"
            )
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"{owner}: the validation logits hold NaN/inf")
        t = fit_temperature(logits, y, self.max_iter)
        self.fitted_temperature.fill_(t)
        self.nll_before.fill_(validation_nll(logits, y, 1.0))
        self.nll_after.fill_(validation_nll(logits, y, t))
        self.fitted.fill_(True)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        """max_k softmax(f(x)/T)_k: the MSP of the temperature-scaled logits (Guo et al. §4.2)."""
        self.check_fitted()
        t = self.fitted_temperature.to(out.logits.dtype)
        return (out.logits / t).softmax(dim=1).amax(dim=1)


__all__ = ["TemperatureScaling", "fit_temperature", "validation_nll"]
