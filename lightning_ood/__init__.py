"""lightning_ood: post-hoc OOD detection with PyTorch Lightning.

Hand-off in one call: ``lightning_ood.load("checkpoints/<experiment>/last.ckpt")`` returns an
``nn.Module`` from images to logits, per-detector OOD scores and ID/OOD decisions.
"""

from lightning_ood.predictor import OODPredictor, load

__all__ = ["OODPredictor", "load"]
