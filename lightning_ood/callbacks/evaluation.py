"""The OOD callback: Lightning glue around :class:`lightning_ood.session.EvaluationSession`.

It decides *when* (after ``fit`` with the model still on its device and DDP alive; at test
start for whatever the checkpoint holds no fitted state for; per test batch; at test end) and
supplies what only the trainer has: the datamodule's loaders as session sources, the device,
cross-rank reductions (:class:`StrategyReducer`) and the gather that puts every rank's rows
back in dataset order (:func:`in_dataset_order`), TensorBoard and checkpoint re-saves. Fitting,
tuning, calibration, scoring, the protocol, the results and the paper analyses are the
session's (the same code ``lightning-ood grid`` runs over cached features).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_ood import card, engine, report, tuning
from lightning_ood.analyses import line as line_analyses
from lightning_ood.data.base import has_train_eval_loader, train_eval_loader
from lightning_ood.data.samplers import unshard
from lightning_ood.detectors import Detector, Reducer, build_detectors
from lightning_ood.distributed import ProcessGroupOwnership
from lightning_ood.metrics import CCR_NAMES, METRIC_NAMES
from lightning_ood.models import BackboneOutput
from lightning_ood.protocol import (
    TUNE_KEYS,  # noqa: F401  (re-exported: the tune option's keys)
    Protocol,
    check_holdout,
    check_tune,
    combiners_record,
    fixed_combiners,
    holds_out,
)
from lightning_ood.session import (
    NO_VALIDATION_SPLIT,
    EvaluationSession,
    LoaderSource,
    Outcome,
    ScoreBank,
    Sets,
    Source,
    Tuned,
    sharing_the_tuning_pass,
)

#: The ``tune`` option's check (it lives with the protocol it fills).
_check_tune = check_tune

#: How the calibration data was drawn, by ``data.val_size``.
_ID_TEST_NOTE = "ID test set (data.val_size 0)"
_HELD_OUT_NOTE = "held-out training images (data.val_size)"


def in_dataset_order(t: Tensor, trainer: Trainer) -> Tensor:
    """Per-sample rows of one rank gathered over all ranks and put back in dataset order (the
    eval loaders shard with :class:`EvalShardedSampler`: no padding, nothing counted twice),
    so that seeded hold-outs pick the same samples on any world size."""
    if trainer.world_size > 1:
        parts = gather_all_tensors(t.to(trainer.strategy.root_device))
        t = unshard([g.cpu() for g in parts])
    return t


class StrategyReducer(Reducer):
    """Detector-fitting reductions backed by the trainer's strategy (no-ops on one process)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def sum(self, t: Tensor) -> Tensor:
        if self.trainer.world_size == 1:
            return t
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    def cat(self, t: Tensor) -> Tensor:
        if self.trainer.world_size == 1:
            return t
        return torch.cat(gather_all_tensors(t))


def trainer_session(
    trainer: Trainer,
    pl_module: LightningModule,
    protocol: Protocol | None = None,
    progress: bool = True,
) -> EvaluationSession:
    """The session on the trainer's module: strategy reductions, rank-zero messages."""
    return EvaluationSession(
        pl_module.backbone,
        protocol,
        reducer=StrategyReducer(trainer),
        warn=lambda msg: rank_zero_warn(f"[lightning_ood] {msg}"),
        info=lambda msg: rank_zero_info(f"[lightning_ood] {msg}"),
        progress=progress and trainer.global_rank == 0,
    )


def _source(trainer: Trainer, pl_module: LightningModule, loader: Any, show: bool) -> Source:
    """A loader (or a function that builds it) as a session source gathered across ranks."""
    return LoaderSource(
        loader,
        pl_module.backbone,
        gather=lambda t: in_dataset_order(t, trainer),
        progress=show,
    )


