"""The OOD callback: decides *when* detectors are fitted and scored; detectors decide *what*.

* after ``fit`` (``on_train_end``, model still on its device, DDP alive) it fits every
  detector in one eval-transform pass over the training set and re-saves ``last.ckpt``;
* at test start it fits whatever the checkpoint holds no fitted state for, and says so;
* per test batch it scores every detector from the task's single forward pass;
* at test end it evaluates them with the one protocol (:mod:`lightning_ood.protocol`: ID =
  positive, the papers' convention), logs metrics and figures to TensorBoard, and writes the
  tables with :mod:`lightning_ood.report`.

The fitting, scoring and calibration themselves are :mod:`lightning_ood.engine`'s; this module
only supplies the trainer's loaders, device and cross-rank reductions.
"""

from __future__ import annotations

import json
import os
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
from lightning_ood.data.samplers import unshard
from lightning_ood.detectors import Detector, LINe, Reducer, build_detectors
from lightning_ood.detectors.line import activated_neuron_counts
from lightning_ood.io import atomic_write_text
from lightning_ood.metrics import METRIC_NAMES
from lightning_ood.models import BackboneOutput
from lightning_ood.protocol import (
    CONVENTION,
    check_holdout,
    evaluate_detectors,
    fixed_combiners,
    holds_out,
)

TUNE_KEYS = ("detectors", "select", "seed", "combiner_fraction")


