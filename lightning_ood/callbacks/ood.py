"""The OOD callback: decides *when* detectors are fitted and scored; detectors decide *what*.

* after ``fit`` (``on_train_end``, model still on its device, DDP alive) it fits every
  detector in one eval-transform pass over the training set and re-saves ``last.ckpt``;
* at test start it fits whatever the checkpoint holds no fitted state for, and says so;
* per test batch it scores every detector from the task's single forward pass;
* at test end it computes the metrics (ID = positive, the papers' convention), logs them to
  TensorBoard with score histograms and ROC curves, and writes Markdown/CSV/JSON tables.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors
from tqdm import tqdm

from lightning_ood.data.samplers import unshard
from lightning_ood.detectors import Detector, Reducer, build_detectors
from lightning_ood.metrics import METRIC_NAMES, OODMetrics
from lightning_ood.models import BackboneOutput

#: Column headers of the printed/Markdown table; every FPR names its positive class.
_HEADERS = {
    "fpr95": "FPR95↓ (ID+)",
    "fpr80": "FPR80↓ (ID+)",
    "auroc": "AUROC↑",
    "aupr_in": "AUPR-In↑",
    "aupr_out": "AUPR-Out↑",
    "detection_acc": "DetAcc↑",
    "fpr95_oodpos": "FPR95↓ (OOD+)",
}


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


def fit_detectors(
    trainer: Trainer,
    pl_module: LightningModule,
    detectors: Sequence[Detector],
    progress: bool = True,
) -> None:
    """Fit ``detectors`` together from ONE eval-mode pass over the training set.

    The training set is read through ``datamodule.fit_dataloader()`` (eval transform, no
    augmentation; under DDP each rank reads its unpadded shard, so no sample enters the
    detector sums twice); every batch goes through the backbone once and feeds every detector.
    """
    if not detectors:
        return
    backbone = pl_module.backbone
    data_dets = [d for d in detectors if d.uses_training_data]
    was_training = pl_module.training
    pl_module.eval()
    for det in detectors:
        det.reset()
    if data_dets:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "fit_dataloader"):
            raise RuntimeError(
                f"detectors {[d.name for d in data_dets]} need a pass over the training set, "
                "but the trainer has no datamodule with fit_dataloader(); pass an "
                "OODDataModule (--data ...)."
            )
        loader = dm.fit_dataloader()
        taps = tuple(dict.fromkeys(t for d in data_dets for t in d.taps))
        names = ", ".join(d.name for d in data_dets)
        bar = tqdm(
            loader,
            desc=f"Fitting detectors ({names})",
            disable=not progress or trainer.global_rank != 0,
            leave=False,
        )
        with torch.no_grad():
            for x, y in bar:
                x = x.to(pl_module.device)
                y = y.to(pl_module.device)
                out = backbone.extract(x, taps=taps)
                for det in data_dets:
                    det.update(out, y, backbone)
    reducer = StrategyReducer(trainer)
    for det in detectors:
        det.finalize(backbone, reducer)
    pl_module.train(was_training)


def calibrate_detectors(
    trainer: Trainer,
    pl_module: LightningModule,
    detectors: Sequence[Detector],
    tpr: float = 0.95,
    progress: bool = True,
) -> None:
    """Give every detector its decision threshold: ``tpr`` of held-out ID samples are called ID.

    Scores the datamodule's ID validation loader (the ``val_size`` hold-out of the training
    set, or the ID test set when ``val_size`` is 0, as in the reference scripts) with one
    forward pass per batch for all detectors; the scores of all ranks are pooled.
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
    was_training = pl_module.training
    pl_module.eval()
    taps = tuple(dict.fromkeys(t for d in detectors for t in d.taps))
    chunks: dict[str, list[Tensor]] = {d.name: [] for d in detectors}
    bar = tqdm(
        dm.val_dataloader(),
        desc="Calibrating thresholds",
        disable=not progress or trainer.global_rank != 0,
        leave=False,
    )
    with torch.no_grad():
        for x, _ in bar:
            x = x.to(pl_module.device)
            out = pl_module.backbone.extract(x, taps=taps)
            for det in detectors:
                s = (
                    det.score(out, pl_module.backbone, x)
                    if det.needs_input_grad
                    else det.score(out)
                )
                chunks[det.name].append(s.detach().double())
    reducer = StrategyReducer(trainer)
    for det in detectors:
        local = torch.cat(chunks[det.name]) if chunks[det.name] else torch.zeros(0).double()
        det.calibrate(reducer.cat(local.to(pl_module.device)).cpu(), tpr)
    pl_module.train(was_training)