def fit_with_trainer(
    trainer: Trainer,
    pl_module: LightningModule,
    detectors: Sequence[Detector],
    progress: bool = True,
) -> None:
    """Fit ``detectors`` together from ONE eval-mode pass over the training set
    (:meth:`lightning_ood.session.EvaluationSession.fit`).

    The training set is read through ``datamodule.train_eval_dataloader()`` (eval transform, no
    augmentation; under DDP each rank reads its unpadded shard, so no sample enters the
    detector sums twice); the sums are all-reduced with the trainer's strategy.
    """
    if not detectors:
        return
    readers = [d for d in detectors if engine.reads_training_data(d)]
    train = None
    dm = trainer.datamodule
    id_val = None
    if engine.validation_readers(detectors) and has_validation_split(dm):
        id_val = _source(trainer, pl_module, dm.val_dataloader, False)
    if readers:
        dm = trainer.datamodule
        if dm is None or not has_train_eval_loader(dm):
            raise RuntimeError(
                f"detectors {[d.name for d in readers]} need a pass over the training set, "
                "but the trainer has no datamodule with train_eval_dataloader(); pass an "
                "OODDataModule (--data ...)."
            )
        train = _source(trainer, pl_module, train_eval_loader(dm), False)
    trainer_session(trainer, pl_module, progress=progress).fit(detectors, train, id_val=id_val)


def has_validation_split(dm: Any) -> bool:
    """Whether the datamodule holds a held-out ID validation split (``val_size`` > 0): with
    ``val_size`` 0 its ``val_dataloader`` is the reported ID test set, which no detector may
    be fitted on."""
    return (
        dm is not None
        and is_overridden("val_dataloader", dm)
        and int(getattr(dm, "val_size", 0) or 0) > 0
    )


def calibration_sets(
    trainer: Trainer, pl_module: LightningModule, detectors: Sequence[Detector], show: bool
) -> Sets:
    """The datamodule's calibration data as session sets: the ID validation loader (the
    ``val_size`` hold-out of the training set, or the ID test set when ``val_size`` is 0, as in
    the reference scripts), and for multi-component layer ensembles the validation OOD sets
    (never reported) or, without them, FGSM proxy outliers of the ID validation images."""
    dm = trainer.datamodule
    backbone = pl_module.backbone
    sets = Sets(
        id_val=_source(trainer, pl_module, dm.val_dataloader, show),
        id_val_note=_ID_TEST_NOTE if int(getattr(dm, "val_size", 0) or 0) <= 0 else _HELD_OUT_NOTE,
    )
    ensembles = [d for d in detectors if d.has_combiner and len(d.component_names(backbone)) > 1]
    if not ensembles:
        return sets
    val_ood = dm.val_ood_dataloaders() if hasattr(dm, "val_ood_dataloaders") else {}
    sets.val_ood = {k: _source(trainer, pl_module, ld, show) for k, ld in val_ood.items()}
    if not val_ood and getattr(backbone, "input_kind", "image") == "image":
        std = (dm.hand_off_meta() if hasattr(dm, "hand_off_meta") else {}).get("std")
        sets.proxy = lambda: _source(
            trainer,
            pl_module,
            engine.fgsm_batches(backbone, dm.val_dataloader(), input_std=std),
            show,
        )
    return sets


def calibrate_with_trainer(
    trainer: Trainer,
    pl_module: LightningModule,
    detectors: Sequence[Detector],
    tpr: float = 0.95,
    progress: bool = True,
) -> None:
    """Make every detector deployable (:meth:`EvaluationSession.calibrate`): the combiner a
    layer ensemble ships, fitted on ID validation + validation OOD data (or FGSM proxies, or
    ID only), then each detector's decision threshold (``tpr`` of held-out ID samples are
    called ID), on the data of :func:`calibration_sets`, all ranks' scores pooled. What was
    fitted is recorded in ``pl_module.shipped_combiners`` (saved in the checkpoint and the
    results)."""
    if not detectors:
        return
    dm = trainer.datamodule
    if dm is None or not is_overridden("val_dataloader", dm):
        rank_zero_warn(
            "[lightning_ood] the datamodule has no val_dataloader (held-out ID data), so the "
            f"detectors {[d.name for d in detectors]} get no decision threshold; "
            "lightning_ood.load() and predict will refuse them until they are calibrated."
        )
        return
    session = trainer_session(trainer, pl_module, Protocol(threshold_tpr=tpr), progress)
    sets = calibration_sets(trainer, pl_module, detectors, progress and trainer.global_rank == 0)
    how = session.calibrate(detectors, sets)
    record = getattr(pl_module, "shipped_combiners", None)
    if isinstance(record, dict):
        record.update(how)


