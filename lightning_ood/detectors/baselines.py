"""Baseline detectors the LINe and FSSD papers compare against (METHODS.md, "Baselines").

MSP (Hendrycks & Gimpel 2017), ODIN (Liang et al. 2018), Energy (Liu et al. 2020),
ReAct (Sun et al. 2021), DICE (Sun & Li 2022) and DICE+ReAct. All score "higher = more
in-distribution".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ood.detectors.base import Detector, Reducer, check_range, percentile
from lightning_ood.models.base import BackboneOutput, OODBackbone


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy T·logsumexp(f/T) (Liu et al. 2020); shape (B,)."""
    return temperature * torch.logsumexp(logits / temperature, dim=1)


class MSP(Detector):
    """Maximum softmax probability, max_k softmax(f(x))_k."""

    kind = "msp"
    uses_training_data = False

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)

    def score(
        self,
        out: BackboneOutput,
        model: OODBackbone | None = None,
        inputs: Tensor | None = None,
    ) -> Tensor:
        return out.logits.softmax(dim=1).amax(dim=1)


class Energy(Detector):
    """Energy score T·logsumexp(f(x)/T).

    Args:
        temperature: T > 0 (1 in the papers).
        name: instance name.
    """

    kind = "energy"
    uses_training_data = False

    def __init__(self, temperature: float = 1.0, name: str | None = None) -> None:
        super().__init__(name)
        self.temperature = check_range(
            "temperature", temperature, low=0.0, low_open=True, owner=type(self).__name__
        )

    def score(
        self,
        out: BackboneOutput,
        model: OODBackbone | None = None,
        inputs: Tensor | None = None,
    ) -> Tensor:
        return energy_score(out.logits, self.temperature)


