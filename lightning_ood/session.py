"""One evaluation session, without Lightning: fit → tune → calibrate → score → protocol → report.

The OOD callback (``lightning-ood test``), ``lightning-ood grid`` and the benchmarks all run
this one sequence; they differ only in where the data comes from and how ranks meet:

* a :class:`Source` per data set: :class:`LoaderSource` (images through the network, one
  eval pass for every detector) or :class:`CachedSource` (stored backbone outputs,
  :mod:`lightning_ood.features`); both yield the same ``(inputs, BackboneOutput)`` batches;
* :class:`Sets` names them: training set, ID validation, validation OOD sets (selection and
  shipped combiners only, never reported) and the reported test sets (ID first);
* the caller supplies the cross-rank pieces: a :class:`~lightning_ood.detectors.base.Reducer`
  for fitting sums and a ``gather`` per :class:`LoaderSource` that puts per-sample rows of all
  ranks back in dataset order (identity on one process);
* one frozen :class:`~lightning_ood.protocol.Protocol` (selection metric, seeds, fractions,
  hold-outs, TPR) decides every choice, whatever the entry point.

Every step is :mod:`lightning_ood.engine` (fitting, scoring, shipped combiners, thresholds),
:mod:`lightning_ood.tuning` (selection) and :mod:`lightning_ood.protocol` (metrics); the
paper analyses (:mod:`lightning_ood.analyses`) join the results when their detectors are
there. Pure torch: no Lightning import.

Example (cached features; ``LoaderSource(loader, backbone)`` reads images instead)::

    from lightning_ood import tuning
    from lightning_ood.protocol import Protocol
    from lightning_ood.session import CachedSource, EvaluationSession, Sets

    session = EvaluationSession(backbone, Protocol(select="auroc", per_set_holdout=0))
    sets = Sets(
        train=CachedSource(train_feats),
        id_val=CachedSource(val_feats),
        val_ood={"kmnist": CachedSource(kmnist_feats)},
        test={"fashionmnist": CachedSource(id_feats), "mnist": CachedSource(mnist_feats)},
    )
    search = tuning.plan("line", "line", {"p_a": [80, 90]}, {"delta": 1.0})
    outcome = session.run({"energy": Energy()}, sets, searches=[search])
    outcome.results["metrics"]["line"]["mnist"]["auroc"]  # the selected LINe, as it ships
    session.write("results/", outcome)  # ood_results.{md,json,csv}, figures, analyses
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_ood import engine, report, tuning
from lightning_ood.analyses import fssd as fssd_analyses
from lightning_ood.analyses import line as line_analyses
from lightning_ood.detectors.base import Detector, InvalidConfiguration, Reducer
from lightning_ood.metrics import CCR_CONVENTIONS, CCR_FPRS
from lightning_ood.models.base import BackboneOutput, OODBackbone
from lightning_ood.protocol import (
    CCR_METHOD,
    CONVENTION,
    Evaluation,
    Protocol,
    evaluate_detectors,
)

#: Puts one rank's per-sample rows together with every other rank's, in dataset order.
Gather = Callable[[Tensor], Tensor]
#: A batch as scoring reads it: the inputs (None for cached features) and the outputs.
Batch = tuple[Tensor | None, BackboneOutput]


#: Why a detector fitted on validation data is refused without a labelled ID validation split.
NO_VALIDATION_SPLIT = (
    "detectors {names} are fitted on the labelled ID validation split "
    "(Detector.uses_validation_data), but there is none: set `data.val_size > 0` (a held-out "
    "split of the training images; with val_size 0 the only ID data at test time is the "
    "reported test set), or give the session Sets.id_val; or configure them without it (e.g. "
    "temperature_scaling with a fixed `temperature`, gram with another `normalizer`)"
)


def _same(t: Tensor) -> Tensor:
    return t


# -- sources -------------------------------------------------------------------------------------
class Source:
    """One data set as the session reads it (subclasses say from where)."""

    #: Whether scoring it again is cheap (features at hand): selection then scores candidates
    #: one at a time (bounded memory) instead of all in one pass.
    cached: bool = False
    #: Applied to every per-sample tensor scored from this source (cross-rank order).
    gather: Gather = staticmethod(_same)

    def batches(
        self, taps: Sequence[str], device: torch.device, *, desc: str = "scoring"
    ) -> Iterator[Batch]:
        """``(inputs or None, outputs)`` per batch, serving ``taps``."""
        raise NotImplementedError

    def with_targets(
        self, taps: Sequence[str], device: torch.device, *, desc: str = "scoring"
    ) -> Iterator[tuple[Tensor | None, Tensor | None, BackboneOutput]]:
        """``(inputs or None, targets or None, outputs)`` per batch: the labels beside the
        outputs (fitting on the ID validation split, CCR's correctly classified ID samples)."""
        raise NotImplementedError

    def training(self, detectors: Sequence[Detector], device: torch.device) -> engine.OutputSource:
        """The ``(outputs, targets)`` stream that fits ``detectors``, restartable."""
        raise NotImplementedError

    def features(self) -> Tensor | None:
        """Penultimate features of every sample when stored (analyses), else None."""
        return None


class LoaderSource(Source):
    """Images read through the network: one :func:`lightning_ood.engine.eval_pass` per use.

    Args:
        loader: an iterable of ``(inputs, targets)`` batches (a DataLoader, FGSM batches), or a
            zero-argument callable that builds it when first needed.
        backbone: the network.
        gather: this rank's rows -> every rank's, in dataset order (DDP); identity otherwise.
        progress: progress bars on the passes.
    """

    def __init__(
        self,
        loader: Iterable[Any] | Callable[[], Iterable[Any]],
        backbone: OODBackbone,
        *,
        gather: Gather | None = None,
        progress: bool = False,
    ) -> None:
        self._loader = loader
        self.backbone = backbone
        self.gather = gather or _same  # type: ignore[assignment]
        self.progress = progress

    @property
    def loader(self) -> Iterable[Any]:
        if callable(self._loader) and not hasattr(self._loader, "__iter__"):
            self._loader = self._loader()
        return self._loader  # type: ignore[return-value]

    def batches(
        self, taps: Sequence[str], device: torch.device, *, desc: str = "scoring"
    ) -> Iterator[Batch]:
        passes = engine.eval_pass(
            self.backbone, self.loader, taps, progress=self.progress, desc=desc
        )
        for x, _, out in passes:
            yield x, out

    def with_targets(
        self, taps: Sequence[str], device: torch.device, *, desc: str = "scoring"
    ) -> Iterator[tuple[Tensor | None, Tensor | None, BackboneOutput]]:
        yield from engine.eval_pass(
            self.backbone, self.loader, taps, progress=self.progress, desc=desc
        )

    def training(self, detectors: Sequence[Detector], device: torch.device) -> engine.OutputSource:
        return engine.loader_source(self.backbone, self.loader, detectors, progress=self.progress)


class CachedSource(Source):
    """Stored backbone outputs (:class:`~lightning_ood.features.CachedFeatures` or
    :class:`~lightning_ood.features.ShardedFeatures`): no network pass, no inputs, so detectors
    that need input gradients are refused by name."""

    cached = True

    def __init__(self, cached: Any, batch_size: int = 4096) -> None:
        self.data = cached
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.data)

    def batches(
        self, taps: Sequence[str], device: torch.device, *, desc: str = "scoring"
    ) -> Iterator[Batch]:
        for _, _, out in self.with_targets(taps, device, desc=desc):
            yield None, out

    def with_targets(
        self, taps: Sequence[str], device: torch.device, *, desc: str = "scoring"
    ) -> Iterator[tuple[Tensor | None, Tensor | None, BackboneOutput]]:
        """Stored targets are -1 where the extracting loader yielded none."""
        stored = getattr(self.data, "taps", None)
        missing = [t for t in taps if isinstance(stored, Mapping) and t not in stored]
        if missing:
            raise ValueError(
                f"the cached features of {desc!r} lack taps {missing} (stored: "
                f"{sorted(stored or {})}); extract them with these taps"
            )
        for out, y in self.data.as_batches(self.batch_size, device):
            yield None, y, out

    def training(self, detectors: Sequence[Detector], device: torch.device) -> engine.OutputSource:
        return lambda: self.data.as_batches(self.batch_size, device)

    def features(self) -> Tensor | None:
        return getattr(self.data, "features", None)


