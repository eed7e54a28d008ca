"""FSSD: Feature Space Singularity Distance (Huang et al., 2021, arXiv:2011.14654).

Uniform-noise inputs collapse onto one point of each layer's feature space, the *feature space
singularity* (FSS); in-distribution samples lie far from it, OOD samples close to it. Per tap
``l`` the score is ``FSSD_l(x) = ||F_l(x) - FSS_l||_2`` (the paper's definition of FSSD),
higher = more in-distribution, and the layers are combined by a logistic regression fitted on
held-out ID + OOD validation samples (the paper's ensemble; the reference's ``train_lr``).
Paper/reference differences (noise, input pre-processing, combiner) and the options that
select them: ``docs/methods.md#fssd``.

The per-tap components + logistic combiner base and the input pre-processing helpers are
shared with Mahalanobis: :mod:`lightning_ood.detectors.layer_ensemble`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import Reducer
from lightning_ood.detectors.hparams import HParam, choice, integer
from lightning_ood.detectors.layer_ensemble import (
    LayerEnsembleDetector,
    divide_by_input_std,
    input_gradient,
)
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import LOGITS, OODBackbone

NOISES = ("reference", "uniform")
DIRECTIONS = ("reference", "paper")
GRAD_NORMS = ("batch", "sample")


def model_device_dtype(model: OODBackbone) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a model's first floating parameter/buffer."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


@register_detector
class FSSD(LayerEnsembleDetector):
    """Feature Space Singularity Distance with a logistic-regression layer ensemble.

    Fitting needs no training data: :meth:`finalize` feeds ``n_noise`` noise inputs through
    the model and stores each tap's mean feature, flattened in full (no pooling), in one
    concatenated buffer ``fss`` with per-tap sizes ``fss_sizes``; :meth:`update` is a no-op.

    ``taps``: one component each, in this order; ``None`` = every tap of ``model.tap_layers``
    then ``"logits"``, resolved at :meth:`finalize` and saved in the state dict. The reference
    uses ReLU(conv1), ReLU(conv2), ReLU(fc1), logits for LeNet and stem, layer1..4 for
    ResNet-34: name them explicitly in configs. Input pre-processing (``epsilon`` > 0) gives
    each tap its own perturbed input (as the reference), costing K extra forward+backward
    passes and K forward passes per batch; ``input_std`` is the per-channel std of the input
    ``Normalize`` the step is divided by, as the reference does (e.g. ``[0.353]`` for
    FashionMNIST). The combiner's hyperparameters are
    :class:`~lightning_ood.detectors.layer_ensemble.LayerEnsembleDetector`'s.

    ``update`` is a no-op and ``finalize`` runs the noise pass itself, so every
    hyperparameter but ``taps`` (kept so that one group reads one set of taps) is
    finalize-only.
    """

    kind: ClassVar[str] = "fssd"
    requires_fit: ClassVar[bool] = True
    #: FSSD needs the model (a noise pass), not the training set.
    uses_training_data: ClassVar[bool] = False
    noise = HParam(
        "reference",
        choice(*NOISES),
        stage="finalize",
        doc='"reference": integers v ~ U{0..254} fed as (v - 127.5)/255 without the dataset '
        'normalisation (reference code); "uniform": x ~ U[0, 1) (paper); token models always '
        "get uniform token ids",
    )
    n_noise = HParam(
        100, integer(1), stage="finalize", doc="number of noise inputs N (paper/reference: 100)"
    )
    noise_seed = HParam(
        0,
        integer(0),
        stage="finalize",
        doc="seed of the CPU generator that draws the noise (all DDP ranks agree)",
    )
    direction = HParam(
        "reference",
        choice(*DIRECTIONS),
        stage="score",
        doc='"reference": x̃ = x + ε·ĝ/std, ĝ the standardised gradient of -mean(FSSD_l), a '
        'step that lowers FSSD (reference code); "paper": x̃ = x + ε·sign(∇ₓ FSSD_l)/std, '
        "raising FSSD",
    )
    grad_norm = HParam(
        "batch",
        choice(*GRAD_NORMS),
        stage="score",
        doc='standardisation of the reference direction: "batch" (whole batch tensor, '
        'reference code; a score depends on its batch-mates) or "sample" (each sample\'s own)',
    )
    batch_size = HParam(100, integer(1), stage="finalize", doc="chunk size of the noise pass")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resolved_taps: list[str] = []
        self.register_buffer("fss", torch.zeros(0))
        self.register_buffer("fss_sizes", torch.zeros(0, dtype=torch.long))

    # -- taps -----------------------------------------------------------------------------
    @property
    def taps(self) -> tuple[str, ...]:
        """The configured taps, or the resolved ones once fitted (empty before if ``None``)."""
        if self._resolved_taps:
            return tuple(self._resolved_taps)
        return tuple(self._taps_arg or ())

    def tap_names(self, backbone: OODBackbone) -> tuple[str, ...]:
        """``taps``, or every ``backbone.tap_layers`` entry then ``"logits"`` when ``None``."""
        if self._taps_arg is not None:
            return tuple(self._taps_arg)
        return (*backbone.tap_layers, LOGITS)

    def get_extra_state(self) -> dict[str, Any]:
        return {"taps": list(self._resolved_taps)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        taps = list(state.get("taps", []))
        if taps and self._taps_arg is not None and taps != self._taps_arg:
            raise ValueError(
                f"{self.name}: the stored FSSD state was fitted on taps {taps}, but this "
                f"detector is configured with taps {self._taps_arg}; refit or fix the config"
            )
        self._resolved_taps = taps

    # -- fitting --------------------------------------------------------------------------
    def make_noise(self, model: OODBackbone) -> Tensor:
        """The ``n_noise`` noise inputs (on the CPU), drawn from a generator seeded
        ``noise_seed``: all at once, so the chunking of the pass does not change them."""
        g = torch.Generator().manual_seed(self.noise_seed)
        shape = (self.n_noise, *model.input_shape)
        if model.input_kind == "tokens":
            if model.vocab_size < 1:
                raise ValueError(
                    f"{type(model).__name__} has token inputs but vocab_size={model.vocab_size}"
                )
            return torch.randint(0, model.vocab_size, shape, generator=g)
        if self.noise == "reference":
            v = torch.randint(0, 255, shape, generator=g).to(torch.float32)
            return (v - 127.5) / 255
        return torch.rand(shape, generator=g)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Compute FSS_l = mean over the noise of F_l(noise), flattened (the paper's FSS).

        Runs the model in eval mode (restoring its mode). Every rank draws the same noise, so
        nothing is reduced across DDP ranks.
        """
        taps = list(self.tap_names(model))
        device, dtype = model_device_dtype(model)
        noise = self.make_noise(model)
        sums: list[Tensor] = [torch.zeros(0)] * len(taps)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for chunk in noise.split(self.batch_size):
                    chunk = chunk.to(device, dtype if chunk.is_floating_point() else chunk.dtype)
                    out = model.extract(chunk, taps=taps)
                    for i, t in enumerate(taps):
                        s = out.tap(t).flatten(1).double().sum(0)
                        sums[i] = s if sums[i].numel() == 0 else sums[i] + s
        finally:
            model.train(was_training)
        dev = self.fitted.device
        self.fss = torch.cat([s / self.n_noise for s in sums]).to(dev, torch.float32)
        self.fss_sizes = torch.tensor([s.numel() for s in sums], dtype=torch.long, device=dev)
        self._resolved_taps = taps
        self.fitted.fill_(True)

    def centres(self) -> list[Tensor]:
        """FSS_l per tap, flattened."""
        return list(self.fss.split(self.int_list("fss_sizes")))

    # -- scoring --------------------------------------------------------------------------
    def _distance(self, feat: Tensor, centre: Tensor, tap: str) -> Tensor:
        f = feat.flatten(1).to(torch.float32)
        if f.shape[1] != centre.numel():
            raise ValueError(
                f"{self.name}: tap {tap!r} gives {f.shape[1]} features per sample but its FSS "
                f"has {centre.numel()}; the detector was fitted on another backbone or input "
                "size, refit it"
            )
        return torch.linalg.vector_norm(f - centre, dim=1)

    def _step(self, grad: Tensor) -> Tensor:
        """The input step per unit ε (before the ``input_std`` division)."""
        if self.direction == "paper":
            return torch.sign(grad)
        s = -grad  # ∇ of -FSSD: the reference's loss = -mean_b FSSD (the 1/B cancels below)
        dims = tuple(range(1, s.ndim)) if self.grad_norm == "sample" else tuple(range(s.ndim))
        mean = s.mean(dim=dims, keepdim=True)
        std = s.std(dim=dims, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        return (s - mean) / std

    def component(self, feat: Tensor, i: int) -> Tensor:
        """FSSD_i = ||F_i(x) - FSS_i||_2 in float32; higher = more in-distribution."""
        return self._distance(feat, self.centres()[i], self.taps[i])

    def perturb(self, model: OODBackbone, x: Tensor, i: int) -> Tensor:
        """The pre-processed input x̃ for component ``i`` (see ``direction``)."""
        tap, centre = self.taps[i], self.centres()[i]
        grad = input_gradient(model, x, tap, lambda f: self._distance(f, centre, tap))
        return (x + self.epsilon * divide_by_input_std(self._step(grad), self.input_std)).detach()


__all__ = ["FSSD"]
