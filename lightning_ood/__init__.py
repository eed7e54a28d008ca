"""lightning_ood: post-hoc OOD detection with PyTorch Lightning.

Hand-off in one call: ``lightning_ood.load("checkpoints/<experiment>/last.ckpt")`` returns an
``nn.Module`` from images to logits, per-detector OOD scores and ID/OOD decisions.

The package root imports nothing eagerly: ``import lightning_ood.models`` or
``lightning_ood.detectors`` (pure torch) never loads Lightning, and ``lightning_ood.load``
loads only the torch-only hand-off path on first use.
"""

from __future__ import annotations

from typing import Any

#: The one place the version is written (pyproject.toml reads it; ``lightning-ood --version``).
__version__ = "0.2.0"

__all__ = ["OODPredictor", "__version__", "load"]


def __getattr__(name: str) -> Any:
    if name in ("OODPredictor", "load"):
        from lightning_ood import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'lightning_ood' has no attribute {name!r}")