class OODEvaluation(Callback):
    """Fit and evaluate post-hoc OOD detectors.

    Args:
        detectors: ``{name: {type: kind, **hyperparameters}}``; ``type`` defaults to the name,
            e.g. ``{"energy": {}, "line": {"delta": 1.0, "p_a": 90, "p_w": 90}}``. ``None``
            keeps whatever the model already carries (e.g. from its checkpoint).
        fit_after_train: fit the detectors in ``on_train_end`` and re-save ``last.ckpt``.
        validation_size: per test set, samples held out (seeded) to fit layer-ensemble
            combiners (FSSD, Mahalanobis). Held-out samples are never reported, for any
            detector, so every row of the table is scored on the same samples. Only used when
            a configured detector needs validation data.
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
    ) -> None:
        super().__init__()
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

    # -- fitting -----------------------------------------------------------------------------
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.fit_after_train or not pl_module.detectors:
            return
        dets = list(pl_module.detectors.values())
        for det in dets:
            det.fitted.fill_(not det.requires_fit)
        rank_zero_info(
            f"[lightning_ood] fitting detectors after training: {[d.name for d in dets]}"
        )
        fit_detectors(trainer, pl_module, dets, self.progress)
        calibrate_detectors(trainer, pl_module, dets, self.threshold_tpr, self.progress)
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None and getattr(ckpt_cb, "dirpath", None):
            path = ckpt_cb.last_model_path or os.path.join(ckpt_cb.dirpath, "last.ckpt")
            trainer.save_checkpoint(path)
            rank_zero_info(f"[lightning_ood] saved the fitted detectors into {path}")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        grad_dets = [n for n, d in pl_module.detectors.items() if d.needs_input_grad]
        if grad_dets and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"detectors {grad_dets} need input gradients in the test loop; set "
                "`trainer.inference_mode: false` (the lightning-ood CLI default)."
            )
        if self.refit:
            unfitted = list(pl_module.detectors.values())
            for det in unfitted:
                det.fitted.fill_(not det.requires_fit)
            rank_zero_info("[lightning_ood] refit: true; refitting every detector.")
        else:
            unfitted = pl_module.unfitted_detectors()
            if unfitted:
                rank_zero_info(
                    "[lightning_ood] the checkpoint holds no fitted state for detectors "
                    f"{[d.name for d in unfitted]}; fitting them now with one pass over the "
                    "training set."
                )
        if unfitted:
            fit_detectors(trainer, pl_module, unfitted, self.progress)
        uncalibrated = [d for d in pl_module.detectors.values() if not d.is_calibrated]
        if uncalibrated or unfitted:
            todo = list(dict.fromkeys([*unfitted, *uncalibrated]))
            calibrate_detectors(trainer, pl_module, todo, self.threshold_tpr, self.progress)
            self._save_fitted(trainer)
        n_sets = len(self._test_set_names(trainer))
        self._bank = {name: [[] for _ in range(n_sets)] for name in pl_module.detectors}

    def _save_fitted(self, trainer: Trainer) -> None:
        ckpt_cb = trainer.checkpoint_callback
        dirpath = getattr(ckpt_cb, "dirpath", None)
        if not self.save_fitted or not dirpath:
            return
        path = os.path.join(dirpath, "fitted.ckpt")
        trainer.save_checkpoint(path)
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
        x = batch[0]
        for name, det in pl_module.detectors.items():
            if det.needs_validation:
                s = det.score_components(outputs, pl_module.backbone, x)
            else:
                s = det.score(outputs, pl_module.backbone, x)
            self._bank[name][dataloader_idx].append(s.detach().to("cpu", torch.float64))

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

    def _gather(self, chunks: list[Tensor], trainer: Trainer) -> Tensor:
        """This rank's scores of one set, gathered over ranks and put back in dataset order
        (the loaders shard with :class:`EvalShardedSampler`: no padding, nothing counted
        twice, and the seeded validation split picks the same samples on any world size)."""
        t = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.float64)
        if trainer.world_size > 1:
            parts = gather_all_tensors(t.to(trainer.strategy.root_device))
            t = unshard([g.cpu() for g in parts])
        return t

    def _split(self, n: int, set_name: str) -> tuple[Tensor, Tensor]:
        """Seeded (validation, reported) index split of one test set."""
        g = torch.Generator().manual_seed(self.validation_seed)
        perm = torch.randperm(n, generator=g)
        v = self.validation_size
        if n <= v:
            raise ValueError(
                f"test set {set_name!r} has {n} samples but validation_size={v} are held out "
                "for the layer-ensemble fit; lower `validation_size` or use more samples."
            )
        return perm[:v], perm[v:]

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        names = self._test_set_names(trainer)
        id_name, ood_names = names[0], names[1:]
        dets = dict(pl_module.detectors.items())
        banks = {n: [self._gather(c, trainer) for c in self._bank[n]] for n in dets}
        sizes = [len(t) for t in next(iter(banks.values()))] if banks else []
        for set_name, n in zip(names, sizes, strict=True):
            if n == 0:
                raise ValueError(
                    f"test set {set_name!r} produced no samples; check its path/subset"
                )
        holdout = self.validation_size > 0 and any(d.needs_validation for d in dets.values())
        splits = [
            self._split(n, s) if holdout else (None, None)
            for s, n in zip(names, sizes, strict=True)
        ]

        def reported(t: Tensor, i: int) -> Tensor:
            return t if splits[i][1] is None else t[splits[i][1]]

        results: dict[str, dict[str, dict[str, float]]] = {}
        scores: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
        combiners: dict[str, dict[str, Any]] = {}
        # Per-OOD-set combiners are an evaluation protocol; the model keeps its own.
        deployed = {
            n: {k: b.clone() for k, b in d.named_buffers() if k.startswith("combiner_")}
            for n, d in dets.items()
        }
        for dname, det in dets.items():
            results[dname], scores[dname] = {}, {}
            for j, ood in enumerate(ood_names, start=1):
                comp_id, comp_ood = banks[dname][0], banks[dname][j]
                if det.needs_validation:
                    if holdout:
                        det.fit_combiner(comp_id[splits[0][0]], comp_ood[splits[j][0]])
                        combiners.setdefault(dname, {})[ood] = _combiner_state(det)
                    s_id = det.combine(reported(comp_id, 0))
                    s_ood = det.combine(reported(comp_ood, j))
                else:
                    s_id, s_ood = reported(comp_id, 0), reported(comp_ood, j)
                scores[dname][ood] = (s_id, s_ood)
                results[dname][ood] = _evaluate(dname, ood, s_id, s_ood)
            results[dname]["average"] = {
                m: _nanmean([results[dname][o][m] for o in ood_names]) for m in METRIC_NAMES
            }
            for k, b in deployed[dname].items():
                setattr(det, k, b)
        self.results = {
            "id_set": id_name,
            "data_version": getattr(trainer.datamodule, "data_version", id_name),
            "model": pl_module.hparams.get("model"),
            "convention": "higher score = more in-distribution; ID is the positive class "
            "for FPR/AUPR-In (the papers' convention); fpr95_oodpos uses OOD as positive",
            "validation": {
                "held_out_per_set": self.validation_size if holdout else 0,
                "seed": self.validation_seed,
            },
            "detectors": {n: d.config() for n, d in dets.items()},
            "thresholds": {
                n: {"value": float(d.threshold), "id_tpr": float(d.threshold_tpr)}
                for n, d in dets.items()
            },
            "combiners": combiners,
            "metrics": results,
        }
        # Straight to the loggers (rank 0): through `self.log` these ~50 scalars per detector
        # would also flood Lightning's end-of-test printout, which comes after our table.
        flat = {
            f"ood/{dname}/{ood}/{m}": float(v)
            for dname, per_set in results.items()
            for ood, vals in per_set.items()
            for m, v in vals.items()
            if m in METRIC_NAMES
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=trainer.global_step)
                logger.save()
        self._log_figures(trainer, scores)
        # trainer.log_dir broadcasts under DDP: every rank must ask for it
        out_dir = Path(self.results_dir or trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self._write_tables(out_dir)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # After Lightning's own results printout, so the OOD table ends the terminal output.
        if stage == "test" and self.results and trainer.is_global_zero:
            print("\n" + format_markdown(self.results))
            print(f"[lightning_ood] results written to {self._out_dir}/ood_results.{{md,csv,json}}")

    # -- reporting ---------------------------------------------------------------------------
    def _log_figures(
        self, trainer: Trainer, scores: dict[str, dict[str, tuple[Tensor, Tensor]]]
    ) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        tb = loggers[0].experiment
        step = trainer.global_step
        for dname, per_set in scores.items():
            finite = {
                o: (a[torch.isfinite(a)], b[torch.isfinite(b)]) for o, (a, b) in per_set.items()
            }
            if self.log_histograms:
                first = next(iter(finite.values()))[0]
                if len(first):
                    tb.add_histogram(f"ood_scores/{dname}/ID", first, step)
                for ood, (_, s_ood) in finite.items():
                    if len(s_ood):
                        tb.add_histogram(f"ood_scores/{dname}/{ood}", s_ood, step)
            if self.log_roc:
                tb.add_figure(f"ood_roc/{dname}", _roc_figure(dname, finite), step)

    def _write_tables(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        md = format_markdown(self.results)
        _atomic_write(out_dir / "ood_results.md", md)
        _atomic_write(out_dir / "ood_results.json", json.dumps(self.results, indent=2, default=str))
        _atomic_write(out_dir / "ood_results.csv", format_csv(self.results))
        self._out_dir = out_dir


def _combiner_state(det: Detector) -> dict[str, Any]:
    """The fitted layer-ensemble weights (``combiner_*`` buffers), for the results JSON."""
    return {k: v.tolist() for k, v in det.named_buffers() if k.startswith("combiner_")}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if len(finite) == len(values) and finite else math.nan


def _evaluate(detector: str, ood: str, s_id: Tensor, s_ood: Tensor) -> dict[str, float]:
    """Metrics for one (detector, OOD set); non-finite scores are reported, never folded in."""
    bad_id = int((~torch.isfinite(s_id)).sum())
    bad_ood = int((~torch.isfinite(s_ood)).sum())
    counts = {
        "n_id": len(s_id),
        "n_ood": len(s_ood),
        "nonfinite_id": bad_id,
        "nonfinite_ood": bad_ood,
    }
    if bad_id or bad_ood:
        rank_zero_warn(
            f"[lightning_ood] detector {detector!r} produced non-finite scores on {ood!r}: "
            f"{bad_id} of {len(s_id)} ID and {bad_ood} of {len(s_ood)} OOD; its metrics for "
            "this set are reported as NaN."
        )
        return {**dict.fromkeys(METRIC_NAMES, math.nan), **counts}
    metric = OODMetrics()
    metric.update(s_id, True)
    metric.update(s_ood, False)
    return {**{k: float(v) for k, v in metric.compute().items()}, **counts}


def _roc_figure(detector: str, per_set: Mapping[str, tuple[Tensor, Tensor]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_ood.metrics.functional import roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for ood, (s_id, s_ood) in per_set.items():
        if len(s_id) and len(s_ood):
            fpr, tpr = roc_curve(s_id, s_ood)
            ax.plot(fpr.numpy(), tpr.numpy(), label=ood)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("FPR (OOD scored as ID)")
    ax.set_ylabel("TPR (ID kept)")
    ax.set_title(f"ROC, {detector} (ID positive)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def format_markdown(results: Mapping[str, Any]) -> str:
    """The results table, metrics in %, every FPR column naming its positive class."""
    lines = [
        f"### OOD detection: ID = {results['id_set']} ({results['data_version']}), "
        f"model = {results['model']}",
        "",
        "Values in %. " + results["convention"] + ".",
        "",
        "| detector | OOD set | " + " | ".join(_HEADERS[m] for m in METRIC_NAMES) + " |",
        "|---|---|" + "---:|" * len(METRIC_NAMES),
    ]
    for dname, per_set in results["metrics"].items():
        for ood, vals in per_set.items():
            if ood == "average" and len(per_set) == 2:  # one OOD set: the average repeats it
                continue
            cells = [
                f"{100 * vals[m]:.2f}" if not math.isnan(vals[m]) else "nan" for m in METRIC_NAMES
            ]
            label = f"**{ood}**" if ood == "average" else ood
            lines.append(f"| {dname} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_csv(results: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    extra = ["n_id", "n_ood", "nonfinite_id", "nonfinite_ood"]
    writer.writerow(["detector", "ood_set", *METRIC_NAMES, *extra])
    for dname, per_set in results["metrics"].items():
        for ood, vals in per_set.items():
            writer.writerow(
                [dname, ood, *(vals[m] for m in METRIC_NAMES), *(vals.get(k, "") for k in extra)]
            )
    return buf.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so no half-written table is ever left."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