class ODIN(Detector):
    """ODIN: temperature-scaled max softmax on an input nudged towards higher confidence.

    x' = x − ε·sign(∇ₓ L) with L = −log S_ŷ(x; T) the cross-entropy of f(x)/T against its own
    argmax ŷ; score = max_k softmax(f(x')/T)_k. Like the reference code, the sign maps a zero
    gradient to +1 (``ge(0)``), and with ``input_std`` the step is divided per channel by the
    normalisation std, so ε is measured in [0, 1] pixel units rather than normalised units
    (the reference divides by the CIFAR std (0.2023, 0.1994, 0.2010); pass it to reproduce).
    Gradients are taken w.r.t. the inputs only, never accumulated into the model's parameters.

    Args:
        temperature: T > 0 (1000 in the papers).
        epsilon: perturbation size ε >= 0; 0 skips the gradient step (pure temperature scaling).
        input_std: per-channel std of the input normalisation, or None for no rescaling.
        name: instance name.
    """

    kind = "odin"
    uses_training_data = False

    @property
    def needs_input_grad(self) -> bool:  # type: ignore[override]
        """Only the input perturbation (epsilon > 0) needs the model and input gradients."""
        return self.epsilon > 0

    def __init__(
        self,
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        input_std: Sequence[float] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        owner = type(self).__name__
        self.temperature = check_range(
            "temperature", temperature, low=0.0, low_open=True, owner=owner
        )
        self.epsilon = check_range("epsilon", epsilon, low=0.0, owner=owner)
        if input_std is not None:
            input_std = [
                check_range("input_std", s, low=0.0, low_open=True, owner=owner) for s in input_std
            ]
        self.input_std = input_std

    def perturb(self, model: OODBackbone, inputs: Tensor) -> Tensor:
        """The ODIN input x' = x − ε·sign(∇ₓ(−log S_ŷ(x; T))) (Liang et al. 2018)."""
        if not inputs.is_floating_point():
            raise ValueError(
                f"ODIN needs floating-point inputs to perturb, got {inputs.dtype} (token "
                "inputs?); use epsilon=0 for models with discrete inputs"
            )
        with torch.enable_grad():
            x = inputs.detach().clone().requires_grad_(True)
            logits = model(x) / self.temperature
            # Sum, not mean: each sample's gradient is its own, whatever the batch size.
            loss = F.cross_entropy(logits, logits.argmax(dim=1).detach(), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        step = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype)
        if self.input_std is not None:
            if x.dim() < 2 or x.shape[1] != len(self.input_std):
                raise ValueError(
                    f"ODIN: input_std has {len(self.input_std)} entries but inputs have shape "
                    f"{tuple(x.shape)} (channels on dim 1)"
                )
            std = torch.tensor(self.input_std, dtype=x.dtype, device=x.device)
            step = step / std.view(1, -1, *([1] * (x.dim() - 2)))
        return x.detach() - self.epsilon * step

    def score(
        self,
        out: BackboneOutput,
        model: OODBackbone | None = None,
        inputs: Tensor | None = None,
    ) -> Tensor:
        if self.epsilon == 0.0:
            logits = out.logits
        else:
            if model is None or inputs is None:
                raise ValueError(
                    "ODIN.score with epsilon > 0 needs `model` and `inputs` (it perturbs the "
                    "input along the input gradient)"
                )
            with torch.no_grad():
                logits = model(self.perturb(model, inputs))
        return (logits / self.temperature).softmax(dim=1).amax(dim=1)


class _LinearHeadDetector(Detector):
    """Detectors that recompute logits from features with a copy of the head (W, b)."""

    requires_fit = True

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.register_buffer("weight", torch.zeros(0))  # W, (L, q)
        self.register_buffer("bias", torch.zeros(0))  # b, (L,)

    def _copy_head(self, model: OODBackbone) -> None:
        clf = model.get_classifier()
        self.weight = clf.weight.detach().clone()
        self.bias = (
            clf.bias.detach().clone()
            if clf.bias is not None
            else self.weight.new_zeros(self.weight.shape[0])
        )

    def _check_features(self, h: Tensor) -> Tensor:
        self.check_fitted()
        if h.dim() != 2 or h.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"{type(self).__name__}.score: features must have shape (B, "
                f"{self.weight.shape[1]}), got {tuple(h.shape)}; was the detector fitted on "
                "another backbone?"
            )
        return h.to(self.weight.dtype)