def _deprecated_holdout_names(
    per_set_holdout: int,
    per_set_seed: int,
    validation_size: int | None,
    validation_seed: int | None,
) -> tuple[int, int]:
    """``(per_set_holdout, per_set_seed)``, taking the values of their deprecated names
    ``validation_size``/``validation_seed`` (configs written before the rename) with a
    warning."""
    for old, new, value in (
        ("validation_size", "per_set_holdout", validation_size),
        ("validation_seed", "per_set_seed", validation_seed),
    ):
        if value is not None:
            warnings.warn(
                f"OODEvaluation: {old} is deprecated; call it {new} (samples of each test set "
                "held out for the papers' per-set combiners, not validation data)",
                DeprecationWarning,
                stacklevel=3,
            )
    if validation_size is not None:
        per_set_holdout = validation_size
    if validation_seed is not None:
        per_set_seed = validation_seed
    return per_set_holdout, per_set_seed


class OODEvaluation(Callback):
    """Fit and evaluate post-hoc OOD detectors.

    Args:
        detectors: ``{name: {type: kind, **hyperparameters}}``; ``type`` defaults to the name,
            e.g. ``{"energy": {}, "line": {"delta": 1.0, "p_a": 90, "p_w": 90}}``. ``None``
            keeps whatever the model already carries (e.g. from its checkpoint).
        fit_after_train: fit the detectors in ``on_train_end`` and re-save ``last.ckpt``.
        per_set_holdout: per test set, samples held out (seeded) to fit the combiners of
            layer ensembles with more than one tap (FSSD, Mahalanobis); those detectors are
            reported on the rest, every other detector on every sample, so adding or removing
            a detector never changes another's numbers. Checked against the set sizes and the
            combiners' needs before any pass over the data.
        per_set_seed: seed of the held-out permutation (the FSSD reference uses 42).
        results_dir: where the tables go; default: the run's log directory.
        log_histograms: log ID/OOD score histograms per detector to TensorBoard.
        log_roc: log ROC curves per detector as images to TensorBoard.
        progress: show a progress bar for the fitting pass.
        refit: at test start, refit every detector even if the checkpoint holds fitted state
            (e.g. to fit on more ranks or other training data).
        threshold_tpr: the ID true-positive rate of each detector's stored decision
            threshold, calibrated on held-out ID data after fitting (0.95 = FPR95's point).
        save_fitted: when detectors are fitted at test start, save the model with them to
            ``<checkpoint dir>/fitted.ckpt`` (the after-fit path re-saves ``last.ckpt``).
        tune: select hyperparameters on validation data at test start (OpenOOD v1.5's
            protocol), e.g. ``{select: auroc, detectors: {react: null, line: {p_a: [80, 90]}}}``:
            ``detectors`` maps each tuned detector to its grid (``null``: the class's declared
            ``search_space``; the whole ``detectors`` key ``null``: every detector that declares
            one). Candidates are fitted from ONE pass over the training set and scored on the
            datamodule's held-out ID validation split (``val_size`` > 0) and its
            ``val_ood_sets``, never on a reported set; the best by ``select`` (``auroc``,
            ``fpr95``, ...; ties by the other) replaces the configured detector, is stored in the
            checkpoint, printed and written to the results. ``seed`` and ``combiner_fraction``
            split validation sets for layer-ensemble combiners, as in the grid.
        figures: write the paper pictures as PNGs in ``<results>/figures`` and log them to
            TensorBoard: per detector the ID and OOD score densities on one axis with the
            decision threshold, per-layer components of layer ensembles (FSSD Figure 6), and
            AUROC against corruption severity when corrupted sets are reported (Figure 4).
        activated_neurons: count, per test sample, the penultimate neurons with activation
            above each of ``activated_thresholds`` (default 0 and the first LINe's δ) and draw
            ID against each OOD set (LINe Figure 1), as ``activated_neurons.png``, in
            TensorBoard and summarised in the results.
        combiners_from: an earlier run's ``ood_results.json`` (same layer ensembles, OOD set
            names, ``per_set_holdout`` and ``per_set_seed``) whose per-set combiners are
            loaded instead of fitted on this run's hold-out: with ``data.test_corruption``,
            the combiners stay those of clean data, as the FSSD paper's Figure 5 tunes on
            clean data only. ``None``: fit them here.
        validation_size, validation_seed: deprecated names of ``per_set_holdout`` and
            ``per_set_seed`` (they held out no validation data: parts of the test sets).
    """

    def __init__(
        self,
        detectors: dict[str, dict[str, Any] | None] | None = None,
        fit_after_train: bool = True,
        per_set_holdout: int = 500,
        per_set_seed: int = 42,
        results_dir: str | None = None,
        log_histograms: bool = True,
        log_roc: bool = True,
        progress: bool = True,
        refit: bool = False,
        threshold_tpr: float = 0.95,
        save_fitted: bool = True,
        tune: dict[str, Any] | None = None,
        figures: bool = True,
        activated_neurons: bool = False,
        activated_thresholds: list[float] | None = None,
        combiners_from: str | None = None,
        validation_size: int | None = None,
        validation_seed: int | None = None,
    ) -> None:
        super().__init__()
        per_set_holdout, per_set_seed = _deprecated_holdout_names(
            per_set_holdout, per_set_seed, validation_size, validation_seed
        )
        self.tune = check_tune(tune)
        #: The one protocol value of this run (shared with ``lightning-ood grid``).
        self.protocol = Protocol(
            **{k: self.tune[k] for k in Protocol.TUNE_FIELDS if self.tune},
            per_set_holdout=per_set_holdout,
            per_set_seed=per_set_seed,
            threshold_tpr=threshold_tpr,
        )
        self.figures = figures
        self.activated_neurons = activated_neurons
        self.activated_thresholds = activated_thresholds
        self.tuning: dict[str, Any] = {}
        self._tuned: Tuned | None = None
        self.refit = refit
        self.threshold_tpr = threshold_tpr
        self.save_fitted = save_fitted
        self.detector_specs = detectors
        self.fit_after_train = fit_after_train
        self.per_set_holdout = per_set_holdout
        self.per_set_seed = per_set_seed
        self.combiners_from = combiners_from
        self._fixed_combiners: dict[str, Any] | None = None
        #: fitted.ckpt written by this run's test start: re-saved after the evaluation so that
        #: its card carries the reported rows.
        self._fitted_path: str | None = None
        self.results_dir = results_dir
        self.log_histograms = log_histograms
        self.log_roc = log_roc
        self.progress = progress
        self.results: dict[str, Any] = {}
        self._out_dir: Path | None = None
        self._bank: ScoreBank | None = None
        #: Observed before any run: the teardown ends only a process group created after it.
        self._process_group = ProcessGroupOwnership.observe()
        if detectors is not None:  # fail at config time, not after an hour of training
            build_detectors(detectors)

    # -- attach ------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.detector_specs is not None:
            pl_module.set_detectors(self.detector_specs)
        # refused before any training step: a detector that cannot run on this network at all
        engine.check_backbone(pl_module.detectors.values(), pl_module.backbone)
        dm = trainer.datamodule
        readers = engine.validation_readers(pl_module.detectors.values())
        if readers and stage == "fit" and self.fit_after_train and not has_validation_split(dm):
            # refused before any training step (at test, when fitting: a checkpoint may hold T)
            raise ValueError(
                NO_VALIDATION_SPLIT.format(names=[f"{d.name} ({d.kind})" for d in readers])
            )
        if stage == "fit" and self.fit_after_train and has_train_eval_loader(dm):
            num_train = len(train_eval_loader(dm).dataset)  # refused before any training step
            for det in pl_module.detectors.values():
                det.check_data(num_train)
        if stage == "test":
            self._check_holdout(trainer, pl_module)
            if self.combiners_from is not None:
                self._fixed_combiners = combiners_record(
                    self.combiners_from, self.per_set_holdout, self.per_set_seed
                )
                fixed_combiners(  # refused here, before any pass over the data
                    self._fixed_combiners,
                    f"combiners_from={self.combiners_from!r}",
                    self._held_out_components(pl_module),
                    list(pl_module.detectors),
                    self._test_set_names(trainer)[1:],
                )

    def _held_out_components(self, pl_module: LightningModule) -> dict[str, int]:
        """The detectors evaluated on the hold-out (:func:`holds_out`) and their number of
        components."""
        backbone = pl_module.backbone
        sizes = {n: len(d.component_names(backbone)) for n, d in pl_module.detectors.items()}
        return {
            n: k
            for n, k in sizes.items()
            if holds_out(pl_module.detectors[n], k, self.per_set_holdout)
        }

    def _check_holdout(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse a hold-out the test sets or combiners cannot take, before any data pass."""
        dets = {n: pl_module.detectors[n] for n in self._held_out_components(pl_module)}
        if not dets:
            return
        loaders = trainer.datamodule.test_dataloader() if trainer.datamodule is not None else []
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        names = self._test_set_names(trainer)
        if len(names) != len(loaders):
            raise ValueError(
                f"the datamodule names {len(names)} test sets {names} but test_dataloader() "
                f"returns {len(loaders)} loaders; they must correspond one to one"
            )
        sizes = {n: len(ld.dataset) for n, ld in zip(names, loaders, strict=True)}
        check_holdout(sizes, self.per_set_holdout, dets)

    # -- fitting -----------------------------------------------------------------------------
    #: Set by the CLI when ``--allow_untrained`` tests a network that has no trained weights:
    #: the run says so at test start, and no hand-off ``fitted.ckpt`` is written.
    untrained_weights: bool = False
    _train_end_ran: bool = False

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_end_ran = True
        if not self.fit_after_train or not pl_module.detectors:
            return
        dets = list(pl_module.detectors.values())
        rank_zero_info(
            f"[lightning_ood] fitting detectors after training: {[d.name for d in dets]}"
        )
        self._fit_and_save_last(trainer, pl_module, dets)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Finish what ``on_train_end`` did not get to: a run resumed (``--ckpt_path last``)
        after its training had finished skips Lightning's training loop, ``on_train_end``
        included, so detectors that the killed run never fitted are fitted here."""
        ran, self._train_end_ran = self._train_end_ran, False
        if ran or not self.fit_after_train or not pl_module.detectors:
            return
        missing = [d for d in pl_module.detectors.values() if not (d.is_fitted and d.is_calibrated)]
        todo = [d.name for d in missing]
        if not todo:
            return
        if not trainer.ckpt_path or trainer.global_step == 0:
            rank_zero_warn(
                "[lightning_ood] no training ran in this fit (max_epochs/max_steps reached or "
                f"no training batches), so the detectors {todo} were NOT fitted and no checkpoint "
                "carries them."
            )
            return
        rank_zero_warn(
            f"[lightning_ood] resumed from {trainer.ckpt_path}: its training had already "
            f"finished, but it holds no fitted, calibrated detectors {todo} (the earlier run "
            "stopped while fitting them); fitting them now."
        )
        # Lightning's teardown moved the model to the CPU; fit where it trained.
        pl_module.to(trainer.strategy.root_device)
        try:
            self._fit_and_save_last(trainer, pl_module, missing)
        finally:
            pl_module.cpu()

    def _fit_and_save_last(
        self, trainer: Trainer, pl_module: LightningModule, dets: list[Detector]
    ) -> None:
        """Fit and calibrate ``dets`` from scratch, then re-save ``last.ckpt`` with them."""
        for det in dets:
            det.mark_unfitted()
        fit_with_trainer(trainer, pl_module, dets, self.progress)
        calibrate_with_trainer(trainer, pl_module, dets, self.threshold_tpr, self.progress)
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None and getattr(ckpt_cb, "dirpath", None):
            path = ckpt_cb.last_model_path or os.path.join(ckpt_cb.dirpath, "last.ckpt")
            trainer.save_checkpoint(path)
            rank_zero_info(f"[lightning_ood] saved the fitted detectors into {path}")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.untrained_weights:
            rank_zero_warn(
                "[lightning_ood] testing a network with UNTRAINED weights (--allow_untrained: no "
                "checkpoint, no model_kwargs.weights): its accuracy and OOD metrics describe a "
                "randomly initialised network, and no fitted.ckpt is written."
            )
        grad_dets = [n for n, d in pl_module.detectors.items() if d.needs_input_grad]
        if grad_dets and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"detectors {grad_dets} need input gradients in the test loop; set "
                "`trainer.inference_mode: false` (the lightning-ood CLI default)."
            )
        tuned: list[Detector] = []  # fitted by the tuning pass: selections and the others
        if self.tune is not None:
            tuned = self._tune(trainer, pl_module)
        if self.refit:
            unfitted = [d for d in pl_module.detectors.values() if d not in tuned]
            for det in unfitted:
                det.mark_unfitted()
            rank_zero_info("[lightning_ood] refit: true; refitting every detector.")
        else:
            unfitted = pl_module.unfitted_detectors()
            if unfitted:
                weights = (pl_module.hparams.get("model_kwargs") or {}).get("weights")
                if trainer.ckpt_path:
                    source = f"the checkpoint {trainer.ckpt_path}"
                elif weights:
                    source = f"the model (no checkpoint; initial weights {weights})"
                else:
                    source = "the model (no checkpoint given)"
                rank_zero_info(
                    f"[lightning_ood] {source} holds no fitted state for detectors "
                    f"{[d.name for d in unfitted]}; fitting them now with one pass over the "
                    "training set."
                )
        if unfitted:
            fit_with_trainer(trainer, pl_module, unfitted, self.progress)
        uncalibrated = [d for d in pl_module.detectors.values() if not d.is_calibrated]
        if uncalibrated or unfitted or tuned:
            todo = list(dict.fromkeys([*unfitted, *uncalibrated]))
            calibrate_with_trainer(trainer, pl_module, todo, self.threshold_tpr, self.progress)
            self._save_fitted(trainer)
        self._bank = ScoreBank(
            dict(pl_module.detectors.items()),
            pl_module.backbone,
            self._test_set_names(trainer),
            self._thresholds(pl_module) if self.activated_neurons else None,
        )

    def _tune(self, trainer: Trainer, pl_module: LightningModule) -> list[Detector]:
        """Select the tuned detectors' hyperparameters on validation data (see ``tune``;
        :meth:`EvaluationSession.tune`); the selected, fitted detectors replace the configured
        ones. Returns every detector this fitted: the selections and the untuned ones that
        shared its training pass."""
        assert self.tune is not None
        self.tuning, self._tuned = {}, None  # this test run's selections only
        dm = trainer.datamodule
        if dm is None or int(getattr(dm, "val_size", 0) or 0) <= 0:
            raise ValueError(
                "tune needs held-out ID validation data that is never reported: set "
                "`data.init_args.val_size` > 0 (with val_size 0 the ID validation set is the "
                "ID test set)"
            )
        val_ood = dm.val_ood_dataloaders() if hasattr(dm, "val_ood_dataloaders") else {}
        if not val_ood:
            raise ValueError(
                "tune needs validation OOD sets that are never reported: set "
                "`data.init_args.val_ood_sets` (e.g. [kmnist])"
            )
        if hasattr(dm, "check_sample_leaks"):
            dm.check_sample_leaks()  # by what the sets read, whatever they are named
        else:  # a datamodule without entries: its names are all there is to compare
            leaked = sorted(set(val_ood) & set(self._test_set_names(trainer)))
            if leaked:
                raise ValueError(f"tune: validation OOD sets {leaked} are also reported test sets")
        dets = dict(pl_module.detectors.items())
        searches, auto = tuning.searches_for(dets, self.tune["detectors"])
        if not searches:
            rank_zero_warn(
                "[lightning_ood] tune: nothing to tune (tune.detectors is empty, or no configured "
                "detector declares a search space)"
            )
            return []
        rank_zero_info(
            "[lightning_ood] tune: "
            + ", ".join(f"{s.name} over {len(s.candidates)} configurations" for s in searches)
            + f"; selecting by validation {self.protocol.select} on the ID validation split and "
            f"{sorted(val_ood)}"
        )
        # Detectors not tuned but unfitted share the candidates' single training pass.
        others = sharing_the_tuning_pass(dets, [s.name for s in searches], self.refit)
        show = self.progress and trainer.global_rank == 0
        sets = Sets(
            train=_source(trainer, pl_module, lambda: train_eval_loader(dm), show)
            if has_train_eval_loader(dm)
            else None,
            id_val=_source(trainer, pl_module, dm.val_dataloader(), False),
            val_ood={k: _source(trainer, pl_module, ld, False) for k, ld in val_ood.items()},
            id_val_note="held-out training samples (data.val_size)",
        )
        session = trainer_session(trainer, pl_module, self.protocol, self.progress)
        tuned = session.tune(searches, sets, others=others, skip_invalid=auto)
        for name, det in tuned.selected.items():
            pl_module.replace_detector(name, det)
        self._tuned, self.tuning, self.tuning_meta = tuned, tuned.records, tuned.meta
        record = getattr(pl_module, "tuned_record", None)
        if isinstance(record, dict):
            for n, t in self.tuning.items():
                if "selected" in t:
                    record[n] = {
                        "selected": t["selected"],
                        "select": self.tuning_meta["select"],
                        "val_ood_sets": sorted(self.tuning_meta["val_ood_sets"]),
                        "id_validation": self.tuning_meta["id_validation"],
                    }
        rank_zero_info(
            "[lightning_ood] tune selected: "
            + "; ".join(f"{n}: {t['selected']}" for n, t in self.tuning.items() if "selected" in t)
        )
        return [*tuned.selected.values(), *tuned.others]

    def _save_fitted(self, trainer: Trainer) -> None:
        ckpt_cb = trainer.checkpoint_callback
        dirpath = getattr(ckpt_cb, "dirpath", None)
        if not self.save_fitted or not dirpath:
            return
        if self.untrained_weights:
            rank_zero_info(
                "[lightning_ood] not saving fitted.ckpt: the network's weights are untrained, and "
                "a hand-off checkpoint must never carry untrained weights."
            )
            return
        path = os.path.join(dirpath, "fitted.ckpt")
        trainer.save_checkpoint(path)
        self._fitted_path = path
        rank_zero_info(f"[lightning_ood] saved the model with its fitted detectors to {path}")

    # -- scoring -----------------------------------------------------------------------------
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, BackboneOutput):
            raise TypeError(
                "OODEvaluation expects test_step to return the shared BackboneOutput; got "
                f"{type(outputs).__name__}"
            )
        assert self._bank is not None, "on_test_start builds the score bank"
        x, y = engine.split_batch(batch)
        self._bank.add(dataloader_idx, outputs, x, y)

    def _thresholds(self, pl_module: LightningModule) -> list[float]:
        """Activation thresholds of the neuron counts: given, else 0 and the first LINe's δ."""
        return line_analyses.thresholds(
            dict(pl_module.detectors.items()), self.activated_thresholds
        )

    # -- evaluation --------------------------------------------------------------------------
    @staticmethod
    def _test_set_names(trainer: Trainer) -> list[str]:
        dm = trainer.datamodule
        names = getattr(dm, "test_set_names", None)
        if not names:
            raise RuntimeError(
                "OODEvaluation needs a datamodule with `test_set_names` ([ID set, *OOD sets])"
            )
        return list(names)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._bank is not None, "on_test_start builds the score bank"
        names = self._test_set_names(trainer)
        dets = dict(pl_module.detectors.items())
        gather = lambda t: in_dataset_order(t, trainer)  # noqa: E731
        banks = self._bank.banks(gather)
        counts = self._bank.neuron_counts(gather)
        at = self._bank.neuron_thresholds
        session = trainer_session(trainer, pl_module, self.protocol, self.progress)
        dm = trainer.datamodule
        evaluation = session.evaluate(
            dets,
            banks,
            names,
            combiners=self._fixed_combiners,
            combiners_source=f"combiners_from={self.combiners_from!r}",
            correct_id=self._bank.correct_id(gather),
            groups=dm.groups() if hasattr(dm, "groups") else None,
        )
        shipped = getattr(pl_module, "shipped_combiners", {})
        self.results = session.results(
            dets,
            evaluation,
            names,
            info={
                "id_set": names[0],
                "data_version": getattr(trainer.datamodule, "data_version", names[0]),
                "model": pl_module.hparams.get("model"),
            },
            shipped=shipped,
            tuned=self._tuned,
            combiners_from=self.combiners_from,
            neuron_counts=counts,
            neuron_thresholds=at,
            skipped_ood_sets=dm.skipped_ood_sets() if hasattr(dm, "skipped_ood_sets") else None,
        )
        if hasattr(pl_module, "reported"):  # the shipped rows go into the checkpoint's card
            pl_module.reported = card.reported_of(self.results, list(dets))
        if self._fitted_path:  # re-saved: its card now holds these rows
            trainer.save_checkpoint(self._fitted_path)
        # Straight to the loggers (rank 0): through `self.log` these ~50 scalars per detector
        # would also flood Lightning's end-of-test printout, which comes after our table.
        # Rows: every OOD set, `average` and the groups' `average[near]`, `average[far]`, ...
        flat = {
            f"ood/{dname}/{ood}/{m}": float(v)
            for dname, per_set in evaluation.metrics.items()
            for ood, vals in per_set.items()
            for m, v in vals.items()
            if m in METRIC_NAMES or m in CCR_NAMES
        }
        tb: list[TensorBoardLogger] = []
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=trainer.global_step)
                logger.save()
            tb = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
            if tb and (self.log_histograms or self.log_roc):
                report.log_score_figures(
                    tb[0].experiment,
                    evaluation.scores,
                    trainer.global_step,
                    histograms=self.log_histograms,
                    roc=self.log_roc,
                )
        # trainer.log_dir broadcasts under DDP: every rank must ask for it
        out_dir = Path(self.results_dir or trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            outcome = Outcome(
                dets, names, banks, evaluation, self.results, self._tuned, {}, counts, at
            )
            session.write(
                out_dir,
                outcome,
                writer=tb[0].experiment if tb else None,
                step=trainer.global_step,
                figures=self.figures,
            )
            self._out_dir = out_dir

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # After Lightning's own results printout, so the OOD table ends the terminal output.
        if stage == "test" and self.results and trainer.is_global_zero:
            print("\n" + report.format_markdown(self.results))
            print(f"[lightning_ood] results written to {self._out_dir}/ood_results.{{md,csv,json}}")
        # Last: end the process group Lightning created for this run (lightning_ood.distributed).
        # A gloo group left to interpreter exit can abort a finished rank with SIGABRT. Here,
        # not in the strategy's teardown: on_fit_end still fits detectors across ranks.
        self._process_group.release(
            barrier=lambda: trainer.strategy.barrier("lightning_ood.release_process_group")
        )

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        # Lightning skips teardown when a run raises: end the run's process group here, with
        # no barrier (another rank may be dead or stuck in a collective; waiting would hang).
        self._process_group.release()
