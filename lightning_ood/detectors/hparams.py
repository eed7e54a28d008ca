"""Declared hyperparameters: one :class:`HParam` per detector argument says everything the
project needs to know about it.

A detector declares its hyperparameters as class attributes::

    class Energy(Detector):
        kind = "energy"
        temperature = HParam(1.0, check=in_range(low=0.0, low_open=True), stage="score",
                             doc="T > 0 (1 in the papers)")

and :class:`~lightning_ood.detectors.base.Detector` derives from the declarations (see
``Detector.__init_subclass__``):

* the constructor's keyword arguments, their validation and the class's ``__signature__``;
* :meth:`~lightning_ood.detectors.base.Detector.config` (``{"type": kind, **values, "name"}``);
* ``search_space`` (the ``search`` candidates, the default always among them);
* ``finalize_only`` (every hyperparameter whose ``stage`` is not ``"fit"``);
* checkpoint compatibility (:meth:`~lightning_ood.detectors.base.Detector.stored_state_fits`):
  a stored config missing a hyperparameter means its default, and a stored detector whose
  values differ only in ``"score"``-stage hyperparameters keeps its fitted state.

``stage`` says where a value enters: ``"fit"`` — the training pass (:meth:`update`; a change
needs a new pass), ``"finalize"`` — only the derivation of the fitted buffers from the
accumulated statistics (a new ``finalize``; configurations differing only here share one
pass), ``"score"`` — only the score formula (fitted buffers are unaffected; the decision
threshold, and a layer ensemble's shipped combiner, which is fitted on the scores, are redone
at calibration: ``state.reconcile_detector_state`` resets the threshold, so the detector is
recalibrated before it ships). When in doubt, ``"finalize"``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

#: ``check(name, value, owner) -> normalised value`` or raises ``ValueError`` naming both.
Check = Callable[[str, Any, str], Any]
Stage = Literal["fit", "finalize", "score"]
STAGES: tuple[str, ...] = ("fit", "finalize", "score")


@dataclass(frozen=True)
class HParam:
    """One declared detector hyperparameter (see the module docstring).

    Args:
        default: the paper's value (mutable defaults are copied per instance).
        check: validator/normaliser, e.g. :func:`in_range`; None accepts anything.
        search: the validation search space (OpenOOD's sweep where it has one); the default
            is added when absent, so tuning can always keep the paper's value.
        stage: ``"fit"``, ``"finalize"`` or ``"score"``: where the value enters.
        doc: one line for the docs and ``--help``.
    """

    default: Any = None
    check: Check | None = None
    search: tuple[Any, ...] = ()
    stage: Stage = "fit"
    doc: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"HParam stage={self.stage!r} must be one of {list(STAGES)}")
        object.__setattr__(self, "search", tuple(self.search))

    @property
    def candidates(self) -> tuple[Any, ...]:
        """``search`` with the default first when it was not among them."""
        if not self.search:
            return ()
        return self.search if self.default in self.search else (self.default, *self.search)

    def value(self, name: str, given: Any, owner: str) -> Any:
        """``given`` (or a copy of the default when ``given`` is :data:`MISSING`), checked."""
        v = copy.deepcopy(self.default) if given is MISSING else given
        return v if self.check is None else self.check(name, v, owner)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Marks an argument that was not passed.
MISSING: Any = _Missing()


def _where(owner: str) -> str:
    return f"{owner}: " if owner else ""


def in_range(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> Check:
    """A finite float in the interval (``[low, high)`` by default)."""

    def check(name: str, value: Any, owner: str) -> float:
        from lightning_ood.detectors.base import check_range

        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ValueError(f"{_where(owner)}hyperparameter {name}={value!r} must be a number")
        return check_range(
            name, value, low=low, high=high, low_open=low_open, high_open=high_open, owner=owner
        )

    return check


def positive() -> Check:
    """A finite float > 0."""
    return in_range(0.0, low_open=True)


def percent(*, low_open: bool = True) -> Check:
    """A percentile in (0, 100] (``[0, 100]`` with ``low_open=False``)."""
    return in_range(0.0, 100.0, low_open=low_open, high_open=False)


def integer(low: int = 0) -> Check:
    """An integer >= ``low`` (bools refused)."""

    def check(name: str, value: Any, owner: str) -> int:
        from lightning_ood.detectors.base import check_int

        return check_int(name, value, low, owner)

    return check


def boolean() -> Check:
    """A real bool (``"false"`` is not False)."""

    def check(name: str, value: Any, owner: str) -> bool:
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"{_where(owner)}hyperparameter {name}={value!r} must be true/false")
        return bool(value)

    return check


def choice(*options: Any) -> Check:
    """One of ``options``."""

    def check(name: str, value: Any, owner: str) -> Any:
        if value not in options:
            raise ValueError(
                f"{_where(owner)}{name}={value!r} is not supported; choose one of {list(options)}"
            )
        return value

    return check


def optional(inner: Check) -> Check:
    """None, or a value ``inner`` accepts."""

    def check(name: str, value: Any, owner: str) -> Any:
        return None if value is None else inner(name, value, owner)

    return check


def names(*, allow_empty: bool = False) -> Check:
    """A list of distinct non-empty strings (tap names, checkpoint paths); a lone string is
    refused rather than read as a list of characters."""

    def check(name: str, value: Any, owner: str) -> list[str]:
        ok = (
            isinstance(value, Sequence)
            and not isinstance(value, str | bytes)
            and all(isinstance(v, str) and v for v in value)
            and (allow_empty or len(value) > 0)
        )
        if not ok:
            raise ValueError(
                f"{_where(owner)}{name} must be a list of names, got {value!r}"
                + ("" if allow_empty else " (at least one)")
            )
        if len(set(value)) != len(value):
            raise ValueError(f"{_where(owner)}{name} {list(value)} names an entry twice")
        return list(value)

    return check


def same_value(a: Any, b: Any) -> bool:
    """Config equality as stored in a checkpoint (lists and tuples alike, NaN equal to NaN)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


__all__ = [
    "MISSING",
    "STAGES",
    "Check",
    "HParam",
    "Stage",
    "boolean",
    "choice",
    "in_range",
    "integer",
    "names",
    "optional",
    "percent",
    "positive",
    "same_value",
]