def _check_tune(tune: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate the ``tune`` option at config time and fill its defaults."""
    if tune is None:
        return None
    if not isinstance(tune, dict):
        raise ValueError(f"tune must be a mapping with keys {list(TUNE_KEYS)}, got {tune!r}")
    unknown = sorted(set(tune) - set(TUNE_KEYS))
    if unknown:
        raise ValueError(f"tune: unknown keys {unknown}; allowed: {list(TUNE_KEYS)}")
    out = {"detectors": None, "select": "auroc", "seed": 0, "combiner_fraction": 0.5, **tune}
    if out["select"] not in METRIC_NAMES:
        raise ValueError(f"tune.select={out['select']!r} is not one of {list(METRIC_NAMES)}")
    dets = out["detectors"]
    if isinstance(dets, list | tuple):
        dets = dict.fromkeys(dets)
    if dets is not None and not isinstance(dets, dict):
        raise ValueError(f"tune.detectors must map detector names to grids, got {dets!r}")
    out["detectors"] = dets
    if not 0.0 < float(out["combiner_fraction"]) < 1.0:
        raise ValueError(
            f"tune.combiner_fraction must lie in (0, 1), got {out['combiner_fraction']}"
        )
    return out


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


def fit_with_trainer(
    trainer: Trainer,
    pl_module: LightningModule,
    detectors: Sequence[Detector],
    progress: bool = True,
) -> None:
    """Fit ``detectors`` together from ONE eval-mode pass over the training set
    (:func:`lightning_ood.engine.fit_from_loader`).

    The training set is read through ``datamodule.fit_dataloader()`` (eval transform, no
    augmentation; under DDP each rank reads its unpadded shard, so no sample enters the
    detector sums twice); the sums are all-reduced with the trainer's strategy.
    """
    if not detectors:
        return
    readers = [d for d in detectors if engine.reads_training_data(d)]
    loader = None
    if readers:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "fit_dataloader"):
            raise RuntimeError(
                f"detectors {[d.name for d in readers]} need a pass over the training set, "
                "but the trainer has no datamodule with fit_dataloader(); pass an "
                "OODDataModule (--data ...)."
            )
        loader = dm.fit_dataloader()
    engine.fit_from_loader(
        detectors,
        pl_module.backbone,
        loader,
        StrategyReducer(trainer),
        progress=progress and trainer.global_rank == 0,
    )


def calibrate_with_trainer(
    trainer: Trainer,
    pl_module: LightningModule,
    detectors: Sequence[Detector],
    tpr: float = 0.95,
    progress: bool = True,
) -> None:
    """Make every detector deployable: the combiner a layer ensemble ships, then each
    detector's decision threshold (``tpr`` of held-out ID samples are called ID).

    Scores the datamodule's ID validation loader (the ``val_size`` hold-out of the training
    set, or the ID test set when ``val_size`` is 0, as in the reference scripts) with one
    forward pass per batch for all detectors; the scores of all ranks are pooled. A layer
    ensemble with several components first gets its shipped combiner from that data and the
    validation OOD sets (``val_ood_sets``, never reported), or the OOD-free fallback without
    them (:func:`lightning_ood.engine.deploy_combiners`); its threshold is calibrated on that
    combined score, the one ``lightning_ood.load()`` returns. What was fitted is recorded in
    ``pl_module.shipped_combiners`` (saved in the checkpoint and the results).
    """
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
    dets = {d.name: d for d in detectors}
    show = progress and trainer.global_rank == 0

    def pooled(loader: Any, chosen: dict[str, Detector], desc: str) -> dict[str, Tensor]:
        """Every rank's scores (or components) of ``loader``, in dataset order."""
        local = engine.score_loader(
            chosen, pl_module.backbone, loader, components=True, progress=show, desc=desc
        )
        return {n: in_dataset_order(s, trainer).cpu() for n, s in local.items()}

    id_bank = pooled(dm.val_dataloader(), dets, "Calibrating thresholds")
    ensembles = {n: d for n, d in dets.items() if engine.ships_combiner(d, id_bank[n])}
    if ensembles:
        val_ood = dm.val_ood_dataloaders() if hasattr(dm, "val_ood_dataloaders") else {}
        ood_bank: dict[str, Tensor] | None = None
        proxy_bank: dict[str, Tensor] | None = None
        if val_ood:
            parts = [pooled(loader, ensembles, f"combiner {k}") for k, loader in val_ood.items()]
            ood_bank = {n: torch.cat([p[n] for p in parts]) for n in ensembles}
        elif getattr(pl_module.backbone, "input_kind", "image") == "image":
            std = (dm.hand_off_meta() if hasattr(dm, "hand_off_meta") else {}).get("std")
            adversarial = engine.fgsm_batches(
                pl_module.backbone, dm.val_dataloader(), input_std=std
            )
            proxy_bank = pooled(adversarial, ensembles, "combiner FGSM proxy")
        how = engine.deploy_combiners(ensembles, id_bank, ood_bank, proxy_bank)
        id_source = (
            "ID test set (data.val_size 0)"
            if int(getattr(dm, "val_size", 0) or 0) <= 0
            else "held-out training images (data.val_size)"
        )
        record = getattr(pl_module, "shipped_combiners", None)
        if isinstance(record, dict):
            for n, h in how.items():
                record[n] = {**h, "id_data": id_source, "ood_sets": sorted(val_ood)}
        rank_zero_info(
            "[lightning_ood] shipped combiners: "
            + "; ".join(
                f"{n}: {h['method']} on {h['n_id']} ID + {h['n_ood']} "
                + (f"validation OOD ({', '.join(sorted(val_ood))})" if val_ood else "proxy")
                for n, h in how.items()
            )
        )
    engine.calibrate_detectors(dets, engine.combined_scores(dets, id_bank), tpr)


