"""Pure nn.Module backbones honouring the OODBackbone contract."""

from lightning_ood.models import (  # noqa: F401  (registration)
    densenet,
    lenet,
    lstm,
    resnet,
    wideresnet,
)
from lightning_ood.models.base import FEATURES, LOGITS, BackboneOutput, OODBackbone
from lightning_ood.models.registry import create_model, list_models, register_model
from lightning_ood.models.wrap import (
    NonLinearHeadError,
    WrappedBackbone,
    linear_classifier,
    list_taps,
    wrap,
)

__all__ = [
    "FEATURES",
    "LOGITS",
    "BackboneOutput",
    "NonLinearHeadError",
    "OODBackbone",
    "WrappedBackbone",
    "create_model",
    "linear_classifier",
    "list_models",
    "list_taps",
    "register_model",
    "wrap",
]
