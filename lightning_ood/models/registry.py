"""Name -> constructor registry so configs say ``model: densenet100``.

Names with a ``tv:`` / ``timm:`` prefix, and ``wrap``, are built by
:mod:`lightning_ood.models.zoo` (any torchvision/timm classifier, a user's own network).
"""

from __future__ import annotations

import difflib
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
    """The registered names (the zoo's ``tv:``/``timm:``/``wrap`` names come on top)."""
    return sorted(_MODELS)


def registered_models() -> dict[str, Callable[..., OODBackbone]]:
    """Registered name -> constructor, for listings."""
    return dict(_MODELS)


def create_model(name: str, **kwargs: Any) -> OODBackbone:
    """Build a model by name, e.g. ``create_model("densenet100", num_classes=10)``,
    ``create_model("tv:mobilenet_v2")``, ``create_model("timm:resnet18")``."""
    from lightning_ood.models import zoo

    if zoo.is_zoo_name(name):
        return zoo.create_zoo_model(name, **kwargs)
    try:
        fn = _MODELS[name]
    except KeyError:
        known = list_models() + [zoo.TV + n for n in zoo.torchvision_names()]
        near = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"close matches: {near}; " if near else ""
        raise ValueError(
            f"unknown model {name!r}; {hint}registered models: {list_models()}. Any torchvision "
            "or timm classifier is 'tv:NAME' / 'timm:NAME' (e.g. tv:resnet18), your own "
            "network 'wrap' (`lightning-ood models` lists them)"
        ) from None
    return fn(**kwargs)