@dataclass
class Sets:
    """The data sets of one session.

    Attributes:
        train: the training set (eval transform), read by detectors that fit on it.
        id_val: held-out ID data: selection, shipped combiners and thresholds.
        val_ood: validation OOD sets (selection and shipped combiners; never reported).
        test: reported sets, ID first (may stay empty when the caller scores them itself,
            as the callback does in Lightning's test loop).
        proxy: builds FGSM proxy outliers from ``id_val`` for the shipped combiners when there
            is no validation OOD set (image inputs only; None: the ID-only fallback).
        id_val_note: how ``id_val`` was drawn, for the results (e.g. "held-out training images
            (data.val_size)").
        groups: ``{reported OOD set: group}`` (the datamodule's ``groups()``): each detector
            gets an ``average[group]`` row per group beside ``average``.
        skipped_ood_sets: ``{OOD set: why}`` of declared sets left out (``missing: skip``),
            named in the results.
    """

    train: Source | None = None
    id_val: Source | None = None
    val_ood: Mapping[str, Source] = field(default_factory=dict)
    test: Mapping[str, Source] = field(default_factory=dict)
    proxy: Callable[[], Source] | None = None
    id_val_note: str = "ID validation set"
    groups: Mapping[str, str] = field(default_factory=dict)
    skipped_ood_sets: Mapping[str, str] = field(default_factory=dict)


