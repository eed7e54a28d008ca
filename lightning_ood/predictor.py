"""Hand-off: a checkpoint becomes one ``nn.Module`` from images to logits, OOD scores and decisions.

>>> import lightning_ood
>>> model = lightning_ood.load("checkpoints/demo/last.ckpt")
>>> out = model(images)            # (N, C, H, W) floats in [0, 1], un-normalised
>>> out["logits"], out["scores"]["energy"], out["is_ood"]["energy"]

The checkpoint carries everything needed: the backbone weights, every fitted detector with
its decision threshold (95 % TPR on held-out ID data), the class names, the normalisation and
the input size. It is read with :func:`~lightning_ood.io.safe_load` (no code runs from
the file). :meth:`OODPredictor.export` gives a ``torch.export`` program of the same module, and
:meth:`OODPredictor.export_onnx` an ONNX file of it for runtimes outside PyTorch.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ood import engine
from lightning_ood.card import card_of
from lightning_ood.detectors import Detector
from lightning_ood.detectors.base import exporting, frozen_flags
from lightning_ood.io import atomic_write_bytes, safe_load
from lightning_ood.models import OODBackbone
from lightning_ood.state import build_from_checkpoint

#: First words of the refusals, shared by the eager errors and the exported assertions.
_NONFINITE = "input batch contains NaN or Inf values"
_OUT_OF_RANGE = "input pixels lie outside [0, 1]"
#: The input of an ONNX file written by :meth:`OODPredictor.export_onnx`.
ONNX_INPUT = "images"
#: protobuf's limit on one serialised ONNX model (weights included).
_ONNX_MAX_BYTES = 2**31 - 1


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
        return self._trace(self.eval(), self._export_example(example))

    def onnx_output_names(self) -> list[str]:
        """The outputs of :meth:`export_onnx`'s graph, in order: ``logits`` (N, L), ``pred``
        (N,) int64, ``input_ok`` (N,) bool, then per detector ``score/<name>`` (N,) and
        ``is_ood/<name>`` (N,) bool, detectors in :attr:`detector_names` order."""
        names = ["logits", "pred", "input_ok"]
        for det in self.detector_names:
            names += [f"score/{det}", f"is_ood/{det}"]
        return names

    def export_onnx(
        self, example: Tensor, path: str | os.PathLike[str], opset_version: int | None = None
    ) -> list[str]:
        """Write :meth:`forward` as an ONNX file (``torch.onnx``'s exporter) at ``path``.

        The graph has one input, ``images`` (N, *input_shape) of the example's dtype (uint8, or
        a float dtype, as for :meth:`export`), with a dynamic batch dimension named ``batch``
        (1 to 65,536), and the flat outputs of :meth:`onnx_output_names`; the method returns
        those names, and the file records them in its metadata (``lightning_ood.outputs``) with
        the thresholds, class names, input shape and dtype. Scores keep the eager module's
        dtypes (ViM and RMDS score in float64).

        ONNX has no assertion operator, so the graph cannot refuse bad values the way the eager
        module (``ValueError``) and a ``torch.export`` program (``RuntimeError``) do. It flags
        them instead: ``input_ok`` is False for a sample with a NaN/Inf pixel or a float pixel
        outside [0, 1], and that sample's scores are NaN and its ``is_ood`` True for every
        detector, so a caller that ignores ``input_ok`` never takes such a sample for
        in-distribution. On valid samples the outputs are the eager module's: under
        onnxruntime (CPU) the tests find logits and scores within ``atol=1e-4, rtol=1e-5``
        (float32 rounding of reordered arithmetic) and ``pred``/``is_ood`` equal except for a
        sample whose logits or score lie within that tolerance of a tie or of the threshold.
        One more exception: where activations tie at ASH-B's pruning cut (ReLU zeros, with a
        percentile that keeps more features than a sample has positive ones), which of them
        get the binarised value is up to each runtime's top-k, so ASH-B's score may differ.

        The file is written atomically (no reader sees a half-written file). Needs the ``onnx``
        extra (``pip install 'lightning_ood[onnx]'``: onnx, onnxscript; onnxruntime to run it).

        Raises:
            ValueError: as :meth:`export` (detectors that need input gradients or random passes
                are named, token models refused, empty example), or a model over protobuf's
                2 GB limit.
            ImportError: onnx or onnxscript is not installed.
        """
        example = self._export_example(example)
        try:
            import onnx
            import onnxscript  # noqa: F401  (torch.onnx's exporter translates with it)
        except ImportError as err:
            raise ImportError(
                f"export_onnx needs the onnx and onnxscript packages ({err}); install them with "
                "`pip install 'lightning_ood[onnx]'`"
            ) from err
        size = sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))
        if size > _ONNX_MAX_BYTES:
            raise ValueError(
                f"the predictor holds {size / 2**30:.1f} GiB of weights and detector state, over "
                "the 2 GiB limit of one ONNX file; leave out large detectors (a KNN/NNGuide bank: "
                "lower bank_fraction) or use export() (torch.export)"
            )
        names = self.onnx_output_names()
        program = self._trace(_OnnxOutputs(self).eval(), example)
        onnx_program = torch.onnx.export(
            program,
            (example,),
            input_names=[ONNX_INPUT],
            output_names=names,
            opset_version=opset_version,
            dynamic_shapes=({0: _batch_dim()},),
            dynamo=True,
            verbose=False,
        )
        model = onnx_program.model_proto
        model.doc_string = (
            "lightning_ood OODPredictor: images (N, "
            f"{', '.join(map(str, self.input_shape))}) {example.dtype} -> {', '.join(names)}. "
            "Higher scores = more in-distribution; is_ood = score < threshold; input_ok False "
            "marks NaN/Inf or out-of-range samples (scores NaN, is_ood True)."
        )
        props = {
            "lightning_ood.outputs": names,
            "lightning_ood.input": [ONNX_INPUT, *self.input_shape],
            "lightning_ood.input_dtype": str(example.dtype).removeprefix("torch."),
            "lightning_ood.thresholds": self.thresholds,
            "lightning_ood.class_names": self.class_names,
            "lightning_ood.data_version": self.meta.get("data_version"),
        }
        onnx.helper.set_model_props(model, {k: json.dumps(v) for k, v in props.items()})
        atomic_write_bytes(path, model.SerializeToString())
        return names

    def _export_example(self, example: Tensor) -> Tensor:
        """The refusals shared by :meth:`export` and :meth:`export_onnx`, and the example
        batch to trace with (at least two samples, so the batch dimension stays symbolic)."""
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
        return example

    def _trace(self, module: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
        # Detectors inside detectors (the FSSDs of an FSSD ensemble) read their own flags.
        nested = [
            m for d in self.detectors.values() for m in d.modules() if isinstance(m, Detector)
        ]
        with frozen_flags(nested):
            return torch.export.export(
                module, (example,), dynamic_shapes=({0: _batch_dim()},), strict=False
            )


def _batch_dim() -> Any:
    """The symbolic batch dimension of exported programs and ONNX graphs."""
    return torch.export.Dim("batch", min=1, max=65536)


class _OnnxOutputs(nn.Module):
    """:class:`OODPredictor`'s outputs as the flat tuple of
    :meth:`OODPredictor.onnx_output_names`, with invalid samples flagged instead of refused."""

    def __init__(self, predictor: OODPredictor) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.predictor(images)
        if images.dtype == torch.uint8:  # every uint8 value is a valid pixel
            ok = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        else:  # NaN compares False, so NaN and +-Inf fail the range test too
            flat = images.flatten(1)
            ok = ((flat >= 0) & (flat <= 1)).all(dim=1)
        flat_out = [out["logits"], out["pred"], ok]
        for det in self.predictor.detector_names:
            score = out["scores"][det]
            flat_out += [
                torch.where(ok, score, torch.full_like(score, float("nan"))),
                out["is_ood"][det] | ~ok,
            ]
        return tuple(flat_out)


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
    predictor = OODPredictor(backbone, chosen, meta, chunk_size).to(map_location).eval()
    #: Where every shipped number came from (:mod:`lightning_ood.card`); plain data.
    predictor.card = card_of(ckpt, str(path))
    return predictor
