"""Lightning checkpoint I/O: every ``.ckpt`` the Trainer writes or resumes from goes through
:func:`lightning_ood.io.atomic_save` (atomic) and :func:`lightning_ood.io.safe_load` (weights
only). The torch-only helpers live in :mod:`lightning_ood.io` so that models, detectors and the
hand-off loader never import Lightning; they are re-exported here for existing callers.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from lightning_ood.io import CheckpointError, UnsafeCheckpointError, atomic_save, safe_load

__all__ = [
    "CheckpointError",
    "SafeCheckpointIO",
    "UnsafeCheckpointError",
    "atomic_save",
    "safe_load",
]


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: :func:`atomic_save` to write, :func:`safe_load` to read.

    ``weights_only`` requests from Lightning are ignored on purpose: a checkpoint is always
    read as data. lightning-ood checkpoints hold only tensors and primitive types.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO.save_checkpoint takes no storage_options")
        atomic_save(checkpoint, path)

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return safe_load(path, map_location=map_location or "cpu")
