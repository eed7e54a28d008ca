"""What a file may make lightning-ood build: registered architectures and plain values, nothing
that imports, calls or unpickles a name read from the file.

A checkpoint (or a Deep Ensemble member file, or the member record inside a fitted
checkpoint) describes its backbone as ``model``, ``num_classes`` and ``model_kwargs``. Those
come from whoever wrote the file, so :func:`checked_model_record` admits only:

* ``model``: a registered name (``lenet``, ``densenet100``...), a torchvision classifier
  ``tv:NAME`` or a timm model ``timm:NAME`` (looked up in those libraries' own registries),
  or ``wrap`` *only* when its class import path is on the caller's allow-list
  (:func:`allow_modules`, ``lightning_ood.load(..., allow_modules=[...])``, the CLI's
  ``--allow_modules`` or the user's own ``model.model_kwargs.module``);
* ``model_kwargs``: numbers, strings, booleans, ``None`` and lists/dicts of them, without
  ``class_path``/``init_args`` keys (a config's instantiation syntax), without timm's
  file/download arguments, and with ``trust_pickle`` and ``weights`` removed: an opt-in to
  unpickling is only ever given at the call site, and the file's own tensors are the weights.

Everything the user types (a config they run, a Python call) is built as given; the check
applies only to what was read from a file. See
``docs/handoff.md#what-a-checkpoint-can-and-cannot-make-the-program-do``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from lightning_ood.models.base import OODBackbone

#: Import paths of ``wrap`` classes the caller trusts for this build (empty: none).
_ALLOWED: ContextVar[frozenset[str]] = ContextVar(
    "lightning_ood_allowed_modules", default=frozenset()
)
#: Keys of jsonargparse/LightningCLI instantiation syntax: never accepted from a file.
INSTANTIATION_KEYS = frozenset(
    {"class_path", "init_args", "_class_path", "dict_kwargs", "_instantiator", "__import__"}
)
#: Opt-ins and file references that a file may not carry for its reader.
STRIPPED_KEYS = ("trust_pickle", "weights")
#: timm.create_model arguments that read files or download (a checkpoint carries its weights).
_TIMM_FILE_ARGS = frozenset(
    {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}
)


class UntrustedCheckpointError(ValueError):
    """A file asks for something lightning-ood never does on a file's word (import, call,
    unpickle): it names the file, the field and the opt-in, if there is one."""


@contextlib.contextmanager
def allow_modules(modules: Iterable[str]) -> Iterator[frozenset[str]]:
    """Trust these ``wrap`` class import paths (``my_pkg.nets.MyNet``) for the duration.

    Nested uses add to the enclosing allow-list; leaving the block restores it.
    """
    names = frozenset(_check_names(modules))
    token = _ALLOWED.set(_ALLOWED.get() | names)
    try:
        yield _ALLOWED.get()
    finally:
        _ALLOWED.reset(token)


def trust_modules(modules: Iterable[str]) -> None:
    """Add import paths to this thread's allow-list for the rest of the process (the CLI, whose
    run spans many calls)."""
    _ALLOWED.set(_ALLOWED.get() | frozenset(_check_names(modules)))


def allowed_modules() -> frozenset[str]:
    """The ``wrap`` class import paths trusted right now."""
    return _ALLOWED.get()


def _check_names(modules: Iterable[str]) -> list[str]:
    if isinstance(modules, str):
        raise TypeError(f"allow_modules takes a list of import paths, got the string {modules!r}")
    names = [str(m) for m in modules]
    bad = [m for m in names if not m or "." not in m or m.endswith(".")]
    if bad:
        raise ValueError(
            f"allow_modules: {bad} are not class import paths like 'my_pkg.nets.MyNet'"
        )
    return names


def check_plain(value: Any, where: str, source: str) -> None:
    """Refuse anything but numbers, strings, booleans, None and lists/dicts of them, and the
    instantiation keys of configs; ``where`` names the field in the error."""
    if isinstance(value, str):
        _check_string(value, where, source)
        return
    if value is None or isinstance(value, bool | int | float):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]", source)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UntrustedCheckpointError(
                    f"{source}: {where} has a non-string key {key!r}; a checkpoint records "
                    "its model with plain values only"
                )
            if key in INSTANTIATION_KEYS or key.startswith("__"):
                raise UntrustedCheckpointError(
                    f"{source}: {where}.{key} asks to import or instantiate a class, which "
                    "lightning-ood never does on a file's word (a checkpoint is data). Build "
                    "that object in your own config or code instead."
                )
            check_plain(item, f"{where}.{key}", source)
        return
    raise UntrustedCheckpointError(
        f"{source}: {where} is a {type(value).__name__}; a checkpoint records its model with "
        "numbers, strings, booleans and lists/dicts of them only"
    )


#: Most classes a file may ask a head for (ImageNet-21k has 21,841): the model is built
#: before its weights are checked, so the file must not size it at will.
MAX_CLASSES = 1_000_000
#: Longest string a file may record in a model/detector argument (names, paths, tap lists).
MAX_STRING = 4096


def _check_string(value: str, where: str, source: str) -> None:
    """A recorded string is a name or a path, never a document: configuration parsers read a
    string that looks like YAML/JSON (``{class_path: ...}``) as an object to build."""
    stripped = value.strip()
    if len(value) > MAX_STRING or any(ord(c) < 32 and c not in "\t" for c in value):
        raise UntrustedCheckpointError(
            f"{source}: {where} is a string of {len(value)} characters with control "
            "characters or over the limit; a checkpoint records names and paths only"
        )
    if stripped[:1] in "{[" or "class_path" in value or "init_args" in value:
        raise UntrustedCheckpointError(
            f"{source}: {where} is the string {value[:60]!r}, which a configuration parser "
            "would read as an object to build (YAML/JSON, class_path); a checkpoint records "
            "names and paths only, so it is refused"
        )


def checked_model_record(record: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``{"model", "num_classes", "model_kwargs", "channels_last"}`` of ``record`` (a
    checkpoint's hyperparameters or a member's architecture), checked as described in the
    module docstring, with ``trust_pickle`` and ``weights`` removed.

    Raises:
        UntrustedCheckpointError: an unknown model kind, a non-plain value, instantiation
            syntax, a file argument of timm, or a ``wrap`` class not on the allow-list.
    """
    from lightning_ood.models import zoo
    from lightning_ood.models.registry import list_models

    model = record.get("model")
    if not isinstance(model, str):
        raise UntrustedCheckpointError(
            f"{source}: hyperparameter model is {model!r}, not a model name"
        )
    num_classes = record.get("num_classes", 10)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise UntrustedCheckpointError(
            f"{source}: hyperparameter num_classes is {num_classes!r}, not an integer"
        )
    if not 1 <= num_classes <= MAX_CLASSES:
        raise UntrustedCheckpointError(
            f"{source}: hyperparameter num_classes={num_classes} is outside 1..{MAX_CLASSES}; "
            "the head is built before the weights are checked, so a file may not ask for that"
        )
    raw = record.get("model_kwargs") or {}
    if not isinstance(raw, Mapping):
        raise UntrustedCheckpointError(
            f"{source}: hyperparameter model_kwargs is a {type(raw).__name__}, not a mapping"
        )
    check_plain(raw, "model_kwargs", source)
    kwargs = {k: v for k, v in raw.items() if k not in STRIPPED_KEYS}
    if model == zoo.WRAP:
        _check_wrap(kwargs, source)
    elif model.startswith(zoo.TIMM):
        bad = sorted(_TIMM_FILE_ARGS & set(kwargs))
        if bad:
            raise UntrustedCheckpointError(
                f"{source}: model_kwargs {bad} of {model} would make timm read or download "
                "files; a checkpoint carries its weights in its state_dict, so they are refused"
            )
    elif not model.startswith(zoo.TV) and model not in list_models():
        raise UntrustedCheckpointError(
            f"{source}: model {model!r} is not a registered architecture "
            f"({list_models()}), a tv:NAME or timm:NAME classifier, or wrap"
        )
    channels_last = record.get("channels_last", False)
    if not isinstance(channels_last, bool):
        raise UntrustedCheckpointError(
            f"{source}: hyperparameter channels_last is {channels_last!r}, not a boolean"
        )
    return {
        "model": model,
        "num_classes": int(num_classes),
        "model_kwargs": kwargs,
        "channels_last": channels_last,
    }