class _ActivationSampler:
    """Bounded, strided subsample of training feature rows for the ReAct percentile.

    Keeps every ``stride``-th training sample (all q features of it); when more than
    ``max_samples`` values are held, every other kept row is dropped and the stride doubles.
    The kept rows are thus always an exact stride-``s`` subsample of the stream (the whole set
    while it fits). Whole rows, not a stride over flattened values, so no neuron is favoured.
    Under DDP each rank subsamples its own shard and ``finalize`` concatenates them.
    Mixed into detectors that register an ``act_sample`` buffer and set ``max_samples``.
    """

    act_sample: Tensor
    max_samples: int

    def _reset_sampler(self) -> None:
        self.act_sample = self.act_sample.new_zeros(0)
        self._stride = 1
        self._rows_seen = 0

    def _sample_update(self, h: Tensor) -> None:
        h = h.detach()
        if not hasattr(self, "_stride"):
            self._reset_sampler()
        offset = (-self._rows_seen) % self._stride
        rows = h[offset :: self._stride]
        self._rows_seen += h.shape[0]
        stored = self.act_sample if self.act_sample.numel() else rows.new_zeros(0, h.shape[1])
        stored = torch.cat([stored.to(rows.dtype), rows])
        max_rows = max(1, self.max_samples // h.shape[1])
        while stored.shape[0] > max_rows:
            stored = stored[::2]
            self._stride *= 2
        self.act_sample = stored

    def _sample_percentile(self, p: float, reducer: Reducer, num_features: int) -> Tensor:
        sample = self.act_sample
        if sample.numel() == 0:  # a rank that saw no batch still joins the gather
            sample = self.act_sample.new_zeros(0, num_features)
        sample = reducer.cat(sample)
        if sample.numel() == 0:
            raise RuntimeError(
                f"{type(self).__name__}.finalize: no training features were seen; run update() "
                "first or set a fixed `clip`"
            )
        self.act_sample = self.act_sample.new_zeros(0)  # not needed to score
        return percentile(sample.flatten(), p)


class ReAct(_ActivationSampler, _LinearHeadDetector):
    """ReAct: Energy of the logits of the clipped features, T·logsumexp((W min(h, c) + b)/T).

    ``c`` is ``clip`` when given, else the ``percentile``-th percentile of training activations
    (all q entries of the penultimate features). The percentile is computed on a strided
    subsample of at most ``max_samples`` values (exact when the training set fits); the
    reference used ID validation images instead. With a fixed ``clip`` no training pass is
    needed: ``finalize`` only copies the head, so scoring needs no model.

    Args:
        clip: fixed clipping threshold c > 0, or None to estimate it.
        percentile: percentile of training activations used when ``clip`` is None, in (0, 100].
        temperature: energy temperature T > 0.
        max_samples: cap on the number of activation values kept for the percentile.
        name: instance name.
    """

    kind = "react"

    @property
    def uses_training_data(self) -> bool:  # type: ignore[override]
        """A fixed ``clip`` needs no training pass (finalize only copies the head)."""
        return self.clip is None

    def __init__(
        self,
        clip: float | None = None,
        percentile: float = 90.0,
        temperature: float = 1.0,
        max_samples: int = 1_000_000,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        owner = type(self).__name__
        self.clip = (
            None if clip is None else check_range("clip", clip, low=0.0, low_open=True, owner=owner)
        )
        self.percentile = check_range(
            "percentile",
            percentile,
            low=0.0,
            low_open=True,
            high=100.0,
            high_open=False,
            owner=owner,
        )
        self.temperature = check_range(
            "temperature", temperature, low=0.0, low_open=True, owner=owner
        )
        self.max_samples = int(check_range("max_samples", max_samples, low=1, owner=owner))
        self.register_buffer("act_sample", torch.zeros(0))
        self.register_buffer("clip_value", torch.zeros(()))  # c actually used

    def reset(self) -> None:
        self._reset_sampler()
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        if self.clip is None:
            self._sample_update(out.features)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        self._copy_head(model)
        if self.clip is None:
            c = self._sample_percentile(self.percentile, reducer or Reducer(), self.weight.shape[1])
        else:
            c = torch.tensor(self.clip)
        self.clip_value = c.to(self.weight)
        self.fitted.fill_(True)

    def score(
        self,
        out: BackboneOutput,
        model: OODBackbone | None = None,
        inputs: Tensor | None = None,
    ) -> Tensor:
        h = self._check_features(out.features).clamp(max=self.clip_value)
        return energy_score(h @ self.weight.T + self.bias, self.temperature)


class DICE(_LinearHeadDetector):
    """DICE: energy of logits from a sparsified head, (W ⊙ M) h + b (Sun & Li 2022).

    ā is the mean penultimate feature over the whole training set (all classes, unclipped);
    V = ā ⊙ W (broadcast over the L rows); M = 1[V > percentile(V, p)] over all L·q entries.

    Args:
        p: percent of weights pruned, in [0, 100) (90 for CIFAR).
        clip: optional fixed ReAct bound applied to test features before the sparse head.
        name: instance name.
    """

    kind = "dice"

    def __init__(self, p: float = 90.0, clip: float | None = None, name: str | None = None) -> None:
        super().__init__(name)
        owner = type(self).__name__
        self.p = check_range("p", p, low=0.0, high=100.0, owner=owner)
        self.clip = (
            None if clip is None else check_range("clip", clip, low=0.0, low_open=True, owner=owner)
        )
        self.register_buffer("feature_sum", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("feature_mean", torch.zeros(0))  # ā, (q,)
        self.register_buffer("threshold", torch.zeros(()))  # percentile(V, p)
        self.register_buffer("mask", torch.zeros(0, dtype=torch.bool))  # M, (L, q)
        self.register_buffer("clip_value", torch.full((), torch.inf))  # inf = no clipping

    def reset(self) -> None:
        self.feature_sum = self.feature_sum.new_zeros(0)
        self.count = self.count.new_zeros(())
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        h = out.features.detach()
        if self.feature_sum.numel() == 0:
            self.feature_sum = torch.zeros(h.shape[1], dtype=torch.float64, device=h.device)
        self.feature_sum += h.sum(dim=0, dtype=torch.float64)
        self.count += h.shape[0]

    def _clip_value(self, reducer: Reducer) -> Tensor:
        return torch.tensor(torch.inf if self.clip is None else self.clip)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        reducer = reducer or Reducer()
        self._copy_head(model)
        weight = self.weight
        if self.feature_sum.numel() == 0:
            self.feature_sum = torch.zeros(
                weight.shape[1], dtype=torch.float64, device=weight.device
            )
        total = reducer.sum(self.feature_sum)
        count = reducer.sum(self.count)
        if float(count) == 0:
            raise RuntimeError(f"{type(self).__name__}.finalize: no training sample was seen")
        mean = (total / count).to(weight.dtype)
        contrib = weight * mean  # V = ā ⊙ W, (L, q)
        self.threshold = percentile(contrib.flatten(), self.p)
        self.mask = contrib > self.threshold
        self.feature_mean = mean
        self.clip_value = self._clip_value(reducer).to(weight)
        self.feature_sum = self.feature_sum.new_zeros(0)  # not needed to score
        self.count = count  # training samples over all ranks, kept for the record
        self.fitted.fill_(True)

    def score(
        self,
        out: BackboneOutput,
        model: OODBackbone | None = None,
        inputs: Tensor | None = None,
    ) -> Tensor:
        h = self._check_features(out.features).clamp(max=self.clip_value)
        w = torch.where(self.mask, self.weight, self.weight.new_zeros(()))
        return torch.logsumexp(h @ w.T + self.bias, dim=1)


class DICEReAct(_ActivationSampler, DICE):
    """DICE on ReAct-clipped features: the sparse head applied to min(h, c).

    The mask comes from the unclipped training mean, as in the DICE code. ``c`` is ``clip`` or
    the ``percentile``-th percentile of training activations (subsampled as in :class:`ReAct`).

    Args:
        p: percent of weights pruned, in [0, 100).
        clip: fixed clipping threshold c > 0, or None to estimate it.
        percentile: percentile of training activations used when ``clip`` is None, in (0, 100].
        max_samples: cap on the number of activation values kept for the percentile.
        name: instance name.
    """

    kind = "dice_react"

    def __init__(
        self,
        p: float = 90.0,
        clip: float | None = None,
        percentile: float = 90.0,
        max_samples: int = 1_000_000,
        name: str | None = None,
    ) -> None:
        super().__init__(p=p, clip=clip, name=name)
        owner = type(self).__name__
        self.percentile = check_range(
            "percentile",
            percentile,
            low=0.0,
            low_open=True,
            high=100.0,
            high_open=False,
            owner=owner,
        )
        self.max_samples = int(check_range("max_samples", max_samples, low=1, owner=owner))
        self.register_buffer("act_sample", torch.zeros(0))

    def reset(self) -> None:
        super().reset()
        self._reset_sampler()

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        super().update(out, target, model)
        if self.clip is None:
            self._sample_update(out.features)

    def _clip_value(self, reducer: Reducer) -> Tensor:
        if self.clip is not None:
            return torch.tensor(self.clip)
        return self._sample_percentile(self.percentile, reducer, self.weight.shape[1])