class OODEvaluation(Callback):
    """Fit and evaluate post-hoc OOD detectors.

    Args:
        detectors: ``{name: {type: kind, **hyperparameters}}``; ``type`` defaults to the name,
            e.g. ``{"energy": {}, "line": {"delta": 1.0, "p_a": 90, "p_w": 90}}``. ``None``
            keeps whatever the model already carries (e.g. from its checkpoint).
        fit_after_train: fit the detectors in ``on_train_end`` and re-save ``last.ckpt``.
        validation_size: per test set, samples held out (seeded) to fit the combiners of
            layer ensembles with more than one tap (FSSD, Mahalanobis); those detectors are
            reported on the rest, every other detector on every sample, so adding or removing
            a detector never changes another's numbers. Checked against the set sizes and the
            combiners' needs before any pass over the data.
        validation_seed: seed of the held-out permutation (the FSSD reference uses 42).
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
            names, ``validation_size`` and ``validation_seed``) whose per-set combiners are
            loaded instead of fitted on this run's hold-out: with ``data.test_corruption``,
            the combiners stay those of clean data, as the FSSD paper's Figure 5 tunes on
            clean data only. ``None``: fit them here.
    """

    def __init__(
        self,
        detectors: dict[str, dict[str, Any] | None] | None = None,
        fit_after_train: bool = True,
        validation_size: int = 500,
        validation_seed: int = 42,
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
    ) -> None:
        super().__init__()
        self.tune = _check_tune(tune)
        self.figures = figures
        self.activated_neurons = activated_neurons
        self.activated_thresholds = activated_thresholds
        self._act: list[list[Tensor]] = []
        self.tuning: dict[str, Any] = {}
        if validation_size < 0:
            raise ValueError(f"validation_size must be >= 0, got {validation_size}")
        if not 0.0 < threshold_tpr <= 1.0:
            raise ValueError(f"threshold_tpr must lie in (0, 1], got {threshold_tpr}")
        self.refit = refit
        self.threshold_tpr = threshold_tpr
        self.save_fitted = save_fitted
        self.detector_specs = detectors
        self.fit_after_train = fit_after_train
        self.validation_size = validation_size
        self.validation_seed = validation_seed
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
        self._bank: dict[str, list[list[Tensor]]] = {}
        if detectors is not None:  # fail at config time, not after an hour of training
            build_detectors(detectors)

    # -- attach ------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.detector_specs is not None:
            pl_module.set_detectors(self.detector_specs)
        dm = trainer.datamodule
        if stage == "fit" and self.fit_after_train and hasattr(dm, "fit_dataloader"):
            num_train = len(dm.fit_dataloader().dataset)  # refused before any training step
            for det in pl_module.detectors.values():
                det.check_data(num_train)
        if stage == "test":
            self._check_holdout(trainer, pl_module)
            if self.combiners_from is not None:
                self._fixed_combiners = self._load_combiners(self.combiners_from)
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
            if holds_out(pl_module.detectors[n], k, self.validation_size)
        }

    def _load_combiners(self, path: str) -> dict[str, Any]:
        """The ``combiners`` record of an earlier run, refused unless its hold-out is ours."""
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(
                f"combiners_from={path!r} does not exist; give the ood_results.json of the run "
                "whose combiners to reuse (e.g. the same model's run on clean data)"
            )
        fix = (
            "give the ood_results.json that `lightning-ood test` wrote for the run whose "
            "combiners to reuse, unedited"
        )
        try:
            record = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"combiners_from={path!r} is not JSON ({err}); {fix}") from err
        combiners = record.get("combiners") if isinstance(record, dict) else None
        held = record.get("validation") if isinstance(record, dict) else None
        if not isinstance(combiners, dict) or not isinstance(held, dict):
            raise ValueError(
                f"combiners_from={path!r} is not an ood_results.json of lightning-ood test "
                "(it needs a 'combiners' and a 'validation' mapping); " + fix
            )
        for key, kind in (("held_out_per_set", "an integer >= 0"), ("seed", "an integer")):
            value = held.get(key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or (key != "seed" and value < 0)
            ):
                raise ValueError(
                    f"combiners_from={path!r}: validation.{key} must be {kind}, got {value!r}; "
                    + fix
                )
        ours = (self.validation_size, self.validation_seed)
        theirs = (held.get("held_out_per_set"), held.get("seed"))
        if not theirs[0]:
            raise ValueError(
                f"combiners_from={path!r} held out no samples, so it fitted no per-set "
                "combiners: give a run of layer ensembles with validation_size > 0"
            )
        if theirs != ours:
            raise ValueError(
                f"combiners_from={path!r} held out {theirs[0]} samples per set with seed "
                f"{theirs[1]}, this run validation_size={ours[0]}, validation_seed={ours[1]}: "
                "set them to the earlier run's, so that its combiners see none of the samples "
                "reported here"
            )
        return combiners

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
        check_holdout(sizes, self.validation_size, dets)

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
        n_sets = len(self._test_set_names(trainer))
        self._bank = {name: [[] for _ in range(n_sets)] for name in pl_module.detectors}
        self._act = [[] for _ in range(n_sets)]

    def _tune(self, trainer: Trainer, pl_module: LightningModule) -> list[Detector]:
        """Select the tuned detectors' hyperparameters on validation data (see ``tune``);
        the selected, fitted detectors replace the configured ones. Returns every detector
        this fitted: the selections and the untuned ones that shared its training pass."""
        assert self.tune is not None
        self.tuning = {}  # this test run's selections only
        dm = trainer.datamodule
        backbone = pl_module.backbone
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
        wanted = self.tune["detectors"]
        auto = wanted is None  # every declared search space: skip what this backbone rules out
        if wanted is None:
            wanted = {n: None for n, d in dets.items() if type(d).search_space}
        missing = sorted(set(wanted) - set(dets))
        if missing:
            raise ValueError(f"tune: detectors {missing} are not configured; known: {sorted(dets)}")
        searches = [
            tuning.plan(n, dets[n].kind, space, dets[n].config()) for n, space in wanted.items()
        ]
        if not searches:
            rank_zero_warn(
                "[lightning_ood] tune: nothing to tune (tune.detectors is empty, or no configured "
                "detector declares a search space)"
            )
            return []
        candidates = [c for s in searches for c in s.candidates]
        grads = [c.name for c in candidates if c.needs_input_grad]
        if grads and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"tune candidates {grads[:3]} need input gradients; set "
                "`trainer.inference_mode: false` (the lightning-ood CLI default)."
            )
        for c in candidates:
            c.to(pl_module.device)
        rank_zero_info(
            "[lightning_ood] tune: "
            + ", ".join(f"{s.name} over {len(s.candidates)} configurations" for s in searches)
            + f"; selecting by validation {self.tune['select']} on the ID validation split and "
            f"{sorted(val_ood)}"
        )
        # Detectors not tuned but unfitted share the candidates' single training pass.
        others = [] if not self.refit else [d for n, d in dets.items() if n not in wanted]
        others += [
            d for n, d in dets.items() if n not in wanted and not d.is_fitted and d not in others
        ]
        for d in others:
            d.mark_unfitted()
        readers = [*candidates, *others]
        source = None
        if any(engine.reads_training_data(d) for d in readers):
            source = engine.loader_source(
                backbone,
                dm.fit_dataloader(),
                readers,
                progress=self.progress and trainer.global_rank == 0,
            )
        reducer = StrategyReducer(trainer)
        with engine.eval_mode(backbone):
            fitted, _, invalid = tuning.fit_candidates(
                candidates, backbone, source, reducer, others=others
            )
        loaders = {tuning.ID_KEY: dm.val_dataloader(), **val_ood}
        cache: dict[bool, dict[str, dict[str, Tensor]]] = {}

        def score(chosen: Any, components: bool) -> dict[str, dict[str, Tensor]]:
            if components not in cache:  # one pass per loader for every candidate at once
                pool = {d.name: d for d in fitted if tuning.combines(d, backbone) == components}
                cache[components] = {
                    key: {
                        n: in_dataset_order(v, trainer)
                        for n, v in engine.score_loader(
                            pool, backbone, loader, components=components, desc=f"tune {key}"
                        ).items()
                    }
                    for key, loader in loaders.items()
                }
            return {k: {n: v[n] for n in chosen} for k, v in cache[components].items()}

        validation = tuning.Validation(
            score,
            tuning.ID_KEY,
            backbone,
            seed=self.tune["seed"],
            combiner_fraction=self.tune["combiner_fraction"],
        )
        selected: list[Detector] = []
        val_n = {k: 0 for k in loaders}
        for srch in searches:
            mine = {c.name for c in srch.candidates}
            cands = [d for d in fitted if d.name in mine]
            if not cands:
                why = f"every configuration is invalid for this backbone, e.g. {invalid[min(mine)]}"
                if not auto:
                    raise ValueError(f"tune: {srch.name!r}: {why}; give it a valid grid")
                rank_zero_warn(f"[lightning_ood] tune: {srch.name!r} keeps its values: {why}")
                self.tuning[srch.name] = {"kind": srch.kind, "space": srch.space, "skipped": why}
                continue
            rows, best = tuning.select(
                srch, cands, validation.metrics(cands), self.tune["select"], backbone, invalid
            )
            det = tuning.detector_of(srch, cands, best)
            det.name = srch.name
            pl_module.replace_detector(srch.name, det)
            selected.append(det)
            self.tuning[srch.name] = {
                "kind": srch.kind,
                "space": srch.space,
                "selected": rows[best]["params"],
                "val_mean": rows[best]["val_mean"],
                "rows": [
                    {k: r[k] for k in ("params", "val_mean", "invalid") if k in r} for r in rows
                ],
            }
        for key, per in cache.get(False, cache.get(True, {})).items():
            val_n[key] = len(next(iter(per.values()))) if per else 0
        self.tuning_meta = {
            "select": self.tune["select"],
            "id_validation": f"{val_n[tuning.ID_KEY]} held-out training samples (data.val_size)",
            "val_ood_sets": {k: val_n[k] for k in val_ood},
            "seed": self.tune["seed"],
            "combiner_fraction": self.tune["combiner_fraction"],
        }
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
        return [*selected, *others]

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
        scores = engine.score_batch(
            pl_module.detectors, outputs, pl_module.backbone, batch[0], components=True
        )
        for name, s in scores.items():
            self._bank[name][dataloader_idx].append(s.detach().to("cpu", torch.float64))
        if self.activated_neurons:
            counts = activated_neuron_counts(outputs.features, self._thresholds(pl_module))
            self._act[dataloader_idx].append(counts.cpu())

    def _thresholds(self, pl_module: LightningModule) -> list[float]:
        """Activation thresholds of the neuron counts: given, else 0 and the first LINe's δ."""
        if self.activated_thresholds is not None:
            return [float(t) for t in self.activated_thresholds]
        lines = [d for d in pl_module.detectors.values() if isinstance(d, LINe)]
        return [0.0, float(lines[0].delta) if lines else 1.0]

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

    def _gather(self, chunks: list[Tensor], trainer: Trainer, det: Detector) -> Tensor:
        """This rank's scores of one set, gathered over ranks in dataset order (a rank that
        saw no batch of a tiny set contributes an empty tensor of the right shape)."""
        backbone = trainer.lightning_module.backbone
        tail = (len(det.component_names(backbone)),) if det.needs_validation else ()
        t = torch.cat(chunks) if chunks else torch.empty(0, *tail, dtype=torch.float64)
        return in_dataset_order(t, trainer)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        names = self._test_set_names(trainer)
        dets = dict(pl_module.detectors.items())
        banks = {n: [self._gather(c, trainer, dets[n]) for c in self._bank[n]] for n in dets}
        evaluation = evaluate_detectors(
            dets,
            banks,
            names,
            validation_size=self.validation_size,
            seed=self.validation_seed,
            warn=lambda msg: rank_zero_warn(f"[lightning_ood] {msg}"),
            combiners=self._fixed_combiners,
            combiners_source=f"combiners_from={self.combiners_from!r}",
        )
        self.results = {
            "id_set": names[0],
            "data_version": getattr(trainer.datamodule, "data_version", names[0]),
            "model": pl_module.hparams.get("model"),
            "convention": CONVENTION,
            "validation": {
                "held_out_per_set": evaluation.held_out_per_set,
                "held_out_for": evaluation.held_out_for,
                "seed": self.validation_seed,
                "combiners_from": self.combiners_from,
            },
            "detectors": {n: d.config() for n, d in dets.items()},
            "thresholds": {
                n: {"value": float(d.threshold), "id_tpr": float(d.threshold_tpr)}
                for n, d in dets.items()
            },
            "combiners": evaluation.combiners,
            "shipped_combiners": {
                n: dict(r)
                for n, r in getattr(pl_module, "shipped_combiners", {}).items()
                if n in dets
            },
            "metrics": evaluation.metrics,
        }
        if self.tuning:
            self.results["tuning"] = {"protocol": self.tuning_meta, "detectors": self.tuning}
        if hasattr(pl_module, "reported"):  # the shipped rows go into the checkpoint's card
            pl_module.reported = card.reported_of(self.results, list(dets))
        if self._fitted_path:  # re-saved: its card now holds these rows
            trainer.save_checkpoint(self._fitted_path)
        severity = report.severity_summary(evaluation.metrics, "auroc")
        if severity:
            self.results["severity"] = {"metric": "auroc", "detectors": severity}
        lines = {n: d for n, d in dets.items() if isinstance(d, LINe) and d.is_fitted}
        overlap = {n: d.top_neuron_overlap() for n, d in lines.items()}
        if overlap:
            self.results["neuron_overlap"] = overlap
        act_counts: dict[str, Tensor] = {}
        if self.activated_neurons:
            thresholds = self._thresholds(pl_module)
            act_counts = {
                n: in_dataset_order(
                    torch.cat(c) if c else torch.empty(0, len(thresholds), dtype=torch.long),
                    trainer,
                )
                for n, c in zip(names, self._act, strict=True)
            }
            self.results["activated_neurons"] = report.activated_neurons_summary(
                act_counts, thresholds
            )
        # Straight to the loggers (rank 0): through `self.log` these ~50 scalars per detector
        # would also flood Lightning's end-of-test printout, which comes after our table.
        flat = {
            f"ood/{dname}/{ood}/{m}": float(v)
            for dname, per_set in evaluation.metrics.items()
            for ood, vals in per_set.items()
            for m, v in vals.items()
            if m in METRIC_NAMES
        }
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
            writer = tb[0].experiment if tb else None
            if self.figures:
                layers = {
                    n: (
                        d.component_names(pl_module.backbone),
                        dict(zip(names, banks[n], strict=True)),
                    )
                    for n, d in dets.items()
                    if d.needs_validation and len(d.component_names(pl_module.backbone)) > 1
                }
                report.write_figures(
                    out_dir,
                    writer,
                    trainer.global_step,
                    evaluation.scores,
                    {n: float(d.threshold) for n, d in dets.items()},
                    layers,
                    severity,
                )
            if act_counts:
                report.log_activated_neurons(
                    writer,
                    act_counts,
                    self._thresholds(pl_module),
                    pl_module.backbone.num_features,
                    trainer.global_step,
                    out_dir=out_dir / "figures",
                )
            if overlap:
                report.write_results(
                    out_dir,
                    "neuron_overlap",
                    {"neuron_overlap": overlap},
                    report.format_neuron_overlap(overlap),
                )
                atomic_write_text(
                    out_dir / "neuron_overlap.csv", report.format_neuron_overlap_csv(overlap)
                )
            report.write_results(
                out_dir,
                "ood_results",
                self.results,
                report.format_markdown(self.results),
                self.results["metrics"],
            )
            self._out_dir = out_dir

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # After Lightning's own results printout, so the OOD table ends the terminal output.
        if stage == "test" and self.results and trainer.is_global_zero:
            print("\n" + report.format_markdown(self.results))
            print(f"[lightning_ood] results written to {self._out_dir}/ood_results.{{md,csv,json}}")
