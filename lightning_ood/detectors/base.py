"""Base class for post-hoc detectors: pure torch, fitted state in registered buffers.

Fitting is streamed: ``reset()``, then ``update(out, target)`` per training batch (sums only),
then ``finalize(model, reducer)`` which all-reduces the sums across DDP ranks and derives the
scoring buffers. ``score(out, ...)`` returns one float per sample, higher = more in-distribution.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.models.base import BackboneOutput, OODBackbone


class Reducer:
    """Cross-process reductions used by ``Detector.finalize``; the default is single-process.

    The Lightning callback passes a subclass backed by ``trainer.strategy`` under DDP.
    """

    def sum(self, t: Tensor) -> Tensor:
        """Element-wise sum of ``t`` over all ranks."""
        return t

    def cat(self, t: Tensor) -> Tensor:
        """Concatenate ``t`` (dim 0, sizes may differ per rank) over all ranks."""
        return t


class Detector(nn.Module):
    """A post-hoc OOD detector.

    Conventions:
    * every ``__init__`` argument is stored as an attribute of the same name, so
      :meth:`config` can rebuild the detector (the task stores it in ``hparams``);
    * fitted state lives in buffers; buffers whose shape depends on the backbone are created
      empty and resized on ``load_state_dict`` (see :meth:`_load_from_state_dict`);
    * ``fitted`` (a bool buffer) says whether :meth:`finalize` ran.
    """

    #: Registry key, e.g. "line"; also the default instance name.
    kind: ClassVar[str] = ""
    #: Whether a pass over the training set is needed before scoring.
    requires_fit: ClassVar[bool] = False
    #: Whether fitting reads training batches (FSSD only needs the model: False).
    uses_training_data: ClassVar[bool] = True
    #: Whether :meth:`score` needs ``model`` and ``inputs`` (gradient-based input processing).
    needs_input_grad: ClassVar[bool] = False

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.name = name or self.kind
        self.register_buffer("fitted", torch.tensor(not self.requires_fit))

    # -- configuration -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Hyperparameters as ``{"type": kind, **init_args}``; ``build_detector`` inverts it."""
        params = inspect.signature(type(self).__init__).parameters
        args = {p: getattr(self, p) for p in params if p not in ("self", "args", "kwargs")}
        return {"type": self.kind, **args}

    @property
    def taps(self) -> tuple[str, ...]:
        """Taps (beyond features/logits) that :meth:`update`/:meth:`score` read."""
        return ()

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    # -- fitting -------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero the accumulators before a fitting pass."""

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Accumulate sufficient statistics from one eval-mode training batch.

        ``out`` comes from ``model.extract(x, taps=self.taps)`` under ``torch.no_grad``; the
        model is passed for detectors that need more (LINe's autograd oracle).
        """

    # -- optional supervised combiner (FSSD / Mahalanobis layer ensembles) ------------------
    #: Whether ``score`` combines several components with weights fitted on held-out ID+OOD
    #: validation samples (the callback carves them out of the test sets, never reporting them).
    needs_validation: ClassVar[bool] = False

    def score_components(
        self,
        out: BackboneOutput,
        model: OODBackbone | None = None,
        inputs: Tensor | None = None,
    ) -> Tensor:
        """Per-component scores, shape (B, K) (e.g. one FSSD per layer)."""
        raise NotImplementedError

    def fit_combiner(self, components_id: Tensor, components_ood: Tensor) -> None:
        """Fit the combiner (logistic regression) on validation components."""
        raise NotImplementedError

    def combine(self, components: Tensor) -> Tensor:
        """Map (B, K) components to (B,) scores with the fitted combiner."""
        raise NotImplementedError

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Reduce the accumulators across ranks and derive the scoring buffers."""
        self.fitted.fill_(True)

    # -- scoring -------------------------------------------------------------------------
    def score(
        self,
        out: BackboneOutput,
        model: OODBackbone | None = None,
        inputs: Tensor | None = None,
    ) -> Tensor:
        """Score a batch; higher = more in-distribution. Shape (B,)."""
        return self.combine(self.score_components(out, model, inputs))

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(
                f"detector {self.name!r} ({type(self).__name__}) is not fitted: run a fitting "
                "pass (reset/update/finalize) or load a checkpoint that holds its state."
            )

    # -- checkpoint plumbing ---------------------------------------------------------------
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Buffers are created lazily with backbone-dependent shapes; adopt the stored shape.
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def percentile(x: Tensor, p: float, dim: int = -1) -> Tensor:
    """``numpy.percentile(x, p, axis=dim)`` with linear interpolation, any tensor size.

    ``torch.quantile`` refuses inputs above 2**24 elements, which an ImageNet head
    (1000 x 2048) per class reaches; sorting works at any size.
    """
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile p must be in [0, 100], got {p}")
    s, _ = torch.sort(x, dim=dim)
    n = s.shape[dim]
    pos = (n - 1) * p / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    frac = pos - lo
    a = s.narrow(dim, lo, 1).squeeze(dim)
    b = s.narrow(dim, hi, 1).squeeze(dim)
    return a + (b - a) * frac


def check_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = True,
    owner: str = "",
) -> float:
    """Validate a hyperparameter, naming it and the allowed interval in the error."""
    v = float(value)
    ok = math.isfinite(v)
    if low is not None:
        ok = ok and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        interval = f"{lb}{'-inf' if low is None else low}, {'inf' if high is None else high}{rb}"
        where = f"{owner}: " if owner else ""
        raise ValueError(
            f"{where}hyperparameter {name}={value!r} is out of range; it must lie in {interval}"
        )
    return v
