"""MC Dropout (Gal & Ghahramani 2016), as the FSSD paper ran it after Ovadia et al. (2019).

Dropout stays active at test time and T stochastic forward passes approximate the predictive
distribution p(y|x) ≈ (1/T) Σ_t softmax(f_t(x)). Two scores, two registry kinds:

* ``mcd``: max_k of the mean softmax (Gal & Ghahramani 2016, eq. 8; Ovadia et al. 2019 §3);
* ``mcd_var``: minus the predictive variance, (1/L) Σ_k Var_t[softmax(f_t(x))_k] (population
  variance over the T passes, averaged over the L classes), so that higher = more ID.

Only the dropout modules (``nn.Dropout*``, ``nn.AlphaDropout``) drop units during the passes;
BatchNorm and everything else keep their eval behaviour, and every module's mode is restored
afterwards. The passes of one batch are ONE forward over the batch repeated ``passes`` times,
split into chunks of at most ``max_batch`` samples.

Per-sample seeded masks. A sample's dropout masks are a function of (``seed``, the sample's
content, the pass index, the dropout module, the unit) only, never of its position in its
batch, the batch size, ``max_batch``, the order of the batches, the device or the world size:
a sample scores the same alone, in any batch and in any order (up to the backbone's own
float rounding, which may differ between batch sizes). The masks are drawn by a counter-based
hash (MurmurHash3's 32-bit finaliser, :func:`~lightning_ood.detectors.knn.mix32`, in exact
int64 arithmetic), not by torch's RNG:

* sample key: a hash of the sample's input values (float inputs as their float32 bit
  patterns, token ids as integers), each value hashed with its index; identical inputs get
  identical masks, so duplicates score alike;
* row key (one sample in one pass through one dropout module): the sample key mixed with the
  seed's two 32-bit words, the pass index and the module's index among the model's dropout
  modules;
* unit u of that row is kept when ``mix32(row key ^ hash(u)) >= p * 2**32`` (units = every
  element for ``nn.Dropout``/``AlphaDropout``, every channel for ``Dropout1d/2d/3d`` and
  ``FeatureAlphaDropout``), then scaled as torch's dropout scales (1 / (1 - p); the SELU
  affine correction for the alpha variants).

Why a content hash: the detector sees only the batch tensor, and a key must be the same for a
sample wherever it appears; a few int64 operations per input value and per unit cost about
what torch's own dropout RNG costs (LeNet, whose two dropout layers are large next to its
convolutions, 64 images x 32 passes on one CPU thread: 1.7-1.9 s, against 1.9-2.1 s with
torch's masks), and exact integer hashing gives the same masks on CPU and GPU. The global
RNG is not touched. The dropout modules must see the batch in dim 0 (batch-first models, as
every backbone of the package); another layout is refused by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_ood.detectors.base import BatchMemo, Detector, OptInput, OptModel
from lightning_ood.detectors.hparams import HParam, integer
from lightning_ood.detectors.knn import mix32, mul32, seed_key
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

#: Module types whose training mode means "drop units": the only ones MC Dropout switches on.
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (_DropoutNd,)
_MASK32 = 0xFFFFFFFF


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """Every dropout module of ``model`` (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
    ``FeatureAlphaDropout``)."""
    return [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]


#: Constants of the mask hash: the golden ratio (unit indices), and distinct odd words that
#: separate the sample, pass and module keys.
_GOLDEN = 0x9E3779B9
_PASS_SALT = 0x68E31DA4
_MODULE_SALT = 0xB5297A4D
_SQUARES = 0x1B56C4E9
#: Dropout types whose mask drops whole channels (dim 1) rather than single elements.
FEATURE_DROPOUT: tuple[type[nn.Module], ...] = (
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.FeatureAlphaDropout,
)
#: Dropout types with the SELU-preserving affine correction.
ALPHA_DROPOUT: tuple[type[nn.Module], ...] = (nn.AlphaDropout, nn.FeatureAlphaDropout)
#: torch's alpha-dropout constant: -SELU's lower saturation, scale * alpha.
_SELU_ALPHA = 1.7580993408473766


def sample_keys(inputs: Tensor) -> Tensor:
    """One 32-bit key per sample (int64, (B,)) from its input values alone.

    Float inputs are hashed as their float32 bit patterns (a float64 batch holding float32
    values gives the same keys), integer inputs (token ids) as their values; each value is
    mixed with its index within the sample, and the per-value hashes are summed mod 2**32.
    """
    b = inputs.shape[0]
    flat = inputs.detach().reshape(b, -1) if b else inputs.detach().reshape(0, 0)
    if flat.is_floating_point():
        words = flat.float().contiguous().view(torch.int32).to(torch.int64) & _MASK32
    else:
        words = flat.to(torch.int64) & _MASK32
    pos = mul32(torch.arange(flat.shape[1], dtype=torch.int64, device=flat.device), _GOLDEN)
    # sum of at most 2**31 values below 2**32: no int64 overflow before the final mask
    return mix32(mix32(words ^ pos).sum(dim=1) & _MASK32)


def row_keys(keys: Tensor, seed: int, passes: range) -> Tensor:
    """Keys of the rows of ``len(passes)`` copies of a batch of samples with ``keys`` (B,),
    pass-major as in the stacked forward: row ``i * B + s`` is sample ``s`` in pass
    ``passes[i]``. (len(passes) * B,) int64."""
    word = seed_key(seed, keys.device)
    t = torch.tensor(list(passes), dtype=torch.int64, device=keys.device)
    per_pass = mix32(mix32((t & _MASK32) ^ _PASS_SALT) ^ word[1])
    per_sample = mix32(keys ^ word[0])
    return mix32(per_pass[:, None] ^ per_sample[None, :]).reshape(-1)


#: Most (row, unit) hashes computed at once: bounds the int64 temporaries of :func:`keep_mask`
#: (about 32 MB each) whatever the activation size.
_HASH_BLOCK = 1 << 22


def keep_mask(rows: Tensor, module_index: int, units: int, p: float) -> Tensor:
    """Which of ``units`` units each row keeps through dropout module ``module_index`` at
    drop probability ``p``: (R, units) bool, a function of the row keys alone."""
    device = rows.device
    mod = mix32(torch.tensor(module_index ^ _MODULE_SALT, dtype=torch.int64, device=device))
    r = mix32(rows ^ mod)
    u = mix32(mul32(torch.arange(units, dtype=torch.int64, device=device), _SQUARES) ^ _GOLDEN)
    cut = min(round(p * 2**32), 2**32)
    keep = torch.empty(r.shape[0], units, dtype=torch.bool, device=device)
    step = max(1, _HASH_BLOCK // max(units, 1))
    for i in range(0, r.shape[0], step):
        torch.ge(mix32(r[i : i + step, None] ^ u[None, :]), cut, out=keep[i : i + step])
    return keep


def apply_dropout(module: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    """``module``'s training-mode output on ``x`` for the given keep mask (broadcastable to
    ``x``), scaled as torch scales it."""
    p = float(module.p)  # type: ignore[attr-defined]
    if p == 1.0:
        return x * torch.zeros((), dtype=x.dtype, device=x.device)
    noise = keep.to(x.dtype)
    if isinstance(module, ALPHA_DROPOUT):  # torch's _dropout_impl for alpha dropout
        a = 1.0 / ((_SELU_ALPHA**2 * p + 1.0) * (1.0 - p)) ** 0.5
        b = (noise - 1.0) * (_SELU_ALPHA * a) + _SELU_ALPHA * a * p
        return x * (noise * a) + b
    return x * (noise / (1.0 - p))


class _SeededMasks:
    """Forward hooks that replace the dropout of ``drops`` (all in eval mode: identity) by the
    per-sample seeded masks of the rows in :attr:`rows`."""

    def __init__(self, drops: list[nn.Module], owner: str) -> None:
        self.drops = drops
        self.owner = owner
        self.rows: Tensor | None = None

    def hook(self, index: int) -> Any:
        def apply(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            p = float(module.p)  # type: ignore[attr-defined]
            if p == 0.0 or out.numel() == 0:
                return out
            rows = self.rows
            assert rows is not None
            if out.dim() == 0 or out.shape[0] != rows.shape[0]:
                raise ValueError(
                    f"{self.owner}: dropout module {type(module).__name__} #{index} received "
                    f"a tensor of shape {tuple(out.shape)}, but the stacked passes hold "
                    f"{rows.shape[0]} samples in dim 0; per-sample seeded masks need batch-first "
                    "activations at every dropout module"
                )
            if isinstance(module, FEATURE_DROPOUT):
                if out.dim() < 2:
                    raise ValueError(
                        f"{self.owner}: {type(module).__name__} #{index} needs (N, C, ...) "
                        f"inputs, got shape {tuple(out.shape)}"
                    )
                keep = keep_mask(rows, index, out.shape[1], p)
                keep = keep.view(*out.shape[:2], *([1] * (out.dim() - 2)))
            else:
                keep = keep_mask(rows, index, out[0].numel(), p).view(out.shape)
            return apply_dropout(module, out, keep)

        return apply


def require_dropout(model: nn.Module, owner: str = "MCDropout") -> list[nn.Module]:
    """The dropout modules of ``model`` (p = 0 ones included: MC Dropout then equals MSP).

    Raises:
        ValueError: ``model`` has none, naming the model and the fix.
    """
    drops = dropout_modules(model)
    if not drops:
        raise ValueError(
            f"{owner}: the model {type(model).__name__} has no dropout layers (nn.Dropout*), so "
            "MC Dropout would repeat one deterministic prediction; use a model trained with "
            "dropout (e.g. lenet with dropout: true) or another detector"
        )
    return drops


@contextlib.contextmanager
def seeded_dropout(model: nn.Module, owner: str = "MCDropout") -> Iterator[_SeededMasks]:
    """Put ``model`` in eval mode and make its dropout modules drop with per-sample seeded
    masks (set the row keys on the yielded object before each forward), restoring every
    module's own mode and removing the hooks afterwards.

    Raises:
        ValueError: ``model`` has no dropout module, naming the model.
    """
    drops = require_dropout(model, owner)
    modes = {m: m.training for m in model.modules()}
    masks = _SeededMasks(drops, owner)
    handles = [m.register_forward_hook(masks.hook(i)) for i, m in enumerate(drops)]
    try:
        model.eval()
        yield masks
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode


#: The moments of the last batch scored, so that ``mcd`` and ``mcd_var`` with the same
#: passes/seed/max_batch run the T stochastic passes of a batch once between them.
_MOMENTS = BatchMemo()


@register_detector
class MCDropout(Detector):
    """MC Dropout: max of the mean softmax over T stochastic passes (higher = more ID).

    No fitting pass: every hyperparameter enters :meth:`score` only.
    """

    kind = "mcd"
    uses_training_data = False
    #: The T passes (forward hooks on the dropout modules, chunks sized by the batch size) are
    #: not traced by ``torch.export``.
    exportable: ClassVar[bool] = False
    #: Which statistic of the T softmax vectors is the score: "mean" (max of the mean) or
    #: "var" (minus the mean per-class variance).
    statistic: ClassVar[str] = "mean"
    passes = HParam(
        32,
        integer(1),
        stage="score",
        doc="T, the number of stochastic forward passes per batch (32 in the FSSD paper)",
    )
    seed = HParam(
        0,
        integer(0),
        stage="score",
        doc="seed of the per-sample dropout masks: a score depends on the sample's content "
        "and the seed, not on its batch or position",
    )
    max_batch = HParam(
        1024,
        integer(1),
        stage="score",
        doc="most samples (batch size x passes) in one forward; memory and speed only, never "
        "the masks",
    )

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
        total: Tensor | None = None
        total_sq: Tensor | None = None
        with torch.no_grad(), seeded_dropout(model, self.name) as masks:
            keys = sample_keys(inputs)
            done = 0
            while done < self.passes:
                t = min(per_forward, self.passes - done)
                masks.rows = row_keys(keys, self.seed, range(done, done + t))
                x = inputs.unsqueeze(0).expand(t, *inputs.shape).reshape(t * b, *inputs.shape[1:])
                logits = model(x)
                probs = logits.softmax(dim=1).view(t, b, logits.shape[-1]).double()
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

    def check_backbone(self, model: OODBackbone) -> None:
        """No dropout layer, no stochastic passes: refused before any pass."""
        require_dropout(model, self.name)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        model, inputs = self._check_args(model, inputs)
        mean, var = self.moments(model, inputs)
        dtype = out.logits.dtype
        if self.statistic == "var":
            return (-var.mean(dim=1)).to(dtype)
        return mean.amax(dim=1).to(dtype)


@register_detector
class MCDropoutVar(MCDropout):
    """MC Dropout scored by minus the predictive variance (the FSSD paper's second MCD score)."""

    kind = "mcd_var"
    statistic: ClassVar[str] = "var"


__all__ = [
    "ALPHA_DROPOUT",
    "DROPOUT_TYPES",
    "FEATURE_DROPOUT",
    "MCDropout",
    "MCDropoutVar",
    "apply_dropout",
    "dropout_modules",
    "keep_mask",
    "require_dropout",
    "row_keys",
    "sample_keys",
    "seeded_dropout",
]
