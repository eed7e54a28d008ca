"""Base class for post-hoc detectors: pure torch, fitted state in registered buffers.

Fitting is streamed: ``reset()``, then ``update(out, target)`` per training batch (sums only),
then ``finalize(model, reducer)`` which all-reduces the sums across DDP ranks and derives the
scoring buffers. ``score(out, ...)`` returns one float per sample, higher = more in-distribution.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, TypeAlias

import numpy as np
import torch
from torch import Tensor, nn

from lightning_ood.detectors.hparams import MISSING, HParam, same_value
from lightning_ood.models.base import BackboneOutput, OODBackbone

#: ``model`` and ``inputs`` of :meth:`Detector.score`: only input pre-processing reads them.
OptModel: TypeAlias = OODBackbone | None
OptInput: TypeAlias = Tensor | None


class InvalidConfiguration(ValueError):
    """A hyperparameter value this backbone or training set rules out, found at ``finalize``
    (ViM's ``dim`` >= the feature width, KNN's ``k`` > the bank), or before training by
    :meth:`Detector.check_data`: tuning skips such candidates and says why; a configured
    detector still fails with the message."""


class Reducer:
    """Cross-process reductions used by ``Detector.finalize``; the default is single-process.

    The Lightning callback passes a subclass backed by ``trainer.strategy`` under DDP.
    """

    def sum(self, t: Tensor) -> Tensor:
        """Element-wise sum of ``t`` over all ranks."""
        return t

    def cat(self, t: Tensor) -> Tensor:
        """Concatenate ``t`` (dim 0, sizes may differ per rank) over all ranks."""
        return t


class Detector(nn.Module):
    """A post-hoc OOD detector.

    Conventions:
    * hyperparameters are declared once, as :class:`~lightning_ood.detectors.hparams.HParam`
      class attributes; the constructor takes them as keyword arguments (plus ``name``),
      validates them and stores each as an attribute of the same name, and :meth:`config`,
      ``search_space``, ``finalize_only`` and the class's signature follow from the
      declarations (``__init_subclass__``). A subclass that needs buffers overrides
      ``__init__(self, **kwargs)``, calls ``super().__init__(**kwargs)`` first, then
      registers them (and checks constraints between hyperparameters);
    * fitted state lives in buffers; buffers whose shape depends on the backbone are created
      empty and resized on ``load_state_dict`` (see :meth:`_load_from_state_dict`);
    * ``fitted`` (a bool buffer) says whether :meth:`finalize` ran;
    * the detector owns its state: callers forget it with :meth:`mark_unfitted`, read the taps
      it needs with :meth:`tap_names`, and move a layer-ensemble combiner with
      :meth:`combiner_state` / :meth:`load_combiner_state`, never by writing buffers.
    """

    #: Registry key, e.g. "line"; also the default instance name.
    kind: ClassVar[str] = ""
    #: Whether a pass over the training set is needed before scoring.
    requires_fit: ClassVar[bool] = False
    #: Whether fitting reads training batches (FSSD only needs the model: False).
    uses_training_data: ClassVar[bool] = True
    #: Whether :meth:`update` needs the training batch's inputs too (``inputs=``; AdaSCALE
    #: perturbs them): the engine passes them from an eval pass and refuses cached features.
    fit_needs_inputs: ClassVar[bool] = False
    #: Whether :meth:`score` needs ``model`` and ``inputs`` (gradient-based input processing).
    needs_input_grad: ClassVar[bool] = False
    #: Whether ``torch.export`` can trace :meth:`score` (MC Dropout's seeded random passes
    #: cannot); the predictor refuses to export the others, by name.
    exportable: ClassVar[bool] = True
    #: Validation search space for tuning (OpenOOD's protocol): hyperparameter -> candidate
    #: values, e.g. ``{"percentile": (85, 90, 95, 99)}``, derived from the ``search`` of the
    #: HParams (the default always among the candidates). ``tune:`` in the OOD callback and
    #: the grid select from it on held-out validation data; ``{}``: nothing to tune.
    search_space: ClassVar[Mapping[str, Sequence[Any]]] = {}
    #: Hyperparameters that only enter :meth:`finalize`/:meth:`score` (and the combiner),
    #: never :meth:`update` (derived: every HParam whose ``stage`` is not ``"fit"``):
    #: configurations that differ only in these can share one accumulation pass over the
    #: training features (deep-copy the accumulated detector, set these attributes, then
    #: ``finalize`` each copy; the grid does). Detectors without a training pass declare them
    #: for the record (nothing is shared: they accumulate nothing).
    finalize_only: ClassVar[frozenset[str]] = frozenset()

    #: The declared hyperparameters by name, in declaration order (bases first); derived.
    hparams: ClassVar[Mapping[str, HParam]] = MappingProxyType({})
    #: Hyperparameters stored under another attribute, because the class reads their name as
    #: a property of its own: the layer ensembles' ``taps`` (the configured list, ``None`` for
    #: the default) is kept as ``_taps_arg`` while the ``taps`` property gives the taps
    #: actually read. A subclass may define such a property without dropping the declaration.
    #: :meth:`hparam_value` reads either kind.
    hparam_attrs: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Derive ``hparams``, ``search_space``, ``finalize_only`` and ``__signature__`` from
        the :class:`HParam` attributes of the class and its bases."""
        super().__init_subclass__(**kwargs)
        declared: dict[str, HParam] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                if isinstance(value, HParam):
                    declared[attr] = value
                elif attr in declared and attr not in cls.hparam_attrs:
                    del declared[attr]  # a subclass replaced the declaration (a property)
        if "name" in declared:
            raise TypeError(f"{cls.__name__}: 'name' is reserved for the instance name")
        if "needs_validation" in vars(cls):  # a plugin written against the old name
            warnings.warn(
                f"{cls.__name__}.needs_validation is deprecated; declare has_combiner instead",
                DeprecationWarning,
                stacklevel=2,
            )
            cls.has_combiner = bool(vars(cls)["needs_validation"])
            del cls.needs_validation  # the base's property answers (with its warning)
        stray = sorted(set(cls.hparam_attrs) - set(declared))
        if stray:
            raise TypeError(
                f"{cls.__name__}.hparam_attrs names {stray}, which are not declared HParams"
            )
        for derived in ("search_space", "finalize_only"):
            if derived in vars(cls):
                raise TypeError(
                    f"{cls.__name__} declares {derived} by hand; it follows from the HParam "
                    "declarations (search=..., stage=...)"
                )
        cls.hparams = MappingProxyType(declared)
        cls.search_space = MappingProxyType(
            {n: p.candidates for n, p in declared.items() if p.search}
        )
        cls.finalize_only = frozenset(n for n, p in declared.items() if p.stage != "fit")
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=p.default)
            for n, p in declared.items()
        ]
        params.append(inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY, default=None))
        # the class's signature (``inspect.signature(cls)``, jsonargparse, IDEs): the
        # constructors themselves take ``**kwargs`` and are shared with the bases
        cls.__signature__ = inspect.Signature(params[1:])  # type: ignore[attr-defined]

    def __init__(self, name: str | None = None, **hparams: Any) -> None:
        super().__init__()
        owner = type(self).__name__
        unknown = sorted(set(hparams) - set(self.hparams))
        if unknown:
            raise TypeError(
                f"{owner} ({self.kind!r}) got unknown hyperparameter(s) {unknown}; it takes "
                f"{[*self.hparams, 'name']}"
            )
        for key, decl in self.hparams.items():
            value = decl.value(key, hparams.get(key, MISSING), owner)
            setattr(self, self.hparam_attrs.get(key, key), value)
        self.name = name or self.kind
        self.register_buffer("fitted", torch.tensor(not self.requires_fit))
        # Decision threshold: scores below it are called OOD. NaN until calibrate().
        self.register_buffer("threshold", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("threshold_tpr", torch.tensor(float("nan"), dtype=torch.float64))

    # -- configuration -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Hyperparameters as ``{"type": kind, **values, "name": name}``; ``build_detector``
        inverts it. Values are copies (a caller editing the dict changes nothing here)."""
        values = {n: copy.deepcopy(self.hparam_value(n)) for n in self.hparams}
        return {"type": self.kind, **values, "name": self.name}

    def hparam_value(self, name: str) -> Any:
        """The value of the declared hyperparameter ``name`` (under :attr:`hparam_attrs`'s
        attribute where the name is a property)."""
        if name not in self.hparams:
            raise KeyError(
                f"{type(self).__name__} ({self.kind!r}) has no hyperparameter {name!r}; it "
                f"declares {list(self.hparams)}"
            )
        return getattr(self, self.hparam_attrs.get(name, name))

    def stored_state_fits(self, stored: Any) -> tuple[bool, str]:
        """Whether fitted state stored with config ``stored`` is this detector's fitted state.

        Compared by what the state depends on, not by the dict: a hyperparameter the stored
        config lacks (declared after the checkpoint was written) means its default, so adding
        a hyperparameter never refits old checkpoints; values that differ only in
        ``stage="score"`` hyperparameters keep the state (the threshold is recalibrated).
        Returns ``(fits, reason)``; ``reason`` names what differs ("" when identical).
        """
        if not isinstance(stored, Mapping) or stored.get("type", self.kind) != self.kind:
            kind = stored.get("type") if isinstance(stored, Mapping) else stored
            return False, f"stored as {kind!r}, configured as {self.kind!r}"
        unknown = sorted(set(stored) - {*self.hparams, "type", "name"})
        if unknown:
            return False, f"stored with hyperparameters {unknown} that {self.kind!r} lacks"
        differ = [
            n
            for n, p in self.hparams.items()
            if not same_value(stored.get(n, p.default), self.hparam_value(n))
        ]
        refit = [n for n in differ if self.hparams[n].stage != "score"]
        if refit:
            what = ", ".join(
                f"{n}: {stored.get(n, self.hparams[n].default)!r} -> {self.hparam_value(n)!r}"
                for n in refit
            )
            return False, f"fitted with other values ({what})"
        if differ:
            return True, f"score-time values changed ({', '.join(differ)}); recalibrating"
        return True, ""

    @property
    def taps(self) -> tuple[str, ...]:
        """Taps (beyond features/logits) that :meth:`update`/:meth:`score` read."""
        return ()

    def tap_names(self, backbone: OODBackbone) -> tuple[str, ...]:
        """The taps this detector reads from ``backbone`` when fitting and scoring, with
        defaults resolved against it (may include ``"features"``/``"logits"``)."""
        return tuple(self.taps)

    @property
    def needs_inputs(self) -> bool:
        """Whether :meth:`score` reads ``model`` and ``inputs`` (input gradients, extra
        stochastic or ensemble forwards), so cached features cannot score it."""
        return bool(self.needs_input_grad)

    @property
    def is_fitted(self) -> bool:
        return self.flag("fitted")

    def flag(self, name: str) -> bool:
        """Python value of a 0-d bool buffer. While :func:`frozen_flags` is active (during
        ``torch.export``, where buffers are symbolic) the value recorded on entry."""
        frozen = self.__dict__.get("_frozen_flags")
        if frozen is not None and name in frozen:
            return frozen[name]
        return bool(getattr(self, name))

    def int_list(self, name: str) -> list[int]:
        """Python list of a small 1-d integer buffer (sizes); frozen like :meth:`flag`."""
        frozen = self.__dict__.get("_frozen_flags")
        if frozen is not None and name in frozen:
            return frozen[name]
        return [int(v) for v in getattr(self, name).tolist()]

    # -- what the training data allows ---------------------------------------------------
    def check_data(self, num_train: int) -> None:
        """Refuse, before any training, a configuration that fitting on ``num_train`` training
        samples would reject only at the end of ``fit`` (KNN/NNGuide's ``k`` above their bank
        size). Raises :class:`InvalidConfiguration` naming the detector, the parameter, the
        values and the fix. The OOD callback calls it at ``setup("fit")``. Default: any size.
        """

    def check_backbone(self, model: OODBackbone) -> None:
        """Refuse, before any pass, a backbone this detector cannot run on at all (MC Dropout
        on a network without dropout layers), so a run stops in seconds instead of after its
        training pass. The evaluation session calls it first. Default: any backbone."""

    # -- fitting -------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero the accumulators before a fitting pass."""

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Accumulate sufficient statistics from one eval-mode training batch.

        ``out`` comes from ``model.extract(x, taps=self.taps)`` under ``torch.no_grad``; the
        model is passed for detectors that need more (LINe's autograd oracle).
        """

    #: Whether the detector is fitted (also) on labelled held-out ID validation outputs
    #: (temperature scaling's T by NLL): the engine calls :meth:`fit_validation` once with the
    #: whole ID validation split, after :meth:`finalize` and before calibration.
    uses_validation_data: ClassVar[bool] = False

    def fit_validation(
        self, out: BackboneOutput, target: Tensor, reducer: Reducer | None = None
    ) -> None:
        """Fit on the ID validation split's outputs (all of them, this rank's rows; reduce
        across ranks with ``reducer``) and labels. Only called when
        :attr:`uses_validation_data`."""
        raise NotImplementedError(f"{type(self).__name__} does not fit on validation data")

    def next_pass(self, reducer: Reducer) -> bool:
        """Called by the engine after each pass of :meth:`update` over the training data,
        before :meth:`finalize`: True asks for one more pass over the *same* batches (an exact
        percentile of more values than fit in memory takes two). Reduce across ranks here, so
        every rank answers alike. Default: one pass is enough."""
        return False

    # -- optional supervised combiner (FSSD / Mahalanobis layer ensembles) ------------------
    #: Whether ``score`` combines several components (:meth:`score_components`) with weights
    #: that :meth:`fit_combiner` fits: on ID validation plus validation OOD data for the shipped
    #: detector, on parts of each test set for the papers' ``[per-set]`` rows.
    has_combiner: ClassVar[bool] = False

    @property
    def needs_validation(self) -> bool:
        """Deprecated name of :attr:`has_combiner` (it never meant "needs validation data")."""
        warnings.warn(
            "Detector.needs_validation is deprecated; read has_combiner instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.has_combiner

    def component_names(self, backbone: OODBackbone) -> tuple[str, ...]:
        """One name per column of :meth:`score_components` (K of them): the taps by default;
        an ensemble over several networks names each (network, tap) pair."""
        return self.tap_names(backbone)

    def score_components(
        self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None
    ) -> Tensor:
        """Per-component scores, shape (B, K) (e.g. one FSSD per layer)."""
        raise NotImplementedError

    def fit_combiner(self, components_id: Tensor, components_ood: Tensor) -> None:
        """Fit the combiner (logistic regression) on validation components."""
        raise NotImplementedError

    def combine(self, components: Tensor) -> Tensor:
        """Map (B, K) components to (B,) scores with the fitted combiner."""
        raise NotImplementedError

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Reduce the accumulators across ranks and derive the scoring buffers."""
        self.fitted.fill_(True)

    def mark_unfitted(self) -> None:
        """Forget the fitted state: ``fitted`` becomes ``not requires_fit`` (detectors without
        a fitting pass stay usable) and the decision threshold NaN (uncalibrated)."""
        self.fitted.fill_(not self.requires_fit)
        self.threshold.fill_(math.nan)
        self.threshold_tpr.fill_(math.nan)

    def combiner_state(self) -> dict[str, Tensor]:
        """Clones of the fitted combiner buffers by name; ``{}`` without a combiner."""
        return {}

    def load_combiner_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore a :meth:`combiner_state` dict; ``{}`` is the only state without a combiner."""
        if state:
            raise ValueError(
                f"{self.name}: {type(self).__name__} has no combiner, cannot load {sorted(state)}"
            )

    # -- scoring -------------------------------------------------------------------------
    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        """Score a batch; higher = more in-distribution. Shape (B,)."""
        return self.combine(self.score_components(out, model, inputs))

    # -- decisions -----------------------------------------------------------------------
    def calibrate(self, id_scores: Tensor, tpr: float = 0.95) -> float:
        """Set :attr:`threshold` so that a fraction ``tpr`` of ``id_scores`` (held-out ID
        samples) is at or above it, i.e. called in-distribution: the 95 % TPR operating point
        of FPR95 (ID positive). Returns the threshold.
        """
        check_range(
            "tpr", tpr, low=0.0, high=1.0, low_open=True, high_open=False, owner="calibrate"
        )
        s = id_scores.detach().flatten().double()
        if s.numel() == 0:
            raise ValueError(f"{self.name}: calibrate() needs held-out ID scores, got none")
        if not torch.isfinite(s).all():
            bad = int((~torch.isfinite(s)).sum())
            raise ValueError(
                f"{self.name}: {bad} of {s.numel()} calibration scores are NaN/inf; the detector "
                "cannot be given a decision threshold"
            )
        s, _ = torch.sort(s)
        # The k-th smallest with k = floor((1 - tpr) n): at least ceil(tpr n) scores are >= it.
        k = min(math.floor((1.0 - tpr) * s.numel() + 1e-9), s.numel() - 1)
        self.threshold.fill_(float(s[k]))
        self.threshold_tpr.fill_(tpr)
        return float(s[k])

    @property
    def is_calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(
                f"detector {self.name!r} ({type(self).__name__}) is not fitted: run a fitting "
                "pass (reset/update/finalize) or load a checkpoint that holds its state."
            )

    # -- checkpoint plumbing ---------------------------------------------------------------
    def _upgrade_state_dict(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Rewrite, in place, the entries an older checkpoint holds for this detector into the
        current layout, before they are loaded."""
        # Checkpoints written before decision thresholds existed load as uncalibrated.
        for name in ("threshold", "threshold_tpr"):
            if prefix + name not in state_dict:
                state_dict[prefix + name] = torch.tensor(float("nan"), dtype=torch.float64)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self._upgrade_state_dict(state_dict, prefix)
        # Buffers are created lazily with backbone-dependent shapes; adopt the stored shape.
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


@contextlib.contextmanager
def frozen_flags(detectors: Iterable[Detector]) -> Iterator[None]:
    """Record every 0-d bool buffer (fitted flags) and small 1-d integer buffer (sizes) of
    ``detectors`` as Python values for the duration, so that tracing (``torch.export``) sees
    them as constants, not data."""
    dets = list(detectors)
    for det in dets:
        frozen: dict[str, Any] = {}
        for n, b in det.named_buffers():
            if b.dtype == torch.bool and b.dim() == 0:
                frozen[n] = bool(b)
            elif b.dtype == torch.long and b.dim() == 1 and b.numel() <= 4096:
                frozen[n] = [int(v) for v in b.tolist()]
        det.__dict__["_frozen_flags"] = frozen
    try:
        yield
    finally:
        for det in dets:
            det.__dict__.pop("_frozen_flags", None)


class BatchMemo:
    """The last value computed from one batch, so that detectors scored or fitted on the same
    batch (``mcd`` and ``mcd_var``; ODIN candidates that differ only in ε; Mahalanobis and RMDS)
    compute it once.

    A hit needs the same batch tensor object, unchanged since (its version counter), the same
    ``owners`` (e.g. the model; by identity) and an equal ``key``. The tensor and owners are
    held by weak references, so a freed batch is never mistaken for a new one at its address,
    and the value is dropped as soon as the batch is freed. Inference tensors have no version
    counter: they are never memoised.
    """

    def __init__(self) -> None:
        self._entry: tuple[Any, ...] | None = None

    def get(
        self, batch: Tensor, key: Any, compute: Callable[[], Any], owners: Sequence[Any] = ()
    ) -> Any:
        if batch.is_inference():
            return compute()
        e = self._entry
        if (
            e is not None
            and e[0]() is batch
            and e[1] == batch._version
            and e[2] == key
            and len(e[3]) == len(owners)
            and all(r() is o for r, o in zip(e[3], owners, strict=True))
        ):
            return e[4]
        value = compute()
        ref = weakref.ref(batch, self._forget)
        self._entry = (ref, batch._version, key, [weakref.ref(o) for o in owners], value)
        return value

    def _forget(self, ref: weakref.ref) -> None:
        if self._entry is not None and self._entry[0] is ref:
            self._entry = None

    @property
    def empty(self) -> bool:
        return self._entry is None


def exporting() -> bool:
    """Whether the code runs under ``torch.export``/``torch.compile`` tracing."""
    return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling())


