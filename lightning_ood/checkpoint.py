"""Lightning checkpoint I/O: every ``.ckpt`` the Trainer writes or resumes from goes through
:func:`lightning_ood.io.atomic_save` (atomic) and :func:`lightning_ood.io.safe_load` (weights
only). The torch-only helpers live in :mod:`lightning_ood.io` so that models, detectors and the
hand-off loader never import Lightning; they are re-exported here for existing callers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor

from lightning_ood.io import (
    CheckpointDeviceError,
    CheckpointError,
    NotACheckpointError,
    TruncatedCheckpointError,
    UnsafeCheckpointError,
    atomic_save,
    safe_load,
)

__all__ = [
    "CheckpointDeviceError",
    "CheckpointError",
    "NotACheckpointError",
    "SafeCheckpointIO",
    "TruncatedCheckpointError",
    "UnsafeCheckpointError",
    "atomic_save",
    "check_lightning_checkpoint",
    "safe_load",
]

#: Every checkpoint Lightning writes has this key; resuming from a file without it fails.
LIGHTNING_KEY = "pytorch-lightning_version"


def check_lightning_checkpoint(ckpt: Any, path: str | os.PathLike[str]) -> None:
    """Refuse a file that loads but is no Lightning checkpoint, saying what it is instead.

    A bare weights file (a ``state_dict``, or a research script's ``{'epoch', 'state_dict'}``
    such as the reference DenseNet ``.pth.tar``) cannot resume or evaluate a run: it holds no
    hyperparameters, loops or detectors. It is the backbone's initial weights instead.

    Raises:
        NotACheckpointError: ``ckpt`` lacks Lightning's keys.
    """
    if isinstance(ckpt, Mapping) and LIGHTNING_KEY in ckpt and "state_dict" in ckpt:
        return
    inner = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    tensors = (
        isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values())
    )
    keys = sorted(map(str, ckpt))[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
    if tensors:
        raise NotACheckpointError(
            f"{str(path)!r} is a bare weights file (a state_dict; top-level keys {keys}), not a "
            "Lightning checkpoint, so --ckpt_path cannot restore a run from it. Pass it as the "
            f"backbone's initial weights instead: --model.model_kwargs.weights {path} (YAML: "
            "model.model_kwargs.weights), without --ckpt_path."
        )
    raise NotACheckpointError(
        f"{str(path)!r} is a torch file but not a Lightning checkpoint (top-level keys {keys}; "
        f"no {LIGHTNING_KEY!r}); --ckpt_path takes a .ckpt written by a lightning-ood run."
    )


#: ``ModelCheckpoint`` state entries that name files it may later delete.
_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


def contain_callback_paths(ckpt: dict[str, Any], path: Any) -> dict[str, Any]:
    """Keep the file paths a checkpoint's callback state records (``ModelCheckpoint``'s best,
    k-th best and last checkpoints, which it deletes when it replaces them) only where they
    name a ``.ckpt`` file beside ``path`` itself, i.e. the run being resumed. Anything else,
    a URL, another folder, any other kind of file, would let a file received from someone else
    delete that path on the next save, so it is forgotten (as if the run had none)."""
    states = ckpt.get("callbacks")
    if not isinstance(states, dict):
        return ckpt
    try:
        home = Path(path).resolve().parent
    except (TypeError, OSError):
        home = None

    def ours(p: Any) -> bool:
        if not isinstance(p, str) or not p or "://" in p or home is None:
            return False
        target = Path(p).resolve()
        return target.parent == home and target.suffix == ".ckpt"

    for key, state in states.items():
        if not (isinstance(key, str) and key.startswith("ModelCheckpoint")):
            continue
        if not isinstance(state, dict):
            continue
        for field in _PATH_KEYS:
            if field in state and not ours(state[field]):
                state[field] = ""
        best = state.get("best_k_models")
        if isinstance(best, dict):
            state["best_k_models"] = {k: v for k, v in best.items() if ours(k)}
    return ckpt


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: :func:`atomic_save` to write, :func:`safe_load` to read.

    ``weights_only`` requests from Lightning are ignored on purpose: a checkpoint is always
    read as data. lightning-ood checkpoints hold only tensors and primitive types. A file that
    is no Lightning checkpoint (e.g. bare weights) is refused with what to do instead.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO.save_checkpoint takes no storage_options")
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        ckpt = safe_load(path, map_location=map_location or "cpu")
        check_lightning_checkpoint(ckpt, path)
        return contain_callback_paths(ckpt, path)
