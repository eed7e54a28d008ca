"""MC Dropout (Gal & Ghahramani 2016), as the FSSD paper ran it after Ovadia et al. (2019).

Dropout stays active at test time and T stochastic forward passes approximate the predictive
distribution p(y|x) ≈ (1/T) Σ_t softmax(f_t(x)). Two scores, two registry kinds:

* ``mcd``: max_k of the mean softmax (Gal & Ghahramani 2016, eq. 8; Ovadia et al. 2019 §3);
* ``mcd_var``: minus the predictive variance, (1/L) Σ_k Var_t[softmax(f_t(x))_k] (population
  variance over the T passes, averaged over the L classes), so that higher = more ID.

Only the dropout modules (``nn.Dropout*``, ``nn.AlphaDropout``) are switched to training mode
during the passes; BatchNorm and everything else keep their eval behaviour, and every module's
mode is restored afterwards. The passes of one batch are ONE forward over the batch repeated
``passes`` times, split into chunks of at most ``max_batch`` samples. The dropout masks come
from a private RNG stream seeded with ``seed`` for every batch (``torch.random.fork_rng``), so a
re-run gives the same scores and the global RNG is left untouched. A sample's masks depend on
its position in its batch: the scores repeat exactly for the same batching (batch size,
``max_batch``, world size), and are another draw of the same distribution otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_ood.detectors.base import BatchMemo, Detector, OptInput, OptModel, check_int
from lightning_ood.models.base import BackboneOutput

#: Module types whose training mode means "drop units": the only ones MC Dropout switches on.
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (_DropoutNd,)


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Every dropout module of ``model`` (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
    ``FeatureAlphaDropout``)."""
    return [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]


@contextlib.contextmanager
def active_dropout(model: nn.Module, owner: str = "MCDropout") -> Iterator[None]:
    """Put ``model`` in eval mode except its dropout modules, restoring every module's own
    mode afterwards (a LightningModule's mode is per module, not global).

    Raises:
        ValueError: ``model`` has no dropout module, naming the model.
    """
    drops = dropout_modules(model)
    if not drops:
        raise ValueError(
            f"{owner}: the model {type(model).__name__} has no dropout layers (nn.Dropout*), so "
            "MC Dropout would repeat one deterministic prediction; use a model trained with "
            "dropout (e.g. lenet with dropout: true) or another detector"
        )
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for m in drops:
            m.train()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """A private RNG stream seeded with ``seed`` on ``device`` (and the CPU); the global RNG
    states of both are restored on exit, so the caller's random streams are not disturbed."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)  # this device only: the others are not forked
        yield


#: The moments of the last batch scored, so that ``mcd`` and ``mcd_var`` with the same
#: passes/seed/max_batch run the T stochastic passes of a batch once between them.
_MOMENTS = BatchMemo()


class MCDropout(Detector):
    """MC Dropout: max of the mean softmax over T stochastic passes (higher = more ID).

    Args:
        passes: T, the number of stochastic forward passes per batch (32 in the FSSD paper).
        seed: seed of the dropout masks; the same for every batch, so scores do not depend on
            the order in which batches are scored.
        max_batch: most samples (batch size x passes) in one forward; T passes of a batch of
            B samples take ceil(T / max(1, max_batch // B)) forwards.
        name: instance name.
    """

    kind = "mcd"
    uses_training_data = False
    #: The seeded random stream of the passes cannot be traced by ``torch.export``.
    exportable: ClassVar[bool] = False
    finalize_only: ClassVar[frozenset[str]] = frozenset({"passes", "seed", "max_batch"})
    #: Which statistic of the T softmax vectors is the score: "mean" (max of the mean) or
    #: "var" (minus the mean per-class variance).
    statistic: ClassVar[str] = "mean"

    def __init__(
        self,
        passes: int = 32,
        seed: int = 0,
        max_batch: int = 1024,
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        owner = type(self).__name__
        self.passes = check_int("passes", passes, 1, owner)
        self.seed = check_int("seed", seed, 0, owner)
        self.max_batch = check_int("max_batch", max_batch, 1, owner)

    @property
    def needs_inputs(self) -> bool:
        """T extra stochastic forwards of the network on the inputs: cached features cannot."""
        return True

    def moments(self, model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, variance)`` over the T passes of the softmax, each (B, L) in float64.

        Sums are accumulated in float64, so T identical passes (dropout p = 0) give a mean
        bit-identical to the single softmax. ``mcd`` and ``mcd_var`` with the same settings
        share the passes of a batch (:class:`~lightning_ood.detectors.base.BatchMemo`).
        """
        key = (self.passes, self.seed, self.max_batch)
        return _MOMENTS.get(inputs, key, lambda: self._moments(model, inputs), owners=(model,))

    def _moments(self, model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
        b = inputs.shape[0]
        per_forward = max(1, self.max_batch // max(b, 1))
        device = inputs.device
        total: Tensor | None = None
        total_sq: Tensor | None = None
        with torch.no_grad(), active_dropout(model, self.name), seeded_rng(self.seed, device):
            done = 0
            while done < self.passes:
                t = min(per_forward, self.passes - done)
                x = inputs.unsqueeze(0).expand(t, *inputs.shape).reshape(t * b, *inputs.shape[1:])
                probs = model(x).softmax(dim=1).view(t, b, -1).double()
                s, sq = probs.sum(dim=0), probs.square().sum(dim=0)
                total = s if total is None else total + s
                total_sq = sq if total_sq is None else total_sq + sq
                done += t
        assert total is not None and total_sq is not None
        mean = total / self.passes
        var = (total_sq / self.passes - mean.square()).clamp_min(0.0)
        return mean, var

    def _check_args(self, model: OptModel, inputs: OptInput) -> tuple[nn.Module, Tensor]:
        if model is None or inputs is None:
            raise ValueError(
                f"{self.name}: {type(self).__name__}.score needs `model` and `inputs` (it runs "
                f"{self.passes} stochastic forward passes); cached features cannot score it"
            )
        return model, inputs

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        model, inputs = self._check_args(model, inputs)
        mean, var = self.moments(model, inputs)
        dtype = out.logits.dtype
        if self.statistic == "var":
            return (-var.mean(dim=1)).to(dtype)
        return mean.amax(dim=1).to(dtype)


class MCDropoutVar(MCDropout):
    """MC Dropout scored by minus the predictive variance (the FSSD paper's second MCD score)."""

    kind = "mcd_var"
    statistic: ClassVar[str] = "var"


__all__ = ["DROPOUT_TYPES", "MCDropout", "MCDropoutVar", "active_dropout", "dropout_modules"]
