"""Checkpoint contents ↔ modules, without Lightning: what the task and the hand-off share.

A lightning-ood checkpoint is a dict with ``hyper_parameters`` (``model``, ``num_classes``,
``model_kwargs``, ``detectors``, ``channels_last``), a ``state_dict`` whose keys start with
``backbone.`` or ``detectors.<name>.``, and ``lightning_ood.data`` (class names,
normalisation, input size, data version). :func:`build_from_checkpoint` turns it into the
backbone, the detectors and that metadata with plain torch, so ``lightning_ood.load()`` never
constructs the ``LightningModule``; :func:`reconcile_detector_state` is the one rule for
stored detector state that does not match the configured detectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ood.detectors import Detector, build_detectors
from lightning_ood.models import OODBackbone
from lightning_ood.models.trust import (
    allow_modules,
    check_plain,
    checked_model_record,
    model_from_record,
)

#: Prefix of the detector buffers in a checkpoint's ``state_dict``.
DETECTOR_PREFIX = "detectors."
#: Hyperparameters that rebuild the model and its detectors.
MODEL_KEYS = ("model", "num_classes", "model_kwargs", "detectors", "channels_last")


def checkpoint_hparams(ckpt: Any, source: str = "<dict>") -> dict[str, Any]:
    """The checkpoint's hyperparameters, or a clear error for anything else (a bare weights
    file, another library's checkpoint)."""
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    if not isinstance(hp, Mapping) or "model" not in hp or "state_dict" not in ckpt:
        raise ValueError(
            f"{source} is not a lightning-ood checkpoint (no hyper_parameters/state_dict of "
            "a ClassificationTask); for bare backbone weights use model_kwargs.weights"
        )
    return {k: hp[k] for k in MODEL_KEYS if k in hp}


#: Task arguments a checkpoint's architecture record supplies.
ARCH_KEYS = ("model", "num_classes", "model_kwargs", "channels_last")


def checkpoint_task_args(hp: Any, source: str) -> dict[str, Any]:
    """The task arguments a checkpoint contributes when a run or ``load_from_checkpoint``
    rebuilds its task: the architecture (checked by
    :func:`~lightning_ood.models.trust.checked_model_record`: ``weights``/``trust_pickle``
    removed, ``wrap`` only for allowed modules), the detector configs and ``oe_weight``, all
    plain values. Anything else in the file's hyperparameters (``_class_path``,
    ``_instantiator``, optimizer specs) is ignored; ``{}`` when there is no ``model``."""
    if not isinstance(hp, Mapping) or "model" not in hp:
        return {}
    arch = checked_model_record(hp, source)
    out: dict[str, Any] = {k: arch[k] for k in ARCH_KEYS}
    if hp.get("detectors") is not None:
        check_plain(hp["detectors"], "detectors", source)
        out["detectors"] = dict(hp["detectors"])
    oe = hp.get("oe_weight")
    if isinstance(oe, int | float) and not isinstance(oe, bool):
        out["oe_weight"] = float(oe)
    return out


def reconcile_detector_state(
    state: dict[str, Tensor],
    detectors: Mapping[str, Detector],
    stored_configs: Mapping[str, Any],
    log: Callable[[str], None] | None = None,
) -> tuple[list[str], list[str]]:
    """Make ``state`` (a checkpoint ``state_dict``, edited in place) fit ``detectors``.

    A configured detector absent from the checkpoint, or whose stored state
    :meth:`~lightning_ood.detectors.base.Detector.stored_state_fits` rejects (other values of
    hyperparameters that enter fitting; a hyperparameter added since, at its default, does
    not count), gets its own fresh (unfitted) state; one that differs only in score-time
    values keeps its state with the threshold reset (recalibrated at test); stored detectors
    that are not configured are dropped. Returns ``(refit, dropped)`` names; ``log`` hears
    about both.
    """
    refit: list[str] = []
    for name, det in detectors.items():
        prefix = f"{DETECTOR_PREFIX}{name}."
        keys = [k for k in state if k.startswith(prefix)]
        fits, why = det.stored_state_fits(stored_configs.get(name))
        if keys and why and log is not None:
            log(
                f"detector {name!r}: checkpoint holds it with config {stored_configs.get(name)}, "
                f"now configured as {det.config()}: {why}" + ("" if fits else "; refitting.")
            )
        if keys and fits and why:  # score-time values changed: the threshold is stale
            for key in ("threshold", "threshold_tpr"):
                if prefix + key in state:
                    state[prefix + key] = torch.full_like(state[prefix + key], math.nan)
        if not keys or not fits:
            for k in keys:
                del state[k]
            det.mark_unfitted()
            state.update(det.state_dict(prefix=prefix))
            refit.append(name)
    stored = {
        k[len(DETECTOR_PREFIX) :].split(".")[0] for k in state if k.startswith(DETECTOR_PREFIX)
    }
    dropped = sorted(stored - set(detectors))
    for k in [k for k in state if k.startswith(DETECTOR_PREFIX)]:
        if k[len(DETECTOR_PREFIX) :].split(".")[0] in dropped:
            del state[k]
    if dropped and log is not None:
        log(f"checkpoint detectors not configured, ignored: {dropped}")
    return refit, dropped


class _Parts(nn.Module):
    """The checkpoint's module layout (``backbone``, ``detectors``) for a strict load."""

    def __init__(self, backbone: OODBackbone, detectors: nn.ModuleDict) -> None:
        super().__init__()
        self.backbone = backbone
        self.detectors = detectors


def build_from_checkpoint(
    ckpt: Mapping[str, Any], source: str = "<dict>", trusted_modules: Iterable[str] = ()
) -> tuple[OODBackbone, nn.ModuleDict, dict[str, Any]]:
    """``(backbone, detectors, data metadata)`` of a loaded checkpoint dict, plain torch.

    The file is data: the backbone is built only from a registered architecture and plain
    values (:mod:`lightning_ood.models.trust`; a ``wrap`` class only when its import path is in
    ``trusted_modules``), without its initial weights file (the state dict carries the
    weights), then every tensor is loaded strictly. Ensemble members recorded in the file
    obey the same rule.
    """
    hp = checkpoint_hparams(ckpt, source)
    with allow_modules(trusted_modules):
        backbone = model_from_record(hp, source)
        stored = dict(hp.get("detectors") or {})
        check_plain(stored, "detectors", source)
        detectors = build_detectors(stored)
        state = {
            k: v
            for k, v in ckpt["state_dict"].items()
            if k.startswith(("backbone.", DETECTOR_PREFIX))
        }
        reconcile_detector_state(state, detectors, stored)
        _Parts(backbone, detectors).load_state_dict(state)  # members rebuild in here
    meta = dict((ckpt.get("lightning_ood") or {}).get("data") or {})
    return backbone, detectors, meta


__all__ = [
    "ARCH_KEYS",
    "DETECTOR_PREFIX",
    "MODEL_KEYS",
    "build_from_checkpoint",
    "checkpoint_hparams",
    "checkpoint_task_args",
    "reconcile_detector_state",
]