# -- scoring -------------------------------------------------------------------------------------
class ScoreBank:
    """Per detector and set, the scores of the reported sets (layer ensembles: their (N, K)
    components), the ID set's predictions and labels (CCR@FPR) and, when asked, the
    activated-neuron counts of LINe Figure 1. The callback fills it per test batch of
    Lightning's loop; :meth:`EvaluationSession.score` from sources.
    """

    def __init__(
        self,
        detectors: Mapping[str, Detector],
        backbone: OODBackbone,
        set_names: Sequence[str],
        neuron_thresholds: Sequence[float] | None = None,
    ) -> None:
        self.detectors = dict(detectors)
        self.backbone = backbone
        self.set_names = list(set_names)
        self.neuron_thresholds = None if neuron_thresholds is None else list(neuron_thresholds)
        self._scores: dict[str, list[list[Tensor]]] = {
            n: [[] for _ in self.set_names] for n in self.detectors
        }
        self._counts: list[list[Tensor]] = [[] for _ in self.set_names]
        self._pred: list[Tensor] = []
        self._target: list[Tensor] = []

    def add(
        self,
        index: int,
        out: BackboneOutput,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> None:
        """Score one batch of set ``index`` with every detector (one shared forward pass); for
        the ID set (index 0) also keep each sample's prediction (``argmax`` of the logits, the
        ``pred`` the shipped predictor returns) and label (-1 where ``targets`` is None)."""
        scores = engine.score_batch(self.detectors, out, self.backbone, inputs, components=True)
        for name, s in scores.items():
            self._scores[name][index].append(s.detach().to("cpu", torch.float64))
        if self.neuron_thresholds is not None:
            self._counts[index].append(line_analyses.counts(out.features, self.neuron_thresholds))
        if index == 0:
            pred = out.logits.detach().argmax(dim=-1).to("cpu", torch.long)
            self._pred.append(pred)
            y = torch.full_like(pred, -1) if targets is None else targets.detach().reshape(-1)
            self._target.append(y.to("cpu", torch.long))

    def correct_id(self, gather: Gather | Sequence[Gather] = _same) -> Tensor | None:
        """(N_ID,) bool: prediction == label of every ID sample in dataset order (gathered
        like the scores); None when a sample has no label (cached features without targets,
        a loader of inputs only): CCR@FPR is then left out, never faked."""
        g = self._gathers(gather)[0]
        pred = g(torch.cat(self._pred) if self._pred else torch.empty(0, dtype=torch.long)).cpu()
        y = g(torch.cat(self._target) if self._target else torch.empty(0, dtype=torch.long)).cpu()
        if pred.shape != y.shape or bool((y < 0).any()):
            return None
        return pred == y

    def banks(self, gather: Gather | Sequence[Gather] = _same) -> dict[str, list[Tensor]]:
        """``{detector: [scores of set 0, set 1, ...]}``, each gathered in dataset order (a
        rank that saw no batch of a tiny set contributes an empty tensor of the right shape).
        ``gather``: one for all sets or one per set."""
        gathers = self._gathers(gather)
        out: dict[str, list[Tensor]] = {}
        for name, det in self.detectors.items():
            tail = (len(det.component_names(self.backbone)),) if det.has_combiner else ()
            out[name] = [
                g(torch.cat(c) if c else torch.empty(0, *tail, dtype=torch.float64)).cpu()
                for g, c in zip(gathers, self._scores[name], strict=True)
            ]
        return out

    def neuron_counts(self, gather: Gather | Sequence[Gather] = _same) -> dict[str, Tensor]:
        """``{set: (N, T) counts}`` in dataset order; ``{}`` when none were asked for."""
        if self.neuron_thresholds is None:
            return {}
        k = len(self.neuron_thresholds)
        return {
            n: g(torch.cat(c) if c else torch.empty(0, k, dtype=torch.long)).cpu()
            for n, g, c in zip(self.set_names, self._gathers(gather), self._counts, strict=True)
        }

    def _gathers(self, gather: Gather | Sequence[Gather]) -> list[Gather]:
        if callable(gather):
            return [gather] * len(self.set_names)
        return list(gather)


def ccr_record(computed: bool) -> dict[str, Any]:
    """How the results' CCR@FPR keys were read (``method``, rates, one line per key), or why
    there are none: the ID test set's labels were not at hand."""
    if not computed:
        return {
            "omitted": "the ID test set has no labels here (cached features extracted without "
            "targets, or a loader of inputs only), so no sample can be called correctly "
            "classified; CCR@FPR is left out, not estimated"
        }
    return {"method": CCR_METHOD, "fprs": list(CCR_FPRS), "conventions": dict(CCR_CONVENTIONS)}


def sharing_the_tuning_pass(
    detectors: Mapping[str, Detector], searched: Sequence[str], refit: bool = False
) -> list[Detector]:
    """The configured detectors that are not tuned but fitted anyway (no fitted state, or
    every one with ``refit``): they join the candidates' single training pass."""
    return [d for n, d in detectors.items() if n not in searched and (refit or not d.is_fitted)]


# -- results of the steps ------------------------------------------------------------------------
@dataclass
class Tuned:
    """What :meth:`EvaluationSession.tune` selected.

    Attributes:
        selected: the fitted, selected detector per search, named after it.
        others: detectors fitted in the same training pass (not tuned).
        records: per search, ``{kind, space, selected, val_mean, rows}`` (callback format) or
            ``{kind, space, skipped}``.
        rows: per search, the full selection rows (``params``, ``val``, ``val_mean``,
            ``combiner``) and ``best``: their index of the selected configuration.
        meta: the protocol of the selection and the validation sizes.
        fit_groups: training accumulations the candidates shared.
    """

    selected: dict[str, Detector] = field(default_factory=dict)
    others: list[Detector] = field(default_factory=list)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: dict[str, tuple[list[dict[str, Any]], int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    fit_groups: int = 0


@dataclass
class Outcome:
    """Everything one :meth:`EvaluationSession.run` produced."""

    detectors: dict[str, Detector]
    set_names: list[str]
    banks: dict[str, list[Tensor]]
    evaluation: Evaluation
    results: dict[str, Any]
    tuned: Tuned | None = None
    shipped: dict[str, dict[str, Any]] = field(default_factory=dict)
    neuron_counts: dict[str, Tensor] = field(default_factory=dict)
    neuron_thresholds: list[float] | None = None


# -- the session ---------------------------------------------------------------------------------
class EvaluationSession:
    """fit → tune → calibrate → score → protocol → report over :class:`Sets`.

    Args:
        backbone: the network (its device is where detectors fit and score).
        protocol: the shared protocol value (default: :class:`Protocol`'s defaults).
        reducer: cross-rank sums/concatenations for fitting (default: one process).
        warn: called with every warning (default: :func:`warnings.warn`).
        info: called with progress messages (default: dropped).
        progress: progress bars for the training passes.
    """

    def __init__(
        self,
        backbone: OODBackbone,
        protocol: Protocol | None = None,
        *,
        reducer: Reducer | None = None,
        warn: Callable[[str], None] | None = None,
        info: Callable[[str], None] | None = None,
        progress: bool = False,
    ) -> None:
        self.backbone = backbone
        self.protocol = protocol or Protocol()
        self.reducer = reducer or Reducer()
        self.warn = warn or (lambda msg: warnings.warn(f"[lightning_ood] {msg}", stacklevel=3))
        self.info = info or (lambda msg: None)
        self.progress = progress

    @property
    def device(self) -> torch.device:
        return engine.module_device(self.backbone)

    # -- scoring one set -------------------------------------------------------------------
    def score_set(
        self,
        detectors: Mapping[str, Detector],
        source: Source,
        *,
        components: bool = True,
        desc: str = "scoring",
    ) -> dict[str, Tensor]:
        """Every detector's scores of ``source`` (float64, CPU, gathered in dataset order):
        one pass for all of them; layer ensembles' components with ``components=True``."""
        taps = engine.detector_taps(detectors.values(), self.backbone)
        with engine.eval_mode(self.backbone):
            local = engine.score_stream(
                detectors,
                source.batches(taps, self.device, desc=desc),
                self.backbone,
                components=components,
            )
        return {n: source.gather(s).cpu() for n, s in local.items()}

    # -- fit -------------------------------------------------------------------------------
    def fit(
        self,
        detectors: Sequence[Detector],
        train: Source | None,
        *,
        id_val: Source | None = None,
        missing: str | None = None,
    ) -> None:
        """Fit ``detectors`` together from ONE pass over ``train`` (only if one reads it), then
        those that use validation data on ONE pass over the labelled ``id_val``
        (:meth:`fit_validation`).

        Raises:
            ValueError: a detector reads the training set and ``train`` is None (``missing``
                replaces the message: the caller knows where the set should come from), or
                one uses validation data and ``id_val`` is None.
        """
        dets = list(detectors)
        if not dets:
            return
        readers = [d for d in dets if engine.reads_training_data(d)]
        if readers and train is None:
            raise ValueError(
                missing
                or f"detectors {[d.name for d in readers]} are fitted on the training set; give "
                "the session a training source (Sets.train)"
            )
        self._check_validation_source(dets, id_val)
        for det in dets:
            det.to(self.device)
        outputs = None if not readers or train is None else train.training(readers, self.device)
        with engine.eval_mode(self.backbone):
            engine.fit_detectors(dets, self.backbone, outputs, self.reducer)
        self.fit_validation(dets, id_val)

    @staticmethod
    def _check_validation_source(detectors: Sequence[Detector], id_val: Source | None) -> None:
        """Refuse, before any pass, detectors that fit on validation data without any."""
        readers = engine.validation_readers(detectors)
        if readers and id_val is None:
            raise ValueError(
                NO_VALIDATION_SPLIT.format(names=[f"{d.name} ({d.kind})" for d in readers])
            )

    def fit_validation(
        self,
        detectors: Sequence[Detector],
        id_val: Source | None,
        *,
        invalid: dict[str, str] | None = None,
    ) -> list[Detector]:
        """``fit_validation`` of every detector of ``detectors`` that uses validation data
        (``Detector.uses_validation_data``), from ONE eval pass over the labelled ID
        validation source shared by all of them (their taps' union; rows of this rank, the
        detectors reduce through the session's reducer). After fitting, before tuning's
        metrics and calibration. Returns those detectors; ``invalid``: see
        :func:`lightning_ood.engine.fit_validation_detectors`.

        Raises:
            ValueError: there is no ID validation split, or it is unlabelled (cached features
                without targets); both name the detectors and the fix.
        """
        readers = engine.validation_readers(detectors)
        if not readers:
            return []
        self._check_validation_source(readers, id_val)
        assert id_val is not None
        taps = engine.detector_taps(readers, self.backbone)
        names = ", ".join(d.name for d in readers[:8])
        desc = f"Fitting on ID validation ({names})"

        def labelled() -> engine.Outputs:
            for x, y, out in id_val.with_targets(taps, self.device, desc=desc):
                if y is None:
                    raise ValueError(
                        f"detectors {[d.name for d in readers]} are fitted on the LABELLED ID "
                        "validation split, but its loader yields inputs only (shape "
                        f"{None if x is None else tuple(x.shape)}); give (inputs, targets) "
                        "batches"
                    )
                yield out, y

        for det in readers:
            det.to(self.device)
        with engine.eval_mode(self.backbone):
            return engine.fit_validation_detectors(
                readers, self.backbone, labelled(), self.reducer, invalid=invalid
            )

    # -- tune ------------------------------------------------------------------------------
    def validate(
        self, candidates: Sequence[Detector], sets: Sets, *, one_at_a_time: bool | None = None
    ) -> dict[str, dict[str, dict[str, float]]]:
        """Validation metrics per candidate and validation OOD set (the protocol's selection
        data: ``sets.id_val`` against ``sets.val_ood``; a layer ensemble's combiner fitted on
        the seeded ``combiner_fraction`` of each set first, :class:`tuning.Validation`)."""
        metrics, prime, _ = self._validation(sets, one_at_a_time)
        prime(candidates)
        return metrics(candidates)

    def _validation(
        self, sets: Sets, one_at_a_time: bool | None = None
    ) -> tuple[
        Callable[[Sequence[Detector]], dict[str, Any]],
        Callable[[Sequence[Detector]], None],
        dict[str, int],
    ]:
        """``(metrics, prime, sizes)``: ``metrics(candidates)``; ``prime(candidates)`` scores
        them all in one pass per set (loader sources), later ``metrics`` calls read that; the
        validation set sizes, filled as sets are scored."""
        if sets.id_val is None or not sets.val_ood:
            raise ValueError(
                "selection needs held-out ID validation data and at least one validation OOD "
                "set, never reported (Sets.id_val, Sets.val_ood)"
            )
        sources = {tuning.ID_KEY: sets.id_val, **sets.val_ood}
        each = all(s.cached for s in sources.values()) if one_at_a_time is None else one_at_a_time
        memo: dict[bool, dict[str, dict[str, Tensor]]] = {}
        sizes: dict[str, int] = {}

        def score(chosen: Mapping[str, Detector], components: bool) -> dict[str, Any]:
            known = memo.get(components, {})
            if each or not known or not set(chosen) <= set(next(iter(known.values()))):
                memo[components] = {
                    k: self.score_set(chosen, src, components=components, desc=f"tune {k}")
                    for k, src in sources.items()
                }
                sizes.update(
                    {k: len(next(iter(v.values()))) for k, v in memo[components].items() if v}
                )
            return {k: {n: v[n] for n in chosen} for k, v in memo[components].items()}

        validation = tuning.Validation(
            score,
            tuning.ID_KEY,
            self.backbone,
            seed=self.protocol.seed,
            combiner_fraction=self.protocol.combiner_fraction,
        )

        def prime(cands: Sequence[Detector]) -> None:
            if each:
                return
            for flag in (False, True):
                group = {c.name: c for c in cands if tuning.combines(c, self.backbone) == flag}
                if group:
                    score(group, flag)

        def metrics(cands: Sequence[Detector]) -> dict[str, Any]:
            if not each:
                return validation.metrics(cands)
            out: dict[str, Any] = {}
            for c in cands:  # bounded memory for big grids over cached features
                out.update(validation.metrics([c]))
            return out

        return metrics, prime, sizes

    def tune(
        self,
        searches: Sequence[tuning.Search],
        sets: Sets,
        *,
        others: Sequence[Detector] = (),
        skip_invalid: bool = False,
    ) -> Tuned:
        """Select each search's configuration on validation data (OpenOOD v1.5's protocol):
        every candidate (and ``others``, fitted as usual) from ONE training pass, metrics on
        ``sets.id_val`` vs ``sets.val_ood``, the best by ``protocol.select`` (ties: the other
        of AUROC/FPR95, then order).

        ``skip_invalid``: a search whose every configuration this backbone rules out keeps the
        configured detector (a warning and a ``skipped`` record) instead of raising.
        """
        candidates = [c for s in searches for c in s.candidates]
        sources = [sets.id_val, *sets.val_ood.values()]
        if any(s is not None and s.cached for s in [sets.train, *sources]):
            for det in candidates:
                engine.check_feature_only(det)
        grads = [c.name for c in candidates if c.needs_input_grad]
        if grads and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"tune candidates {grads[:3]} need input gradients; set "
                "`trainer.inference_mode: false` (the lightning-ood CLI default)."
            )
        for det in [*candidates, *others]:
            det.to(self.device)
        for det in others:
            det.mark_unfitted()
        self._check_validation_source([*candidates, *others], sets.id_val)
        readers = [d for d in [*candidates, *others] if engine.reads_training_data(d)]
        if readers and sets.train is None:
            raise ValueError(
                f"tune: {sorted({d.name for d in readers})[:4]} are fitted on the training set; "
                "give the session a training source (Sets.train)"
            )
        outputs = None if not readers else sets.train.training(readers, self.device)  # type: ignore[union-attr]
        with engine.eval_mode(self.backbone):
            fitted, n_groups, invalid = tuning.fit_candidates(
                candidates, self.backbone, outputs, self.reducer, others=others
            )
        # candidates and others fitted on validation data share one pass over sets.id_val
        self.fit_validation([*fitted, *others], sets.id_val, invalid=invalid)
        broken = [d.name for d in others if d.name in invalid]
        if broken:
            raise InvalidConfiguration(invalid[broken[0]])
        fitted = [d for d in fitted if d.name not in invalid]
        metrics, prime, sizes = self._validation(sets)
        prime(fitted)  # loaders: one pass per validation set for every candidate
        out = Tuned(others=list(others), fit_groups=n_groups)
        for srch in searches:
            mine = {c.name for c in srch.candidates}
            cands = [d for d in fitted if d.name in mine]
            if not cands:
                why = f"every configuration is invalid for this backbone, e.g. {invalid[min(mine)]}"
                if not skip_invalid:
                    raise ValueError(f"tune: {srch.name!r}: {why}; give it a valid grid")
                self.warn(f"tune: {srch.name!r} keeps its values: {why}")
                out.records[srch.name] = {"kind": srch.kind, "space": srch.space, "skipped": why}
                continue
            val = metrics(cands)
            rows, best = tuning.select(
                srch, cands, val, self.protocol.select, self.backbone, invalid
            )
            det = tuning.detector_of(srch, cands, best)
            det.name = srch.name
            out.selected[srch.name] = det
            out.rows[srch.name] = (rows, best)
            out.records[srch.name] = {
                "kind": srch.kind,
                "space": srch.space,
                "selected": rows[best]["params"],
                "val_mean": rows[best]["val_mean"],
                "rows": [
                    {k: r[k] for k in ("params", "val_mean", "invalid") if k in r} for r in rows
                ],
            }
        out.meta = {
            "select": self.protocol.select,
            "id_validation": f"{sizes.get(tuning.ID_KEY, 0)} {sets.id_val_note}",
            "val_ood_sets": {k: sizes.get(k, 0) for k in sets.val_ood},
            "seed": self.protocol.seed,
            "combiner_fraction": self.protocol.combiner_fraction,
        }
        return out

    # -- calibrate -------------------------------------------------------------------------
    def calibrate(self, detectors: Sequence[Detector], sets: Sets) -> dict[str, dict[str, Any]]:
        """Make ``detectors`` deployable: the combiner each multi-component layer ensemble
        ships (:func:`lightning_ood.engine.deploy_combiners`: ID validation vs validation OOD,
        else vs FGSM proxy outliers, else ID-only), then every decision threshold at
        ``protocol.threshold_tpr`` on the ID validation scores as they ship. Returns how each
        shipped combiner was fitted (``method``, ``n_id``, ``n_ood``, ``id_data``,
        ``ood_sets``)."""
        dets = {d.name: d for d in detectors}
        if not dets:
            return {}
        if sets.id_val is None:
            raise ValueError("calibrate: no ID validation data (Sets.id_val)")
        id_bank = self.score_set(dets, sets.id_val, desc="Calibrating thresholds")
        ensembles = {n: d for n, d in dets.items() if engine.ships_combiner(d, id_bank[n])}
        how: dict[str, dict[str, Any]] = {}
        if ensembles:
            ood_bank = proxy_bank = None
            if sets.val_ood:
                parts = [
                    self.score_set(ensembles, src, desc=f"combiner {k}")
                    for k, src in sets.val_ood.items()
                ]
                ood_bank = {n: torch.cat([p[n] for p in parts]) for n in ensembles}
            elif sets.proxy is not None:
                proxy_bank = self.score_set(ensembles, sets.proxy(), desc="combiner FGSM proxy")
            how = engine.deploy_combiners(ensembles, id_bank, ood_bank, proxy_bank)
            ood_names = sorted(sets.val_ood)
            for h in how.values():
                h.update(id_data=sets.id_val_note, ood_sets=ood_names)
            self.info(
                "shipped combiners: "
                + "; ".join(
                    f"{n}: {h['method']} on {h['n_id']} ID + {h['n_ood']} "
                    + (f"validation OOD ({', '.join(ood_names)})" if ood_names else "proxy")
                    for n, h in how.items()
                )
            )
        engine.calibrate_detectors(
            dets, engine.combined_scores(dets, id_bank), self.protocol.threshold_tpr
        )
        return how

    # -- score, evaluate, report -----------------------------------------------------------
    def score(
        self,
        detectors: Mapping[str, Detector],
        test: Mapping[str, Source],
        neuron_thresholds: Sequence[float] | None = None,
    ) -> ScoreBank:
        """Score every reported set (ID first) with every detector, one pass per set."""
        bank = ScoreBank(detectors, self.backbone, list(test), neuron_thresholds)
        taps = engine.detector_taps(detectors.values(), self.backbone)
        with engine.eval_mode(self.backbone):
            for i, (name, src) in enumerate(test.items()):
                for x, y, out in src.with_targets(taps, self.device, desc=name):
                    bank.add(i, out, x, y)
        return bank

    def evaluate(
        self,
        detectors: Mapping[str, Detector],
        banks: Mapping[str, Sequence[Tensor]],
        set_names: Sequence[str],
        *,
        per_set: bool = True,
        combiners: Mapping[str, Any] | None = None,
        combiners_source: str = "combiners",
        correct_id: Tensor | None = None,
        groups: Mapping[str, str] | None = None,
    ) -> Evaluation:
        """The protocol's metrics (:func:`lightning_ood.protocol.evaluate_detectors`): the
        shipped row of every detector, and with ``per_set`` the papers' ``[per-set]`` rows of
        multi-component layer ensembles on ``protocol.per_set_holdout`` held-out samples;
        CCR@FPR given ``correct_id`` (:meth:`ScoreBank.correct_id`), ``average[group]`` rows
        given ``groups``."""
        return evaluate_detectors(
            detectors,
            banks,
            set_names,
            per_set_holdout=self.protocol.per_set_holdout if per_set else 0,
            seed=self.protocol.per_set_seed,
            warn=self.warn,
            combiners=combiners,
            combiners_source=combiners_source,
            correct_id=correct_id,
            groups=groups,
        )

    def results(
        self,
        detectors: Mapping[str, Detector],
        evaluation: Evaluation,
        set_names: Sequence[str],
        *,
        info: Mapping[str, Any] | None = None,
        shipped: Mapping[str, Mapping[str, Any]] | None = None,
        tuned: Tuned | None = None,
        combiners_from: str | None = None,
        neuron_counts: Mapping[str, Tensor] | None = None,
        neuron_thresholds: Sequence[float] | None = None,
        skipped_ood_sets: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The results mapping ``ood_results.json`` holds (and :func:`report.format_markdown`
        formats): sets, groups and skipped sets, protocol, CCR@FPR's reading (or why it is
        left out), configs, thresholds, combiners, metrics, then the tuning record and the
        paper analyses that apply."""
        facts = dict(info or {})
        results: dict[str, Any] = {
            "id_set": facts.get("id_set", set_names[0]),
            "data_version": facts.get("data_version", set_names[0]),
            "model": facts.get("model"),
            "convention": CONVENTION,
            "groups": dict(evaluation.groups),
            "skipped_ood_sets": dict(skipped_ood_sets or {}),
            "ccr": ccr_record(evaluation.ccr),
            "validation": {
                "held_out_per_set": evaluation.held_out_per_set,
                "held_out_for": evaluation.held_out_for,
                "seed": self.protocol.per_set_seed,
                "combiners_from": combiners_from,
            },
            "detectors": {n: d.config() for n, d in detectors.items()},
            "thresholds": {
                n: {"value": float(d.threshold), "id_tpr": float(d.threshold_tpr)}
                for n, d in detectors.items()
            },
            "combiners": evaluation.combiners,
            "shipped_combiners": {n: dict(r) for n, r in (shipped or {}).items() if n in detectors},
            "metrics": evaluation.metrics,
        }
        if tuned is not None and tuned.records:
            results["tuning"] = {"protocol": tuned.meta, "detectors": tuned.records}
        results.update(fssd_analyses.results(evaluation.metrics))
        results.update(line_analyses.results(detectors, neuron_counts, neuron_thresholds))
        return results

    def write(
        self,
        out_dir: str | Path,
        outcome: Outcome,
        *,
        writer: Any = None,
        step: int = 0,
        figures: bool = True,
        stem: str = "ood_results",
    ) -> list[Path]:
        """Write one evaluation: the paper figures (densities with thresholds, FSSD layers and
        severity; TensorBoard too given a ``writer``), LINe Figure 1 and Table 8, then
        ``<stem>.{md,json,csv}``. Returns the files."""
        out = Path(out_dir)
        paths: list[Path] = []
        dets, results = outcome.detectors, outcome.results
        if figures:
            layers = fssd_analyses.layer_components(
                dets, self.backbone, outcome.banks, outcome.set_names
            )
            severity = (results.get("severity") or {}).get("detectors")
            paths += report.write_figures(
                out,
                writer,
                step,
                outcome.evaluation.scores,
                {n: float(d.threshold) for n, d in dets.items()},
                fssd_analyses.figure_makers(layers, severity),
            )
        paths += line_analyses.write(
            out,
            writer,
            step,
            results,
            outcome.neuron_counts,
            outcome.neuron_thresholds,
            int(getattr(self.backbone, "num_features", 0)),
        )
        paths += report.write_results(
            out, stem, results, report.format_markdown(results), results["metrics"]
        )
        return paths

    # -- the whole session -----------------------------------------------------------------
    def run(
        self,
        detectors: Mapping[str, Detector],
        sets: Sets,
        *,
        searches: Sequence[tuning.Search] = (),
        skip_invalid: bool = False,
        refit: bool = False,
        per_set: bool = True,
        info: Mapping[str, Any] | None = None,
        combiners: Mapping[str, Any] | None = None,
        combiners_source: str = "combiners",
        activated_neurons: bool = False,
        neuron_thresholds: Sequence[float] | None = None,
    ) -> Outcome:
        """fit → tune → calibrate → score → protocol → results over ``sets``.

        ``searches`` (:func:`lightning_ood.tuning.plan`) are selected first and replace the
        detector of their name (or join the detectors); detectors without fitted state (all
        with ``refit``) are fitted from the training pass, and every detector fitted here or
        uncalibrated gets its shipped combiner and threshold. ``activated_neurons`` adds LINe
        Figure 1's counts at ``neuron_thresholds`` (default: 0 and the first LINe's δ).
        """
        dets = dict(detectors)
        # before any pass: a detector that cannot run on this backbone stops the run now
        candidates = [c for s in searches for c in s.candidates]
        engine.check_backbone([*dets.values(), *candidates], self.backbone)
        tuned = None
        fitted: list[Detector] = []
        if searches:
            others = sharing_the_tuning_pass(dets, [s.name for s in searches], refit)
            tuned = self.tune(searches, sets, others=others, skip_invalid=skip_invalid)
            dets.update(tuned.selected)
            fitted = [*tuned.selected.values(), *tuned.others]
        todo = [d for d in dets.values() if d not in fitted and (refit or not d.is_fitted)]
        self.fit(todo, sets.train, id_val=sets.id_val)
        fitted += todo
        uncalibrated = [d for d in dets.values() if d in fitted or not d.is_calibrated]
        shipped = self.calibrate(uncalibrated, sets) if sets.id_val is not None else {}
        if sets.id_val is None and uncalibrated:
            self.warn(
                f"no ID validation data: detectors {[d.name for d in uncalibrated]} get no "
                "decision threshold"
            )
        at = line_analyses.thresholds(dets, neuron_thresholds) if activated_neurons else None
        bank = self.score(dets, sets.test, at)
        set_names = list(sets.test)
        # each test source's rows of every rank, in dataset order (identity on one process)
        gathers = [src.gather for src in sets.test.values()]
        banks = bank.banks(gathers)
        evaluation = self.evaluate(
            dets,
            banks,
            set_names,
            per_set=per_set,
            combiners=combiners,
            combiners_source=combiners_source,
            correct_id=bank.correct_id(gathers),
            groups=sets.groups,
        )
        counts = bank.neuron_counts(gathers)
        results = self.results(
            dets,
            evaluation,
            set_names,
            info=info,
            shipped=shipped,
            tuned=tuned,
            combiners_from=None if combiners is None else combiners_source,
            neuron_counts=counts,
            neuron_thresholds=at,
            skipped_ood_sets=sets.skipped_ood_sets,
        )
        return Outcome(dets, set_names, banks, evaluation, results, tuned, shipped, counts, at)


__all__ = [
    "NO_VALIDATION_SPLIT",
    "Batch",
    "CachedSource",
    "EvaluationSession",
    "Gather",
    "LoaderSource",
    "Outcome",
    "ScoreBank",
    "Sets",
    "Source",
    "Tuned",
    "ccr_record",
    "sharing_the_tuning_pass",
]
