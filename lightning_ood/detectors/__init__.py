"""Post-hoc OOD detectors, one module per detector, and the name registry used by configs."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_ood.detectors.ash import ASH
from lightning_ood.detectors.base import Detector, Reducer, percentile
from lightning_ood.detectors.deep_ensemble import DeepEnsemble
from lightning_ood.detectors.dice import DICE
from lightning_ood.detectors.dice_react import DICEReAct
from lightning_ood.detectors.energy import Energy, energy_score
from lightning_ood.detectors.fdbd import FDBD
from lightning_ood.detectors.fssd import FSSD
from lightning_ood.detectors.fssd_ensemble import FSSDEnsemble
from lightning_ood.detectors.gen import GEN
from lightning_ood.detectors.gradnorm import GradNorm
from lightning_ood.detectors.knn import KNN
from lightning_ood.detectors.layer_ensemble import LayerEnsembleDetector
from lightning_ood.detectors.line import LINe
from lightning_ood.detectors.linear_head import ActivationSampler, LinearHeadDetector
from lightning_ood.detectors.mahalanobis import Mahalanobis
from lightning_ood.detectors.maxlogit import MaxLogit
from lightning_ood.detectors.mc_dropout import MCDropout, MCDropoutVar
from lightning_ood.detectors.msp import MSP
from lightning_ood.detectors.nci import NCI
from lightning_ood.detectors.nnguide import NNGuide
from lightning_ood.detectors.odin import ODIN
from lightning_ood.detectors.react import ReAct
from lightning_ood.detectors.registry import (
    DETECTORS,
    ENTRY_POINT_GROUP,
    list_detectors,
    register_detector,
)
from lightning_ood.detectors.rmds import RMDS
from lightning_ood.detectors.scale import SCALE
from lightning_ood.detectors.vim import ViM


def _register_builtins() -> None:
    """Import every module of this package; their ``@register_detector`` classes register.
    A new detector file needs no line here."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def build_detector(name: str, spec: Mapping[str, Any] | None = None) -> Detector:
    """Build one detector from a config entry ``name: {type: kind, **hyperparameters}``.

    ``type`` defaults to ``name``, so ``line: {p_a: 90}`` and ``line_no_wp: {type: line,
    weight_prune: false}`` both work.
    """
    args = dict(spec or {})
    kind = args.pop("type", name)
    if not isinstance(kind, str) or kind not in DETECTORS:
        raise ValueError(
            f"unknown detector {kind!r} (config entry {name!r}); known detectors: "
            f"{sorted(DETECTORS)}"
        )
    args.setdefault("name", name)
    return DETECTORS[kind](**args)


def build_detectors(specs: Mapping[str, Mapping[str, Any] | None]) -> nn.ModuleDict:
    return nn.ModuleDict({name: build_detector(name, spec) for name, spec in specs.items()})


_register_builtins()


__all__ = [
    "ASH",
    "DETECTORS",
    "DICE",
    "ENTRY_POINT_GROUP",
    "FDBD",
    "FSSD",
    "GEN",
    "KNN",
    "MSP",
    "NCI",
    "ODIN",
    "RMDS",
    "SCALE",
    "ActivationSampler",
    "DICEReAct",
    "DeepEnsemble",
    "Detector",
    "Energy",
    "FSSDEnsemble",
    "GradNorm",
    "LINe",
    "LayerEnsembleDetector",
    "LinearHeadDetector",
    "MCDropout",
    "MCDropoutVar",
    "Mahalanobis",
    "MaxLogit",
    "NNGuide",
    "ReAct",
    "Reducer",
    "ViM",
    "build_detector",
    "build_detectors",
    "energy_score",
    "list_detectors",
    "percentile",
    "register_detector",
]
