"""Bring your own classifier: ``tv:NAME``, ``timm:NAME`` and ``wrap`` model names.

``create_model("tv:mobilenet_v2")`` builds any torchvision classification model by name
(``torchvision.models.get_model``), ``create_model("timm:vit_small_patch16_224")`` any timm
model (optional extra ``lightning_ood[timm]``), and ``create_model("wrap", module=...)`` a
user's own network from a config. All become a :class:`~lightning_ood.models.wrap.
WrappedBackbone`: the head is found, the taps are the named modules, nothing is written per
architecture. Weights come from a local file (torchvision/timm state_dict, a Lightning
``.ckpt``, or a pickled ``nn.Module`` with ``trust_pickle=True``) or from the library's own
download path (``weights="IMAGENET1K_V1"`` / ``"DEFAULT"`` for torchvision,
``weights="pretrained"`` for timm), which fails with instructions when offline.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn
from torchvision import models as tvm

from lightning_ood.io import download_timeout
from lightning_ood.models.weights import (
    apply_state_dict,
    load_pickled,
    read_state_dict,
    strip_prefix,
)
from lightning_ood.models.wrap import WrappedBackbone, wrap

TV = "tv:"
TIMM = "timm:"
WRAP = "wrap"
#: The model families whose head and features are found automatically (tested).
TV_FAMILIES = (
    "mobilenet_v2",
    "resnet18",
    "wide_resnet50_2",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
)
#: timm's weights tag for its download path.
TIMM_PRETRAINED = "pretrained"

Weights = str | os.PathLike[str] | None


def is_zoo_name(name: str) -> bool:
    """Whether ``name`` is handled here rather than by the registry."""
    return name.startswith((TV, TIMM)) or name == WRAP


def create_zoo_model(name: str, **kwargs: Any) -> WrappedBackbone:
    """Build ``tv:NAME``, ``timm:NAME`` or ``wrap`` (see the module docstring)."""
    if name.startswith(TV):
        return torchvision_model(name[len(TV) :], **kwargs)
    if name.startswith(TIMM):
        return timm_model(name[len(TIMM) :], **kwargs)
    if name == WRAP:
        return wrap_module(**kwargs)
    raise ValueError(f"{name!r} is not a tv:NAME, timm:NAME or wrap model name")


def _suggest(name: str, options: Sequence[str], prefix: str) -> str:
    near = difflib.get_close_matches(name, list(options), n=6, cutoff=0.6)
    return f"; close matches: {[prefix + n for n in near]}" if near else ""


# -- torchvision -----------------------------------------------------------------------------
def torchvision_names() -> list[str]:
    """Every torchvision classification model name (``tv:`` + one of these)."""
    return sorted(tvm.list_models(module=tvm))


def torchvision_model(
    arch: str,
    num_classes: int = 1000,
    weights: Weights = None,
    *,
    in_channels: int = 3,
    image_size: int = 224,
    head: str | None = None,
    trust_pickle: bool = False,
    **model_args: Any,
) -> WrappedBackbone:
    """Any torchvision classifier, e.g. ``torchvision_model("mobilenet_v2", num_classes=10)``.

    Args:
        arch: a name of :func:`torchvision_names`.
        num_classes: classifier outputs (1000 for torchvision's ImageNet weights).
        weights: a local file, or a torchvision weights name (``"IMAGENET1K_V1"``,
            ``"DEFAULT"``) fetched by torchvision's downloader (cache first, then network).
        in_channels: input channels; the first convolution is rebuilt for values other than 3
            (3-channel weights are summed over channels when loaded into 1 channel).
        image_size: input side; passed to the families that need it (ViT).
        head: dotted path of the classifier head; default the last ``nn.Linear``.
        trust_pickle: allow ``weights`` to be a whole pickled ``nn.Module`` (runs its code).
        **model_args: further arguments of the torchvision builder (``dropout``...).
    """
    names = torchvision_names()
    if arch not in names:
        raise ValueError(
            f"unknown torchvision model 'tv:{arch}'{_suggest(arch, names, TV)}. "
            "`lightning-ood models` lists the model names"
        )
    _check_positive(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    label = f"{TV}{arch}"
    net = _build_torchvision(arch, num_classes, image_size, model_args)
    conv = _adapt_in_channels(net, in_channels, label) if in_channels != 3 else None
    model = WrappedBackbone(
        net, head, input_shape=(in_channels, image_size, image_size), name=label
    )
    if weights is not None:
        enum = tvm.get_model_weights(arch)
        if isinstance(weights, str) and weights in enum.__members__ and not Path(weights).exists():
            from lightning_ood.models.resnet import download_torchvision_weights

            state = download_torchvision_weights(enum[weights], arch)
            source = f"torchvision weights {arch} {weights}"
        else:
            state = read_state_dict(weights, trust_pickle=trust_pickle)
            source = f"weights file {str(weights)!r}"
        _load(model, state, source, conv, in_channels)
    return model


def _build_torchvision(
    arch: str, num_classes: int, image_size: int, model_args: dict[str, Any]
) -> nn.Module:
    kwargs = {"weights": None, "num_classes": num_classes, **model_args}
    if image_size != 224 and "image_size" not in kwargs:
        try:  # the fixed-size families (ViT) take it; the CNNs do not need it
            return tvm.get_model(arch, **kwargs, image_size=image_size)
        except TypeError as err:
            if "image_size" not in str(err):
                raise
    return tvm.get_model(arch, **kwargs)


def _adapt_in_channels(net: nn.Module, in_channels: int, label: str) -> str:
    """Rebuild the first ``Conv2d`` for ``in_channels`` inputs; return its dotted path."""
    path, conv = next(
        ((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), (None, None)
    )
    if path is None or conv is None:
        raise ValueError(f"{label} has no Conv2d whose input channels in_channels could change")
    if conv.groups != 1:
        raise ValueError(f"in_channels: the first convolution of {label} ({path}) is grouped")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)
    return path


def _load(
    model: WrappedBackbone,
    state: Mapping[str, Tensor],
    source: str,
    conv: str | None,
    in_channels: int,
) -> None:
    """Load ``state`` into ``model.net``; RGB first-conv weights fold into 1 channel."""
    net = model.net
    state = strip_prefix(state, set(net.state_dict()))
    key = f"{conv}.weight" if conv else None
    rgb = key is not None and key in state and state[key].ndim == 4 and state[key].shape[1] == 3
    if rgb and in_channels == 1:  # grey input: the sum of the RGB filters sees the same image
        state = {**state, key: state[key].sum(dim=1, keepdim=True)}
    head = model.head
    apply_state_dict(
        net,
        state,
        source=source,
        model_name=model.model_name,
        classifier=head if isinstance(head, nn.Linear) else None,
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


# -- timm ------------------------------------------------------------------------------------
def import_timm() -> ModuleType:
    """timm, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("timm")
    except ImportError as err:
        raise ImportError(
            "timm:NAME models need timm, an optional dependency: pip install lightning_ood[timm]"
        ) from err


class TimmBackbone(WrappedBackbone):
    """A timm model: features from timm's own ``forward_head(..., pre_logits=True)``.

    The head is ``get_classifier()``; a head given by hand uses the generic hook split.
    """

    def __init__(
        self, net: nn.Module, head: str | None, *, input_shape: Sequence[int], name: str
    ) -> None:
        clf = net.get_classifier()  # type: ignore[operator]
        self.native = head is None and isinstance(clf, nn.Linear)
        if head is None:
            head = next((n for n, m in net.named_modules() if m is clf and n), None)
            if head is None or not isinstance(clf, nn.Linear):
                raise ValueError(
                    f"{name}: timm's get_classifier() is a {type(clf).__name__}, not an "
                    "nn.Linear; pass head='<dotted module path>' (model_kwargs.head) naming the "
                    "module whose output are the logits"
                )
        super().__init__(net, head, input_shape=input_shape, name=name)

    def forward_features(self, x: Tensor) -> Tensor:
        if not self.native:
            return super().forward_features(x)
        h = self.net.forward_head(self.net.forward_features(x), pre_logits=True)  # type: ignore[operator]
        return h.flatten(1) if h.dim() > 2 else h


def timm_names(pattern: str = "") -> list[str]:
    """timm model names (``timm:`` + one of these), optionally filtered by a wildcard."""
    return list(import_timm().list_models(pattern or "*"))


def timm_model(
    arch: str,
    num_classes: int = 1000,
    weights: Weights = None,
    *,
    in_channels: int = 3,
    image_size: int | None = None,
    head: str | None = None,
    trust_pickle: bool = False,
    **model_args: Any,
) -> WrappedBackbone:
    """Any timm model, e.g. ``timm_model("resnet18", num_classes=10)``.

    Args:
        arch: a timm model name (``timm.list_models()``).
        num_classes: classifier outputs.
        weights: a local file, or ``"pretrained"`` for timm's own download (Hugging Face hub).
        in_channels: passed to timm as ``in_chans``.
        image_size: input side; passed as ``img_size`` to the families that take it (ViTs);
            default the model's pretrained input size.
        head: dotted path of the head; default timm's ``get_classifier()``.
        trust_pickle: allow ``weights`` to be a whole pickled ``nn.Module`` (runs its code).
        **model_args: further ``timm.create_model`` arguments (``drop_rate``...).
    """
    timm = import_timm()
    if not timm.is_model(arch):
        raise ValueError(
            f"unknown timm model 'timm:{arch}'{_suggest(arch, timm.list_models(), TIMM)}. "
            "`lightning-ood models` says how to list timm's names"
        )
    _check_positive(num_classes=num_classes, in_channels=in_channels)
    label = f"{TIMM}{arch}"
    pretrained = weights == TIMM_PRETRAINED and not Path(str(weights)).exists()
    kwargs = {"num_classes": num_classes, "in_chans": in_channels, **model_args}
    net = _create_timm(timm, arch, label, pretrained, image_size, kwargs)
    size = image_size or int(net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    model = TimmBackbone(net, head, input_shape=(in_channels, size, size), name=label)
    if weights is not None and not pretrained:
        state = read_state_dict(weights, trust_pickle=trust_pickle)
        _load(model, state, f"weights file {str(weights)!r}", None, in_channels)
    return model


def _create_timm(
    timm: ModuleType,
    arch: str,
    label: str,
    pretrained: bool,
    image_size: int | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    def create(**extra: Any) -> nn.Module:
        if not pretrained:
            return timm.create_model(arch, pretrained=False, **kwargs, **extra)
        with download_timeout():
            try:
                return timm.create_model(arch, pretrained=True, **kwargs, **extra)
            except (OSError, RuntimeError) as err:  # offline: huggingface_hub / urllib errors
                raise RuntimeError(
                    f"could not download the timm weights of {label} ({type(err).__name__}: "
                    f"{err}). This machine probably has no network: on a machine that has, run "
                    f"torch.save(timm.create_model({arch!r}, pretrained=True).state_dict(), "
                    "'weights.pth'), copy the file here and pass weights='/path/to/weights.pth'"
                ) from err

    if image_size and "img_size" not in kwargs:
        try:
            return create(img_size=image_size)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return create()


# -- wrap from a config -------------------------------------------------------------------------
def wrap_module(
    module: str,
    num_classes: int | None = None,
    *,
    head: str | None = None,
    input_shape: Sequence[int] | None = None,
    module_kwargs: Mapping[str, Any] | None = None,
    weights: Weights = None,
    trust_pickle: bool = False,
    taps: Mapping[str, str] | None = None,
) -> WrappedBackbone:
    """The YAML form of :func:`~lightning_ood.models.wrap.wrap` (``model: wrap``).

    Args:
        module: the import path of an ``nn.Module`` class (``my_pkg.nets.MyNet``), built with
            ``module_kwargs`` (and ``num_classes`` when the class takes it), or the path of a
            whole pickled ``nn.Module`` file (needs ``trust_pickle``: loading runs its code).
        num_classes: the class count the wrapped head must have.
        head: dotted path of the head; default the last ``nn.Linear``.
        input_shape: one input without the batch dimension, e.g. ``[3, 32, 32]``.
        module_kwargs: constructor arguments of ``module``.
        weights: a state_dict file loaded into the built module.
        trust_pickle: allow pickled modules (``module`` or ``weights``).
        taps: tap name -> dotted module path; default every named module.
    """
    if Path(module).is_file():
        if not trust_pickle:
            raise ValueError(
                f"wrap: module={module!r} is a file, i.e. a pickled nn.Module; loading it runs "
                "code from the file. If you trust it pass trust_pickle=True "
                "(model_kwargs.trust_pickle: true), or give the class's import path instead"
            )
        net = load_pickled(module)
        if not isinstance(net, nn.Module):
            raise TypeError(f"wrap: {module!r} holds a {type(net).__name__}, not an nn.Module")
    else:
        net = _instantiate(module, num_classes, dict(module_kwargs or {}))
    if weights is not None:
        state = read_state_dict(weights, trust_pickle=trust_pickle)
        apply_state_dict(net, state, source=f"weights file {str(weights)!r}", model_name=module)
    model = wrap(net, head, input_shape=input_shape, name=f"wrap:{module}", taps=taps)
    if num_classes is not None and model.num_classes != num_classes:
        raise ValueError(
            f"wrap: the head {model.head_name!r} of {module} has {model.num_classes} outputs but "
            f"num_classes={num_classes}; build the module for {num_classes} classes "
            "(module_kwargs) or set num_classes to match"
        )
    return model


def _instantiate(path: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    mod_name, _, cls_name = path.rpartition(".")
    if not mod_name:
        raise ValueError(
            f"wrap: module={path!r} is neither a file nor an import path like 'my_pkg.nets.MyNet'"
        )
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"wrap: cannot import module={path!r} ({err}); is its package on PYTHONPATH?"
        ) from err
    params = inspect.signature(cls).parameters
    if num_classes is not None and "num_classes" in params and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    net = cls(**kwargs)
    if not isinstance(net, nn.Module):
        raise TypeError(f"wrap: {path}(...) returned a {type(net).__name__}, not an nn.Module")
    return net


# -- listing ---------------------------------------------------------------------------------
def describe_models(registered: Mapping[str, Any]) -> str:
    """What ``lightning-ood models`` prints: registered names, then the zoo families."""
    lines = ["Registered models (model: NAME):"]
    for name, fn in sorted(registered.items()):
        doc = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        lines.append(f"  {name:<14} {doc}")
    tv = torchvision_names()
    lines += [
        "",
        f"torchvision (model: tv:NAME), {len(tv)} classifiers:",
        "  " + ", ".join(tv),
    ]
    try:
        n_timm = len(timm_names())
        lines += [
            "",
            f"timm (model: timm:NAME), {n_timm} models; list them with "
            "python -c \"import timm; print(timm.list_models('*vit*'))\"",
        ]
    except ImportError:
        lines += ["", "timm (model: timm:NAME): not installed; pip install lightning_ood[timm]"]
    lines += [
        "",
        "Your own network (model: wrap): model_kwargs {module: my_pkg.nets.MyNet, head: fc, "
        "input_shape: [3, 32, 32]}; in Python lightning_ood.models.wrap(net, head='fc').",
        "Taps of a model: lightning-ood models --taps NAME",
    ]
    return "\n".join(lines)


def format_taps(model: WrappedBackbone | Any, name: str) -> str:
    """One line per tap: its name and output shape (one forward pass of one example)."""
    from lightning_ood.models.wrap import list_taps

    rows = list_taps(model)
    width = max(len(t) for t, _ in rows)
    shape = tuple(model.input_shape)
    lines = [f"Taps of {name} (input {shape}; name them in a detector's taps: [...]):"]
    for tap, shape in rows:
        shown = "not called in eval forward" if shape is None else str(tuple(shape))
        lines.append(f"  {tap:<{width}}  {shown}")
    return "\n".join(lines)


__all__ = [
    "TimmBackbone",
    "create_zoo_model",
    "describe_models",
    "format_taps",
    "import_timm",
    "is_zoo_name",
    "timm_model",
    "timm_names",
    "torchvision_model",
    "torchvision_names",
    "wrap_module",
]
