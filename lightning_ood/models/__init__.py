"""Pure nn.Module backbones honouring the OODBackbone contract."""

from lightning_ood.models import densenet, lenet, lstm, resnet  # noqa: F401  (registration)
from lightning_ood.models.base import FEATURES, LOGITS, BackboneOutput, OODBackbone
from lightning_ood.models.registry import create_model, list_models, register_model

__all__ = [
    "FEATURES",
    "LOGITS",
    "BackboneOutput",
    "OODBackbone",
    "create_model",
    "list_models",
    "register_model",
]
