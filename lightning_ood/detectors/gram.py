"""Gram matrices (Sastry & Oore, ICML 2020, "Detecting Out-of-Distribution Examples with Gram
Matrices"): per tap and class, the range of p-th order Gram-matrix features seen on the
training set; a sample's deviation from the ranges of its predicted class, summed over taps
and normalised per tap, is its OOD score (docs/methods.md#gram)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors import knn as _knn
from lightning_ood.detectors.base import (
    Detector,
    InvalidConfiguration,
    OptInput,
    OptModel,
    Reducer,
)
from lightning_ood.detectors.hparams import HParam, boolean, choice, in_range, integer
from lightning_ood.detectors.layer_ensemble import tap_list
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

#: Which training samples bound class c: ``"predicted"`` every sample predicted as c (the
#: authors' code), ``"correct"`` those of label c that the model classifies correctly,
#: ``"label"`` every sample of label c (OpenOOD, pytorch-ood).
SAMPLES = ("predicted", "correct", "label")
#: The per-tap normaliser E_l: ``"holdout"`` the mean deviation of a seeded held-out fraction of
#: the training set (OpenOOD, pytorch-ood), ``"validation"`` the mean deviation of the labelled
#: ID validation split (the paper; :meth:`Gram.fit_validation`), ``"none"`` 1.
NORMALIZERS = ("holdout", "validation", "none")
_EPS = 1e-6  # the reference codes' |min + 1e-6| in the relative deviation


def _powers(name: str, value: Any, owner: str) -> list[int]:
    ok = (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in value)
        and len(set(value)) == len(value)
    )
    if not ok:
        raise ValueError(f"{owner}: {name} must be a list of distinct integers >= 1, got {value!r}")
    return list(value)


def gram_features(t: Tensor, powers: list[int]) -> Tensor:
    """(B, P, C) p-th order Gram features of a tap (B, C, *spatial) in float64.

    With A = F^p (C, S) per sample (element-wise power, spatial dims flattened), the row sums
    of the Gram matrix A Aᵀ are Σ_s A_cs Σ_c' A_c's, computed without the C x C matrix, then
    mapped back to the scale of F by sign(g)·|g|^(1/p) (the reference codes' ``G_p``).
    """
    if t.ndim < 2:
        raise ValueError(f"gram: a tap of shape {tuple(t.shape)}; expected (B, C, ...)")
    a = t.detach().double()
    a = a.flatten(2) if a.ndim > 2 else a[:, :, None]
    rows = []
    for p in powers:
        ap = a**p
        g = (ap * ap.sum(dim=1, keepdim=True)).sum(dim=2)
        rows.append(g.sign() * g.abs() ** (1.0 / p))
    return torch.stack(rows, dim=1)


def deviations(g: Tensor, mins: Tensor, maxs: Tensor) -> Tensor:
    """Relative out-of-range amounts δ = relu(min - g)/|min + 1e-6| + relu(g - max)/|max + 1e-6|
    element-wise (the paper's δ(min, max, value), §3)."""
    low = torch.relu(mins - g) / (mins + _EPS).abs()
    high = torch.relu(g - maxs) / (maxs + _EPS).abs()
    return low + high


class _GramTaps(Detector):
    """Gram's ``taps`` declaration, stored as ``_taps_arg`` (its ``taps`` property gives the
    taps actually read, as the layer ensembles')."""

    hparam_attrs: ClassVar[Mapping[str, str]] = MappingProxyType({"taps": "_taps_arg"})
    taps = HParam(
        None,
        tap_list,
        doc="tap names whose Gram features are bounded; None: every tap of the backbone",
    )


@register_detector
class Gram(_GramTaps):
    """Negated total deviation -Σ_l δ_l(x)/E_l of the Gram features from the class ranges.

    Fitting (one pass, two with ``normalizer: holdout``): per tap l, power p, class c and
    Gram feature, the min and max over the bounding training samples (``samples``), skipping
    the held-out ones; the held-out samples' mean deviation per tap is E_l, from a second pass
    over the same batches. Held-out samples are drawn by their training-set position
    (:func:`~lightning_ood.detectors.knn.seeded_uniform_at`), so any batching and any world
    size give the same split; minima and maxima are combined across ranks.
    """

    kind = "gram"
    requires_fit = True
    powers = HParam(
        list(range(1, 11)),
        _powers,
        doc="orders p of the Gram matrices (the authors' code: 1..10; OpenOOD: 1..5)",
    )
    samples = HParam("predicted", choice(*SAMPLES), doc="training samples that bound each class")
    normalizer = HParam(
        "holdout", choice(*NORMALIZERS), doc="per-tap normaliser E_l: holdout, validation or none"
    )
    holdout_fraction = HParam(
        0.1,
        in_range(0.0, 1.0, low_open=True),
        doc="fraction of the training set held out for E_l (normalizer: holdout)",
    )
    seed = HParam(0, integer(0), doc="seed of the held-out draw")
    divide_by_confidence = HParam(
        True,
        boolean(),
        doc="divide each deviation by the MSP, in the score and in E_l (the authors' code)",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.register_buffer("mins", torch.zeros(0, 0, 0, dtype=f64))  # (L, P, D)
        self.register_buffer("maxs", torch.zeros(0, 0, 0, dtype=f64))
        self.register_buffer("tap_sizes", torch.zeros(0, dtype=torch.long))  # C_l, (K,)
        self.register_buffer("normalizers", torch.zeros(0, dtype=f64))  # E_l, (K,)
        self._resolved: list[str] = []
        self._reset_acc()

    # -- taps ------------------------------------------------------------------------------
    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(self._resolved or self._taps_arg or ())

    def tap_names(self, backbone: OODBackbone) -> tuple[str, ...]:
        """``taps``, or every ``backbone.tap_layers`` entry when None."""
        if self._taps_arg is not None:
            return tuple(self._taps_arg)
        if not backbone.tap_layers:
            raise ValueError(
                f"{self.name} (gram): {type(backbone).__name__} has no intermediate taps; "
                "name them in `taps` (e.g. [features])"
            )
        return tuple(backbone.tap_layers)

    def get_extra_state(self) -> dict[str, Any]:
        return {"taps": list(self._resolved)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        taps = list(state.get("taps", []))
        if taps and self._taps_arg is not None and taps != self._taps_arg:
            raise ValueError(
                f"{self.name}: the stored Gram state was fitted on taps {taps}, but this "
                f"detector is configured with taps {self._taps_arg}; refit or fix the config"
            )
        self._resolved = taps

    # -- fitting ----------------------------------------------------------------------------
    def _reset_acc(self) -> None:
        self._min_acc: Tensor | None = None
        self._max_acc: Tensor | None = None
        self._dev_sum: Tensor | None = None
        self._dev_count = 0
        self._seen = 0
        self._pass = 1
        self._sizes: list[int] = []
        self._layout = _knn.stream_layout()

    def reset(self) -> None:
        self._reset_acc()
        if self._taps_arg is None:  # resolved anew from the model the next pass runs
            self._resolved = []
        self.fitted.fill_(False)

    def _features(self, out: BackboneOutput, taps: tuple[str, ...]) -> Tensor:
        """(B, P, D) Gram features of every tap, concatenated along the last dim."""
        parts = [gram_features(out.tap(t), self.powers) for t in taps]
        sizes = [p.shape[2] for p in parts]
        if self._sizes and sizes != self._sizes:
            raise ValueError(
                f"{self.name}: tap widths changed from {self._sizes} to {sizes} during fitting"
            )
        self._sizes = sizes
        return torch.cat(parts, dim=2)

    def _held_out(self, n: int, device: torch.device) -> Tensor:
        if self.normalizer != "holdout":
            return torch.zeros(n, dtype=torch.bool, device=device)
        pos = _knn.global_positions(self._seen, n, self._layout, device)
        return _knn.seeded_uniform_at(pos, self.seed) < self.holdout_fraction

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        taps = self.taps if self._taps_arg is not None or self._resolved else None
        if taps is None:
            if model is None:
                raise ValueError(f"{self.name}: taps=None needs the model to resolve its taps")
            self._resolved = list(self.tap_names(model))
            taps = self.taps
        g = self._features(out, taps)
        n, num_classes = g.shape[0], out.logits.shape[1]
        held = self._held_out(n, g.device)
        self._seen += n
        pred = out.logits.argmax(dim=1)
        if self._pass == 2:  # the held-out samples' deviations from the final ranges
            if bool(held.any()):
                dev = self._deviation_per_tap(g[held], pred[held], self._min_acc, self._max_acc)
                dev = self._by_confidence(dev, out.logits[held])
                self._dev_sum = self._dev_sum + dev.sum(dim=0)
                self._dev_count += int(held.sum())
            return
        y = target.reshape(-1).long().to(g.device)
        if y.shape[0] != n or bool((y < 0).any()) or bool((y >= num_classes).any()):
            raise ValueError(
                f"{self.name}: needs one label in [0, {num_classes}) per sample, got "
                f"{tuple(y.shape)} labels for {n} samples"
            )
        cls = pred if self.samples == "predicted" else y
        keep = ~held if self.samples != "correct" else ~held & (pred == y)
        if self._min_acc is None:
            shape = (num_classes, g.shape[1], g.shape[2])
            self._min_acc = torch.full(shape, math.inf, dtype=torch.float64, device=g.device)
            self._max_acc = torch.full(shape, -math.inf, dtype=torch.float64, device=g.device)
        flat = g[keep].flatten(1)
        idx = cls[keep][:, None].expand_as(flat)
        self._min_acc.view(num_classes, -1).scatter_reduce_(0, idx, flat, "amin")
        self._max_acc.view(num_classes, -1).scatter_reduce_(0, idx, flat, "amax")

    def _by_confidence(self, dev: Tensor, logits: Tensor) -> Tensor:
        """δ_l / MSP per sample with ``divide_by_confidence`` (the authors' code), else δ_l."""
        if not self.divide_by_confidence:
            return dev
        return dev / logits.double().softmax(dim=1).amax(dim=1, keepdim=True)

    def _deviation_per_tap(self, g: Tensor, pred: Tensor, mins: Tensor, maxs: Tensor) -> Tensor:
        """(B, K) δ_l: deviations summed over powers and each tap's features."""
        dev = deviations(g, mins[pred], maxs[pred]).sum(dim=1)  # (B, D)
        sizes = self._sizes or self.int_list("tap_sizes")
        return torch.stack([d.sum(dim=1) for d in dev.split(sizes, dim=1)], dim=1)

    def next_pass(self, reducer: Reducer) -> bool:
        """After pass 1: combine the ranks' ranges; ask for pass 2 (the held-out deviations)
        when ``normalizer`` is ``holdout``."""
        if self._pass == 2:
            return False
        if self._min_acc is None:
            raise RuntimeError(f"{self.name}: no training batch was seen; run update() first")
        self._min_acc = reducer.cat(self._min_acc[None]).amin(dim=0)
        self._max_acc = reducer.cat(self._max_acc[None]).amax(dim=0)
        self._pass, self._seen = 2, 0
        self._dev_sum = self._min_acc.new_zeros(len(self._sizes))
        return self.normalizer == "holdout"

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        reducer = reducer or Reducer()
        if self._pass == 1 and self.next_pass(reducer):  # finalized without the engine
            raise RuntimeError(
                f"{self.name}: normalizer=holdout needs a second pass over the training "
                "batches; fit through lightning_ood.engine.fit_detectors"
            )
        assert self._min_acc is not None and self._max_acc is not None
        if self.normalizer == "holdout":
            _knn.check_layout(reducer, self._layout[1], self.name, self._min_acc.device)
        empty = torch.nonzero(torch.isinf(self._min_acc[:, 0, 0])).flatten().tolist()
        if empty:
            raise InvalidConfiguration(
                f"{self.name} (gram): classes {empty} have no bounding training sample "
                f"(samples={self.samples!r}, holdout_fraction={self.holdout_fraction}); fit on "
                "more data, or use samples: label"
            )
        self.mins, self.maxs = self._min_acc, self._max_acc
        self.tap_sizes = torch.tensor(self._sizes, dtype=torch.long, device=self.mins.device)
        k = len(self._sizes)
        if self.normalizer == "holdout":
            n = torch.tensor(float(self._dev_count), dtype=torch.float64, device=self.mins.device)
            count = int(reducer.sum(n))  # on the accumulators' device (NCCL refuses CPU tensors)
            if count == 0:
                raise InvalidConfiguration(
                    f"{self.name} (gram): holdout_fraction={self.holdout_fraction} held out no "
                    "training sample; raise it (or use normalizer: none)"
                )
            assert self._dev_sum is not None
            mean = reducer.sum(self._dev_sum.clone()) / count
            self.normalizers = torch.where(mean > 0, mean, torch.ones_like(mean))
            self.fitted.fill_(True)
        elif self.normalizer == "none":
            self.normalizers = torch.ones(k, dtype=torch.float64, device=self.mins.device)
            self.fitted.fill_(True)
        else:  # "validation": fitted once fit_validation has run
            self.normalizers = self.mins.new_full((k,), math.nan)
        self._reset_acc()

    #: Only ``normalizer: validation`` reads the validation split (the engine checks this).
    @property
    def uses_validation_data(self) -> bool:  # type: ignore[override]
        return self.normalizer == "validation"

    def fit_validation(
        self, out: BackboneOutput, target: Tensor, reducer: Reducer | None = None
    ) -> None:
        """E_l = mean δ_l over the labelled ID validation split (the paper's normaliser)."""
        if self.normalizer != "validation":
            return
        reducer = reducer or Reducer()
        if self.mins.numel() == 0:
            raise RuntimeError(f"{self.name}: fit_validation() before finalize()")
        dev = self._by_confidence(self._components(out), out.logits)
        total = reducer.sum(dev.sum(dim=0))
        n = torch.tensor(float(dev.shape[0]), dtype=torch.float64, device=dev.device)
        count = float(reducer.sum(n))
        if count == 0:
            raise ValueError(f"{self.name}: the validation split is empty")
        mean = total / count
        self.normalizers = torch.where(mean > 0, mean, torch.ones_like(mean))
        self.fitted.fill_(True)

    # -- scoring ----------------------------------------------------------------------------
    def _components(self, out: BackboneOutput) -> Tensor:
        """(B, K) δ_l of each sample against its predicted class's ranges."""
        mins, maxs = self.mins.double(), self.maxs.double()
        g = torch.cat([gram_features(out.tap(t), self.powers) for t in self.taps], dim=2)
        if g.shape[1:] != mins.shape[1:]:
            raise ValueError(
                f"{self.name}: the taps {list(self.taps)} give Gram features of shape "
                f"{tuple(g.shape[1:])} but the detector was fitted with {tuple(mins.shape[1:])}; "
                "refit it for this backbone"
            )
        return self._deviation_per_tap(g, out.logits.argmax(dim=1), mins, maxs)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        """-Σ_l δ_l(x)/E_l (the paper's Δ(x), §3, negated), δ_l divided by the MSP by default."""
        self.check_fitted()
        dev = self._by_confidence(self._components(out), out.logits)
        return -(dev / self.normalizers.double()).sum(dim=1)


__all__ = ["NORMALIZERS", "SAMPLES", "Gram", "deviations", "gram_features"]
