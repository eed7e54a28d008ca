"""One loader for every backbone's ``weights=`` argument.

Accepts the formats a user actually has on disk: a plain ``state_dict``, a reference research
checkpoint (``{'epoch', 'state_dict'}``, possibly saved from ``nn.DataParallel`` with
``module.`` prefixes) and a Lightning ``.ckpt`` whose module holds the backbone under some
attribute (``model.``, ``backbone.``...). A lightning-ood ``.ckpt`` (the fine-tuning recipe's
``model_kwargs.weights: .../last.ckpt``) gives its ``backbone.`` tensors; its detectors' state
(buffers, non-tensor ``_extra_state``, an ensemble's member networks) is ignored. The prefix
is found, not guessed from a fixed list: the one under which most checkpoint keys match the
model's own keys wins, so no per-file key surgery is ever needed. Every failure names the file
and says what to do; a file of another architecture is reported as such, with keys and shapes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from lightning_ood.io import CheckpointError, UnsafeCheckpointError, safe_load

#: Keys under which checkpoints commonly nest their state_dict.
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "net")
#: BatchNorm counters are absent from older files (e.g. torchvision's ImageNet weights) and do
#: not affect the forward pass, so a checkpoint without them is still complete.
_OPTIONAL_SUFFIX = "num_batches_tracked"
#: Key suffix of a module's ``get_extra_state()`` in a state dict (any value, not a tensor).
_EXTRA_STATE = "_extra_state"
#: Where a lightning-ood checkpoint keeps the classifier (``ClassificationTask.backbone``).
_TASK_BACKBONE = "backbone."


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a checkpoint file and return its (still un-normalised) flat state_dict.

    Loads with ``weights_only=True``: a checkpoint is data, and unpickling arbitrary objects
    would run code from the file.

    Raises:
        FileNotFoundError: the path does not exist.
        RuntimeError: the file is not a readable torch checkpoint or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist; pass the path to a .pth/.pth.tar/.ckpt "
            "state_dict file"
        )
    try:
        obj = safe_load(path)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(
            f"weights file {str(path)!r} stores Python objects besides tensors, which are not "
            "loaded for safety. If you trust it, re-save only its weights: "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)."
        ) from err
    except CheckpointError as err:
        raise CheckpointError(
            f"could not read weights file {str(path)!r}: it is not a torch checkpoint or it is "
            f"corrupt ({err})"
        ) from err
    return _unnest(obj, path)


def read_state_dict(
    path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> dict[str, Tensor]:
    """:func:`read_checkpoint`, or with ``trust_pickle`` also a whole pickled ``nn.Module``.

    ``torch.save(model)`` pickles the class, and unpickling it runs code from the file, so it
    is read only on the user's explicit opt-in; its ``state_dict`` is returned.
    """
    try:
        return read_checkpoint(path)
    except UnsafeCheckpointError as err:
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{err} Or, if it is a whole model saved with torch.save(model) that you trust, "
                "pass trust_pickle=True (model_kwargs.trust_pickle: true in a config): loading "
                "it runs code from the file."
            ) from err
    obj = load_pickled(path)
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    return _unnest(obj, Path(path))


def load_pickled(path: str | os.PathLike[str]) -> object:
    """``torch.load(path, weights_only=False)``: runs code from the file; callers opt in."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling can fail in any way (a class no longer importable)
        raise CheckpointError(
            f"could not unpickle {str(path)!r} ({type(err).__name__}: {err}); a pickled model "
            "needs its class importable under the same module path as when it was saved"
        ) from err


def _unnest(obj: object, path: Path) -> dict[str, Tensor]:
    """Descend through ``{'state_dict': ...}``-style wrappers down to the tensor mapping.

    Modules' extra state (``<prefix>._extra_state``: FSSD's resolved taps, an ensemble's member
    records; any value) is part of a state dict but no weight, so it is dropped here. A
    lightning-ood checkpoint yields only its ``backbone.`` tensors: its detectors' buffers (and
    an ensemble's member networks, whose keys look like a backbone's) are never weights of the
    model being built.
    """
    task = _is_lightning_ood(obj)
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        tensors = _tensor_entries(obj)
        if tensors is not None:
            if task and any(k.startswith(_TASK_BACKBONE) for k in tensors):
                return {k: v for k, v in tensors.items() if k.startswith(_TASK_BACKBONE)}
            return tensors
        inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise RuntimeError(
        f"weights file {str(path)!r} holds no state_dict (found {keys}); expected a mapping of "
        "parameter names to tensors, optionally nested under 'state_dict'"
    )