def percentile(x: Tensor, p: float, dim: int = -1) -> Tensor:
    """``numpy.percentile(x, p, axis=dim)`` with linear interpolation, any tensor size.

    ``torch.quantile`` refuses inputs above 2**24 elements, which an ImageNet head
    (1000 x 2048) per class reaches; sorting works at any size.
    """
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile p must be in [0, 100], got {p}")
    s, _ = torch.sort(x, dim=dim)
    n = s.shape[dim]
    pos = (n - 1) * p / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    frac = pos - lo
    a = s.narrow(dim, lo, 1).squeeze(dim)
    b = s.narrow(dim, hi, 1).squeeze(dim)
    return a + (b - a) * frac


def truthy(name: str, value: Any, owner: str) -> bool:
    """An HParam check that reads any value as a truth value: the switches that always took
    ``bool(value)`` (LINe's ``clip``, the layer ensembles' ``standardize``, ``store_bank``)
    keep accepting what they did; new hyperparameters use the strict
    :func:`~lightning_ood.detectors.hparams.boolean`."""
    return bool(value)


def check_choice(name: str, value: str, options: Sequence[str], owner: str) -> str:
    """Validate an option string, naming the parameter and the allowed values."""
    if value not in options:
        raise ValueError(
            f"{owner}: {name}={value!r} is not supported; choose one of {list(options)}"
        )
    return value


def check_int(name: str, value: int, low: int, owner: str) -> int:
    """Validate an integer hyperparameter ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{owner}: hyperparameter {name}={value!r} must be an integer >= {low}")
    check_range(name, value, low=low, owner=owner)
    return int(value)


def check_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = True,
    owner: str = "",
) -> float:
    """Validate a hyperparameter, naming it and the allowed interval in the error."""
    v = float(value)
    ok = math.isfinite(v)
    if low is not None:
        ok = ok and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        interval = f"{lb}{'-inf' if low is None else low}, {'inf' if high is None else high}{rb}"
        where = f"{owner}: " if owner else ""
        raise ValueError(
            f"{where}hyperparameter {name}={value!r} is out of range; it must lie in {interval}"
        )
    return v
