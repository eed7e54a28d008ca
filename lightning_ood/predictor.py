"""Hand-off: a checkpoint becomes one ``nn.Module`` from images to logits, OOD scores and decisions.

>>> import lightning_ood
>>> model = lightning_ood.load("checkpoints/demo/last.ckpt")
>>> out = model(images)            # (N, C, H, W) floats in [0, 1], un-normalised
>>> out["logits"], out["scores"]["energy"], out["is_ood"]["energy"]

The checkpoint carries everything needed: the backbone weights, every fitted detector with
its decision threshold (95 % TPR on held-out ID data), the class names, the normalisation and
the input size. It is read with :func:`~lightning_ood.checkpoint.safe_load` (no code runs from
the file). :meth:`OODPredictor.export` gives a ``torch.export`` program of the same module.
"""

from __future__ import annotations

import os
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


class OODPredictor(nn.Module):
    """Backbone + fitted, calibrated detectors + the ID data's metadata.

    ``forward(images)`` takes un-normalised images in [0, 1] (float) or [0, 255] (uint8) of the
    recorded input size and returns ``{"logits": (N, L), "pred": (N,), "scores": {det: (N,)},
    "is_ood": {det: (N,) bool}}``; higher scores = more in-distribution, and a sample is called
    OOD by a detector when its score is below that detector's threshold.

    Args:
        backbone: the trained classifier.
        detectors: fitted detectors with thresholds (see :meth:`Detector.calibrate`).
        meta: ``class_names``, ``input_shape``, ``mean``, ``std``, ``data_version``, ...
    """

    def __init__(
        self, backbone: OODBackbone, detectors: dict[str, Detector], meta: dict[str, Any]
    ) -> None:
        super().__init__()
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
        """Shape, channel count, dtype and finiteness, each with an error saying what to do."""
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
        if images.is_floating_point() and not exporting():
            finite = torch.isfinite(images)
            if not bool(finite.all()):
                bad = (~finite.flatten(1)).any(1).nonzero().flatten().tolist()
                raise ValueError(
                    f"input batch contains NaN or Inf values in sample(s) {bad[:10]}"
                    f"{' ...' if len(bad) > 10 else ''}; OOD scores of such inputs are "
                    "meaningless, so they are refused rather than scored"
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
        return self.score_normalized(self.normalize(images))

    def score_normalized(self, x: Tensor) -> dict[str, Any]:
        """Like :meth:`forward` for inputs already normalised (a datamodule's batches)."""
        out = self.backbone.extract(x, taps=self._taps)
        return engine.predict_batch(self.detectors, out, self.backbone, x)

    # -- deployment --------------------------------------------------------------------------
    def export(self, example: Tensor) -> torch.export.ExportedProgram:
        """A ``torch.export`` program of :meth:`forward` (batch size dynamic).

        Detectors that perturb the input along its gradient (ODIN, FSSD/Mahalanobis with
        ``epsilon > 0``) need autograd at inference, which an exported graph cannot hold; build
        the predictor without them (``lightning_ood.load(path, detectors=[...])``).
        """
        grad = [n for n, d in self.detectors.items() if d.needs_input_grad]
        if grad:
            raise ValueError(
                f"detectors {grad} need input gradients at inference and cannot be exported; "
                f"load with detectors={[n for n in self.detector_names if n not in grad]}"
            )
        self.check_input(example)
        batch = torch.export.Dim("batch", min=1, max=65536)
        with frozen_flags(self.detectors.values()):
            return torch.export.export(
                self.eval(), (example,), dynamic_shapes=({0: batch},), strict=False
            )


def load(
    path: str | os.PathLike[str],
    detectors: Sequence[str] | None = None,
    map_location: str | torch.device = "cpu",
) -> OODPredictor:
    """Load a lightning-ood checkpoint as an :class:`OODPredictor` (safe: weights only).

    Args:
        path: a ``.ckpt`` written by ``lightning-ood fit`` (after detector fitting) or
            ``lightning-ood test``.
        detectors: names of the detectors to keep (default: every fitted, calibrated one).
        map_location: device for the weights.

    Raises:
        FileNotFoundError / CheckpointError / UnsafeCheckpointError: see
            :func:`~lightning_ood.checkpoint.safe_load`.
        ValueError: the checkpoint is not a lightning-ood checkpoint, holds no fitted detector,
            or lacks a requested one.
    """
    ckpt = safe_load(path, map_location=map_location)
    backbone, fitted, meta = build_from_checkpoint(ckpt, source=str(path))
    backbone.to(map_location)
    fitted.to(map_location)
    if not meta.get("input_shape"):
        raise ValueError(
            f"checkpoint {str(path)!r} records no input size/normalisation (written before "
            "lightning-ood stored them, or without a datamodule); re-run `lightning-ood test` "
            "on it to write a complete checkpoint"
        )
    available = {n: d for n, d in fitted.items() if d.is_fitted and d.is_calibrated}
    if detectors is None:
        chosen = available
    else:
        missing = [n for n in detectors if n not in available]
        if missing:
            raise ValueError(
                f"checkpoint {str(path)!r} has no fitted, calibrated detector(s) {missing}; "
                f"available: {sorted(available)}"
            )
        chosen = {n: available[n] for n in detectors}
    if not chosen:
        raise ValueError(
            f"checkpoint {str(path)!r} holds no fitted, calibrated detector; it was saved before "
            "detector fitting. Run `lightning-ood test --ckpt_path ...` with the OODEvaluation "
            "callback, which fits, calibrates and saves them."
        )
    return OODPredictor(backbone, chosen, meta).eval()