def _check_wrap(kwargs: Mapping[str, Any], source: str) -> None:
    module = kwargs.get("module")
    if not isinstance(module, str):
        raise UntrustedCheckpointError(
            f"{source}: model wrap records model_kwargs.module={module!r}, not an import path"
        )
    if module in allowed_modules():
        return
    raise UntrustedCheckpointError(
        f"{source} describes its network as model: wrap with model_kwargs.module={module!r}, "
        "i.e. it asks lightning-ood to import that name and call it. A checkpoint is data, so "
        "no name read from a file is imported or called. If you trust this file and "
        f"{module!r} is a class you know (your own network), allow it where you load: "
        f"lightning_ood.load(path, allow_modules=[{module!r}]), or on the command line "
        f"--allow_modules [{module}] (or configure model: wrap with that module yourself)."
    )


def model_from_record(record: Mapping[str, Any], source: str) -> OODBackbone:
    """An untrained backbone of the architecture a file records, built only after
    :func:`checked_model_record` admitted it (its weights are loaded by the caller)."""
    import torch

    from lightning_ood.models.registry import create_model

    arch = checked_model_record(record, source)
    backbone = create_model(arch["model"], num_classes=arch["num_classes"], **arch["model_kwargs"])
    if arch["channels_last"]:
        backbone.to(memory_format=torch.channels_last)
    return backbone


__all__ = [
    "UntrustedCheckpointError",
    "allow_modules",
    "allowed_modules",
    "check_plain",
    "checked_model_record",
    "model_from_record",
    "trust_modules",
]