def _tensor_entries(obj: Mapping[str, object]) -> dict[str, Tensor] | None:
    """The tensors of a state dict (its ``_extra_state`` entries left out), or None when
    ``obj`` is no state dict: empty, or holding other non-tensor values."""
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    others = [k for k in obj if k not in tensors]
    if not tensors or any(not str(k).endswith(_EXTRA_STATE) for k in others):
        return None
    return tensors


def _is_lightning_ood(obj: object) -> bool:
    """A checkpoint written by lightning-ood: a ClassificationTask's hyperparameters (with
    ``model``) beside its ``state_dict``."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        return False
    hp = obj.get("hyper_parameters")
    return isinstance(hp, Mapping) and "model" in hp


def strip_prefix(state: Mapping[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Remove the key prefix (``module.``, ``model.``, ``model.net.``...) that best fits the model.

    Every dotted prefix of every key is a candidate; the one under which most keys become model
    keys wins (ties: the shorter). Keys outside the winning prefix belong to other parts of the
    saved object (a Lightning module's detectors, say) and are dropped.
    """
    counts: dict[str, int] = {}
    for key in state:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in expected:
                prefix = ".".join(parts[:i]) + "." if i else ""
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return dict(state)
    best = max(counts, key=lambda p: (counts[p], -len(p)))
    if not best:
        return dict(state)
    return {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}


def _shapes(state: Mapping[str, object], keys: list[str], most: int = 5) -> str:
    """``['name' (shape), ...]`` for the first ``most`` of ``keys``."""
    shown = [
        f"{k!r} {tuple(v.shape)}" if isinstance(v := state[k], Tensor) else repr(k)
        for k in keys[:most]
    ]
    return f"[{', '.join(shown)}{', ...' if len(keys) > most else ''}]"


def _module_name(root: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, m in root.named_modules() if m is target), None)


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    classifier: nn.Linear | None = None,
) -> nn.Module:
    """Load a checkpoint file into ``model`` in place, checking names and shapes first.

    Args:
        model: the module whose ``state_dict`` keys the file should provide.
        path: a plain state_dict, a reference ``{'epoch', 'state_dict'}`` file or a Lightning
            ``.ckpt``; ``module.``/``model.``-style prefixes are removed automatically.
        model_name: how errors name the model (e.g. ``"densenet100"``).
        classifier: the final linear layer, so a class-count mismatch gets its own message.
            Defaults to ``model.get_classifier()`` when the model has one.

    Returns:
        ``model``, for chaining.

    Raises:
        FileNotFoundError / RuntimeError: see :func:`read_checkpoint`.
        ValueError: the file's keys or shapes do not fit the model (class count, architecture).
    """
    return apply_state_dict(
        model,
        read_checkpoint(path),
        source=f"checkpoint {str(path)!r}",
        model_name=model_name,
        classifier=classifier,
    )


def apply_state_dict(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str = "state_dict",
    model_name: str | None = None,
    classifier: nn.Linear | None = None,
) -> nn.Module:
    """Check ``state`` against ``model`` (prefixes, class count, keys, shapes) and load it.

    ``source`` names where the tensors came from in error messages; the other arguments are as
    in :func:`load_weights`.
    """
    name = model_name or type(model).__name__
    own = model.state_dict()
    state = strip_prefix(state, set(own))

    if classifier is None and hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
    head = _module_name(model, classifier) if classifier is not None else None
    if head is not None and classifier is not None:
        ckpt_w = state.get(f"{head}.weight")
        if ckpt_w is not None and ckpt_w.ndim == 2 and ckpt_w.shape[0] != classifier.out_features:
            raise ValueError(
                f"{source} has {head} for {ckpt_w.shape[0]} classes but {name} "
                f"was built with num_classes={classifier.out_features}; build it with "
                f"num_classes={ckpt_w.shape[0]}"
            )

    optional = (_OPTIONAL_SUFFIX, _EXTRA_STATE)
    missing = [k for k in own if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and isinstance(v, Tensor) and state[k].shape != v.shape
    ]
    shapes = f"{len(wrong)} tensors differ in shape, e.g. {wrong[:5]}"
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the architecture of {name}: "
            f"{len(missing)} missing keys (e.g. {_shapes(own, missing)}), {len(unexpected)} "
            f"unexpected keys (e.g. {_shapes(state, unexpected)})"
            f"{f'; {shapes}' if wrong else ''}. Was it saved from a different model or "
            "configuration? Build the architecture it was trained with (a lightning-ood "
            "checkpoint records it as hyper_parameters.model)."
        )
    if wrong:
        raise ValueError(
            f"{source} does not match the architecture of {name}: {shapes}. Was it saved from "
            "a different model or configuration?"
        )
    for k, v in own.items():  # optional counters: keep the model's own value
        state.setdefault(k, v)
    model.load_state_dict(state, strict=True)
    return model
