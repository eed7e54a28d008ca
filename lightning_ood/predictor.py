"""Hand-off: a checkpoint becomes one ``nn.Module`` from images to logits, OOD scores and decisions.

>>> import lightning_ood
>>> model = lightning_ood.load("checkpoints/demo/last.ckpt")
>>> out = model(images)            # (N, C, H, W) floats in [0, 1], un-normalised
>>> out["logits"], out["scores"]["energy"], out["is_ood"]["energy"]

The checkpoint carries everything needed: the backbone weights, every fitted detector with
its decision threshold (95 % TPR on held-out ID data), the class names, the normalisation and
the input size. It is read with :func:`~lightning_ood.io.safe_load` (no code runs from
the file). :meth:`OODPredictor.export` gives a ``torch.export`` program of the same module.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ood import engine
from lightning_ood.detectors import Detector
from lightning_ood.detectors.base import exporting, frozen_flags
from lightning_ood.io import safe_load
from lightning_ood.models import OODBackbone
from lightning_ood.state import build_from_checkpoint

#: First words of the refusals, shared by the eager errors and the exported assertions.
_NONFINITE = "input batch contains NaN or Inf values"
_OUT_OF_RANGE = "input pixels lie outside [0, 1]"


def _samples(bad: Tensor, most: int = 10) -> str:
    """``[i, j, ...]``: the batch indices of samples with any flagged value."""
    rows = bad.flatten(1).any(1).nonzero().flatten().tolist()
    return f"{rows[:most]}{' ...' if len(rows) > most else ''}"


class OODPredictor(nn.Module):
    """Backbone + fitted, calibrated detectors + the ID data's metadata.

    ``forward(images)`` takes un-normalised images of the recorded input size, floats in
    [0, 1] or uint8 in 0..255 (token models: integer ids in [0, vocab_size)), and returns
    ``{"logits": (N, L), "pred": (N,), "scores": {det: (N,)}, "is_ood": {det: (N,) bool}}``;
    higher scores = more in-distribution, and a sample is called OOD by a detector when its
    score is below that detector's threshold.

    Anything else is refused, never scored: NaN/Inf pixels, floats outside [0, 1] (0..255
    floats, or images already normalised with the dataset's mean/std, which the module applies
    itself), integer dtypes other than uint8. The eager module raises ``ValueError`` saying what
    to pass; an exported program raises ``RuntimeError`` with the same first words.

    Memory does not grow with the batch the caller passes: the eager module scores at most
    ``chunk_size`` samples per forward pass (an empty batch gives empty outputs).

    Args:
        backbone: the trained classifier.
        detectors: fitted detectors with thresholds (see :meth:`Detector.calibrate`).
        meta: ``class_names``, ``input_shape``, ``mean``, ``std``, ``data_version``, ...
        chunk_size: most samples per forward pass (and per input-gradient step of ODIN/FSSD).
    """

    def __init__(
        self,
        backbone: OODBackbone,
        detectors: dict[str, Detector],
        meta: dict[str, Any],
        chunk_size: int = 256,
    ) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        for name, det in detectors.items():
            det.check_fitted()
            if not det.is_calibrated:
                raise ValueError(
                    f"detector {name!r} has no decision threshold; fit it with the "
                    "OODEvaluation callback (which calibrates on held-out ID data) or call "
                    "detector.calibrate(id_scores)"
                )
        self.backbone = backbone.eval()
        self.detectors = nn.ModuleDict(detectors).eval()
        self.meta = dict(meta)
        self.class_names: list[str] = list(meta.get("class_names") or [])
        self.input_shape: tuple[int, ...] = tuple(meta["input_shape"])
        mean, std = meta.get("mean"), meta.get("std")
        self.normalizes = mean is not None and std is not None
        shape = (1, -1) + (1,) * (len(self.input_shape) - 1)
        self.register_buffer(
            "mean", torch.tensor(mean if self.normalizes else [0.0]).view(shape), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std if self.normalizes else [1.0]).view(shape), persistent=False
        )
        self._taps = engine.detector_taps(detectors.values(), backbone)

    @property
    def detector_names(self) -> list[str]:
        return list(self.detectors.keys())

    @property
    def thresholds(self) -> dict[str, float]:
        return {n: float(d.threshold) for n, d in self.detectors.items()}

    # -- input checks ------------------------------------------------------------------------
    def check_input(self, images: Tensor) -> None:
        """Shape, dtype and value range, each with an error saying what to pass instead.

        Under ``torch.export`` the value checks become runtime assertions of the program.
        """
        if not isinstance(images, Tensor):
            raise TypeError(f"expected a Tensor batch, got {type(images).__name__}")
        expected = self.input_shape
        if images.dim() != len(expected) + 1 or tuple(images.shape[1:]) != expected:
            what = "channels x height x width" if len(expected) == 3 else "sequence length"
            raise ValueError(
                f"input batch has shape {tuple(images.shape)}; this model takes (N, "
                f"{', '.join(map(str, expected))}) ({what}) as recorded in its checkpoint. "
                "Resize/convert the images first (e.g. torchvision.transforms.v2.Resize and "
                "Grayscale/RGB conversion)."
            )
        if not self.normalizes:
            self._check_tokens(images)
            return
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(
                f"input batch has dtype {images.dtype}; pass uint8 images (0..255) or floating "
                "images in [0, 1] (e.g. torchvision.transforms.v2.ToDtype(torch.float32, "
                "scale=True))"
            )
        if images.dtype == torch.uint8:
            return
        if exporting():
            torch._assert_async(torch.isfinite(images).all(), _NONFINITE)
            torch._assert_async(((images >= 0) & (images <= 1)).all(), _OUT_OF_RANGE)
            return
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            raise ValueError(
                f"{_NONFINITE} in sample(s) {_samples(~finite)}; OOD scores of such inputs "
                "are meaningless, so they are refused rather than scored"
            )
        outside = (images < 0) | (images > 1)
        if bool(outside.any()):
            lo, hi = float(images.min()), float(images.max())
            raise ValueError(
                f"{_OUT_OF_RANGE} in sample(s) {_samples(outside)} (min {lo:g}, max {hi:g}). "
                "Pass un-normalised images: floats in [0, 1] (divide 0..255 floats by 255) or "
                "uint8 0..255; do not apply the dataset's Normalize, the module does that "
                f"itself (mean {self.meta.get('mean')}, std {self.meta.get('std')})"
            )

    def _check_tokens(self, tokens: Tensor) -> None:
        vocab = int(getattr(self.backbone, "vocab_size", 0) or 0)
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise ValueError(
                f"input batch has dtype {tokens.dtype}; this model takes integer token ids in "
                f"[0, {vocab})"
            )
        if vocab:
            outside = (tokens < 0) | (tokens >= vocab)
            if bool(outside.any()):
                raise ValueError(
                    f"token ids outside [0, {vocab}) in sample(s) {_samples(outside)}; encode "
                    "the sequences with the model's vocabulary"
                )

    def normalize(self, images: Tensor) -> Tensor:
        """[0, 1] floats (or uint8 0..255) → the normalised tensor the backbone was trained on."""
        if not self.normalizes:  # token sequences
            return images
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std

    # -- scoring -----------------------------------------------------------------------------
    def forward(self, images: Tensor) -> dict[str, Any]:
        self.check_input(images)
        if exporting() or images.shape[0] <= self.chunk_size:
            return self.score_normalized(self.normalize(images))
        parts = [self.score_normalized(self.normalize(c)) for c in images.split(self.chunk_size)]
        return {
            "logits": torch.cat([p["logits"] for p in parts]),
            "pred": torch.cat([p["pred"] for p in parts]),
            **{
                key: {n: torch.cat([p[key][n] for p in parts]) for n in parts[0][key]}
                for key in ("scores", "is_ood")
            },
        }

    def score_normalized(self, x: Tensor) -> dict[str, Any]:
        """Like :meth:`forward` for inputs already normalised (a datamodule's batches); one
        forward pass for the whole of ``x``."""
        # No autograd graph is kept for the outputs (it would hold every activation of the
        # batch); detectors that perturb the input enable gradients for their own step.
        with torch.no_grad():
            out = self.backbone.extract(x, taps=self._taps)
            return engine.predict_batch(self.detectors, out, self.backbone, x)

    # -- deployment --------------------------------------------------------------------------
    def export(self, example: Tensor) -> torch.export.ExportedProgram:
        """A ``torch.export`` program of :meth:`forward` (batch size dynamic, 1 to 65,536).

        Any example batch size works, 1 included (a batch of one is traced as two, so the
        batch dimension stays symbolic). The program takes inputs of the example's dtype
        (uint8, or a float dtype): a traced graph has one input dtype, so export with the dtype
        you will deploy with. Bad values are refused at run time like the eager module does.

        Detectors that perturb the input along its gradient (ODIN, FSSD/Mahalanobis with
        ``epsilon > 0``) need autograd at inference, which an exported graph cannot hold; build
        the predictor without them (``lightning_ood.load(path, detectors=[...])``).
        """
        grad = [n for n, d in self.detectors.items() if d.needs_input_grad or not d.exportable]
        if grad:
            raise ValueError(
                f"detectors {grad} need input gradients or random passes at inference and "
                "cannot be exported; load with "
                f"detectors={[n for n in self.detector_names if n not in grad]}"
            )
        if not self.normalizes:
            raise ValueError(
                f"{type(self.backbone).__name__} takes token ids, whose range check depends on "
                "the data; token models are not exported: use the eager module"
            )
        self.check_input(example)
        if example.shape[0] == 0:
            raise ValueError("export needs an example batch with at least one image")
        if example.shape[0] < 2:  # a batch of 1 would be specialised to a constant
            example = example[:1].expand(2, *example.shape[1:]).contiguous()
        batch = torch.export.Dim("batch", min=1, max=65536)
        with frozen_flags(self.detectors.values()):
            return torch.export.export(
                self.eval(), (example,), dynamic_shapes=({0: batch},), strict=False
            )


#: Why a detector of a checkpoint cannot score, for the detectors that share a remedy.
_UNFITTED = "unfitted"
_UNCALIBRATED = "uncalibrated"
#: The remedy of both.
_RUN_TEST = (
    "Run `lightning-ood test --ckpt_path <checkpoint>` with the OODEvaluation callback, which "
    "fits, calibrates and saves them (fitted.ckpt)."
)


def _unusable(detectors: dict[str, Detector]) -> dict[str, str]:
    """Why each detector that cannot score cannot: :data:`_UNFITTED`, :data:`_UNCALIBRATED`,
    or the detector's own account of the fitted state its checkpoint lacks (KNN/NNGuide saved
    with ``store_bank: false`` keep only their bank's metadata, and name ``store_bank: true``
    as the fix)."""
    why: dict[str, str] = {}
    for name, det in detectors.items():
        if not det.is_fitted:
            why[name] = _UNFITTED
            if det.flag("fitted"):  # fitted, but part of its state was not saved
                try:
                    det.check_fitted()
                except RuntimeError as err:
                    why[name] = str(err)
        elif not det.is_calibrated:
            why[name] = _UNCALIBRATED
    return why


def _explain(why: dict[str, str]) -> str:
    """The reasons of :func:`_unusable` as sentences, those sharing a remedy grouped."""
    unfitted = [n for n, w in why.items() if w == _UNFITTED]
    uncalibrated = [n for n, w in why.items() if w == _UNCALIBRATED]
    parts = [w for w in why.values() if w not in (_UNFITTED, _UNCALIBRATED)]
    if unfitted:
        parts.append(f"{unfitted} are not fitted (saved before detector fitting).")
    if uncalibrated:
        parts.append(f"{uncalibrated} have no decision threshold (not calibrated).")
    if unfitted or uncalibrated:
        parts.append(_RUN_TEST)
    return " ".join(parts)


def load(
    path: str | os.PathLike[str],
    detectors: Sequence[str] | None = None,
    map_location: str | torch.device = "cpu",
    chunk_size: int = 256,
    allow_modules: Sequence[str] = (),
) -> OODPredictor:
    """Load a lightning-ood checkpoint as an :class:`OODPredictor` (safe: weights only).

    The file is data: nothing in it is imported, called or unpickled. Its backbone must be a
    registered architecture, a ``tv:``/``timm:`` classifier, or a ``wrap`` of a class whose
    import path you list in ``allow_modules`` (:mod:`lightning_ood.models.trust`).

    Args:
        path: a ``.ckpt`` written by ``lightning-ood fit`` (after detector fitting) or
            ``lightning-ood test``.
        detectors: names of the detectors to keep (default: every fitted, calibrated one).
        map_location: device for the weights.
        chunk_size: most samples scored per forward pass (bounds memory, see
            :class:`OODPredictor`).
        allow_modules: import paths of your own network classes (``my_pkg.nets.MyNet``) that
            a ``wrap`` checkpoint may name; empty by default, so a checkpoint cannot make
            this call import anything.

    Raises:
        FileNotFoundError / CheckpointError / UnsafeCheckpointError: see
            :func:`~lightning_ood.io.safe_load`.
        UntrustedCheckpointError: the checkpoint asks to import a class not in
            ``allow_modules``, or records its model with anything but plain values.
        ValueError: the checkpoint is not a lightning-ood checkpoint, holds no fitted detector,
            or lacks a requested one.
    """
    ckpt = safe_load(path, map_location=map_location)
    backbone, fitted, meta = build_from_checkpoint(
        ckpt, source=str(path), trusted_modules=allow_modules
    )
    backbone.to(map_location)
    fitted.to(map_location)
    if not meta.get("input_shape"):
        raise ValueError(
            f"checkpoint {str(path)!r} records no input size/normalisation (written before "
            "lightning-ood stored them, or without a datamodule); re-run `lightning-ood test` "
            "on it to write a complete checkpoint"
        )
    why_not = _unusable(dict(fitted.items()))
    available = {n: d for n, d in fitted.items() if n not in why_not}
    if detectors is None:
        chosen = available
        if why_not and available:
            warnings.warn(
                f"lightning_ood.load({str(path)!r}): detector(s) {sorted(why_not)} left out of "
                f"the predictor, which scores with {sorted(available)}: {_explain(why_not)}",
                UserWarning,
                stacklevel=2,
            )
    else:
        unknown = [n for n in detectors if n not in fitted]
        if unknown:
            raise ValueError(
                f"checkpoint {str(path)!r} has no fitted, calibrated detector(s) {unknown}: it "
                f"holds no detector of that name; it holds {sorted(fitted)}, of which "
                f"{sorted(available)} can score"
            )
        refused = {n: why_not[n] for n in detectors if n in why_not}
        if refused:
            raise ValueError(
                f"checkpoint {str(path)!r} has no fitted, calibrated detector(s) "
                f"{list(refused)}: {_explain(refused)} Usable now: {sorted(available)}."
            )
        chosen = {n: available[n] for n in detectors}
    if not chosen:
        raise ValueError(
            f"checkpoint {str(path)!r} holds no fitted, calibrated detector: "
            + (_explain(why_not) if why_not else f"it holds none at all. {_RUN_TEST}")
        )
    return OODPredictor(backbone, chosen, meta, chunk_size).to(map_location).eval()
