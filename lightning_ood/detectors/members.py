"""Ensemble members: N backbones of one recipe loaded from lightning-ood checkpoints, held as
sub-modules of the detector that scores with them (Deep Ensemble, the multi-model FSSD).

Held as sub-modules, the members move with ``.to()``, share every test batch with the main
network, and their weights land in the checkpoint of the model that carries the detector.
Their architectures travel with them as the module's extra state, so a hand-off checkpoint
rebuilds the ensemble without the member files.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_ood.detectors.hparams import HParam, optional
from lightning_ood.models import OODBackbone
from lightning_ood.models.trust import checked_model_record, model_from_record

#: The hyperparameters that make two checkpoints members of one ensemble.
_ARCH_KEYS = ("model", "num_classes", "model_kwargs")


def member_paths(
    checkpoints: Sequence[str] | None,
    checkpoint_template: str | None,
    seeds: Sequence[int] | None,
    owner: str = "DeepEnsemble",
) -> list[str]:
    """The member files: ``checkpoints`` as given, or ``checkpoint_template`` formatted with
    every seed of ``seeds`` (e.g. ``checkpoints/lenet_seed{seed}/last.ckpt``)."""
    if checkpoints is not None and (checkpoint_template is not None or seeds is not None):
        raise ValueError(
            f"{owner}: give either `checkpoints` (a list of paths) or `checkpoint_template` + "
            "`seeds`, not both"
        )
    if checkpoints is None:
        if checkpoint_template is None or seeds is None or "{seed}" not in checkpoint_template:
            raise ValueError(
                f"{owner}: needs `checkpoints: [path, ...]` or `checkpoint_template` (a path with "
                "'{seed}') plus `seeds: [1, 2, ...]`; got checkpoint_template="
                f"{checkpoint_template!r}, seeds={seeds!r}"
            )
        # a literal replacement, not str.format: a template read from a file may carry
        # format specs ("{seed:>300000000}") that would build strings of any size
        paths = [checkpoint_template.replace("{seed}", str(int(s))) for s in seeds]
    else:
        if isinstance(checkpoints, str):
            raise ValueError(f"{owner}: `checkpoints` must be a list of paths, got one string")
        paths = [str(p) for p in checkpoints]
    if not paths:
        raise ValueError(f"{owner}: the ensemble has no member checkpoints")
    counts = Counter(paths)
    dupes = sorted(p for p, n in counts.items() if n > 1)
    if dupes:
        raise ValueError(f"{owner}: member checkpoints listed twice: {dupes}")
    return paths


def _arch(hp: dict[str, Any], source: str) -> dict[str, Any]:
    """A member's architecture record: plain values only, checked as any file's record is
    (:mod:`lightning_ood.models.trust`: no import path, no ``trust_pickle``, no weights file)."""
    return checked_model_record(hp, source)


def _build(arch: dict[str, Any], source: str) -> OODBackbone:
    """An untrained member of the recorded architecture (its weights are loaded after); the
    record comes from a file, so it is checked again before anything is built."""
    return model_from_record(arch, source)


def path_list(name: str, value: Any, owner: str) -> list[str]:
    """A list of paths (a lone string is refused, not read as a list of characters)."""
    if isinstance(value, str | bytes):
        raise ValueError(f"{owner}: `{name}` must be a list of paths, got one string")
    return [str(p) for p in value]


def seed_list(name: str, value: Any, owner: str) -> list[int]:
    """A list of integer seeds."""
    return [int(s) for s in value]


class MemberEnsemble(nn.Module):
    """Mixin for a detector that holds ``self.members``: frozen backbones loaded from the
    checkpoint files ``self.paths`` (call :meth:`init_members` in ``__init__``). Declares the
    member hyperparameters: ``checkpoints`` or ``checkpoint_template`` + ``seeds`` (the
    members decide the fitted state: stage ``"fit"``).

    Raises:
        ValueError: members of different architectures or class counts (both files named).
    """

    name: str
    checkpoints = HParam(
        None,
        optional(path_list),
        doc="lightning-ood checkpoints of the members (same recipe, other seeds)",
    )
    checkpoint_template = HParam(
        None, doc="alternative to checkpoints: a path with {seed}, formatted with each seed"
    )
    seeds = HParam(None, optional(seed_list), doc="the seeds checkpoint_template is formatted with")

    def init_members(self, owner: str) -> None:
        """Resolve the member files (``checkpoints``, or ``checkpoint_template`` + ``seeds``)
        and load them if they all exist here."""
        self.paths = member_paths(self.checkpoints, self.checkpoint_template, self.seeds, owner)
        self.members = nn.ModuleList()
        self.sources: list[str] = []
        self.archs: list[dict[str, Any]] = []
        # Files that are absent here (a hand-off machine) are fine if the checkpoint carrying
        # this detector supplies the members; scoring without them names the files.
        if all(os.path.isfile(p) for p in self.paths):
            self._load_members()

    def _load_members(self) -> None:
        from lightning_ood.io import safe_load
        from lightning_ood.state import checkpoint_hparams  # lazy: state imports this package

        members: list[OODBackbone] = []
        archs: list[dict[str, Any]] = []
        for path in self.paths:
            ckpt = safe_load(path, map_location="cpu")  # weights only: no code from the file
            arch = _arch(
                checkpoint_hparams(ckpt, source=path), source=f"member checkpoint {path!r}"
            )
            if archs:
                self._check_same(archs[0], self.paths[0], arch, path)
            # Only the backbone: the member's own detectors are not needed.
            state = {
                k.removeprefix("backbone."): v
                for k, v in ckpt["state_dict"].items()
                if k.startswith("backbone.")
            }
            member = _build(arch, source=f"member checkpoint {path!r}")
            try:
                member.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError(
                    f"{self.name}: the weights in member checkpoint {path!r} do not fit its "
                    f"recorded architecture {arch}: {err}"
                ) from err
            members.append(member)
            archs.append(arch)
        self._set_members(members, archs, list(self.paths))

    def _set_members(
        self, members: list[OODBackbone], archs: list[dict[str, Any]], sources: list[str]
    ) -> None:
        for m in members:
            m.eval().requires_grad_(False)  # frozen: never part of a training step
        self.members = nn.ModuleList(members)
        self.archs, self.sources = archs, sources

    def _check_same(
        self, first: dict[str, Any], first_src: str, other: dict[str, Any], other_src: str
    ) -> None:
        a = {k: first[k] for k in _ARCH_KEYS}
        b = {k: other[k] for k in _ARCH_KEYS}
        if a != b:
            raise ValueError(
                f"{self.name}: ensemble members must share one recipe, but {other_src!r} is "
                f"{b} while {first_src!r} is {a}; list checkpoints of the same architecture "
                "and class count"
            )

    def get_extra_state(self) -> dict[str, Any]:
        """The members' architectures and source files, stored beside their weights."""
        return {"archs": [dict(a) for a in self.archs], "sources": list(self.sources)}

    def set_extra_state(self, state: Any) -> None:
        """Rebuild the members from a checkpoint's record (their weights load right after,
        as this module's children), unless the same architectures are already built."""
        archs = [dict(a) for a in state.get("archs", [])]
        if archs == self.archs and len(self.members) == len(archs):
            self.sources = list(state.get("sources", self.sources))
            return
        members = [
            _build(arch, source=f"{self.name} member record {i} in the checkpoint")
            for i, arch in enumerate(archs)
        ]
        device = next((b.device for b in self.buffers()), torch.device("cpu"))
        self._set_members([m.to(device) for m in members], archs, list(state.get("sources", [])))

    def check_members(self, model: OODBackbone | None) -> None:
        """Members exist and fit the network they are scored beside (class count, input)."""
        if len(self.members) == 0:
            missing = [p for p in self.paths if not os.path.isfile(p)]
            raise FileNotFoundError(
                f"{self.name}: the ensemble has no members: member checkpoints {missing} "
                "do not exist and no checkpoint supplied their weights; fix the paths in "
                "`checkpoints`/`checkpoint_template`"
            )
        if model is None:
            return
        for member, src in zip(self.members, self.sources, strict=True):
            mine = (int(member.num_classes), tuple(member.input_shape))
            main = (int(model.num_classes), tuple(model.input_shape))
            if mine != main:
                raise ValueError(
                    f"{self.name}: ensemble member {src!r} has {mine[0]} classes and inputs "
                    f"{mine[1]}, but the tested model ({type(model).__name__}) has {main[0]} "
                    f"classes and inputs {main[1]}; use members trained on the same ID set"
                )


__all__ = ["MemberEnsemble", "member_paths"]
