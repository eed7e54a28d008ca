"""Name -> constructor registry so configs say ``model: densenet100``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_ood.models.base import OODBackbone

_MODELS: dict[str, Callable[..., OODBackbone]] = {}


def register_model(name: str) -> Callable[[Callable[..., OODBackbone]], Callable[..., OODBackbone]]:
    def wrap(fn: Callable[..., OODBackbone]) -> Callable[..., OODBackbone]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> OODBackbone:
    """Build a registered model, e.g. ``create_model("densenet100", num_classes=10)``."""
    try:
        fn = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {list_models()}") from None
    return fn(**kwargs)
