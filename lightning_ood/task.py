"""The one LightningModule: trains any registered backbone and carries the detectors.

Detectors are sub-modules (``self.detectors``), so their fitted buffers land in every
checkpoint and come back with ``load_from_checkpoint``; their config lives in
``hparams["detectors"]`` so a bare ``load_from_checkpoint`` can rebuild them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_ood import engine
from lightning_ood.detectors import Detector, build_detectors
from lightning_ood.io import CheckpointError, safe_load
from lightning_ood.models import BackboneOutput, OODBackbone, create_model, trust
from lightning_ood.state import checkpoint_task_args, reconcile_detector_state

DetectorSpecs = Mapping[str, Mapping[str, Any] | None]


def outlier_exposure_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of the predictions on outliers to the uniform distribution, averaged over
    the batch: (1/N) Σ_n [logsumexp(z_n) − (1/L) Σ_k z_{n,k}] (Hendrycks et al. 2019, eq. 1
    with the uniform target of their §3 for classification)."""
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean()


class TrainingRecord(NamedTuple):
    """What a checkpoint records of the training that made its weights."""

    #: Outlier Exposure sets (:func:`~lightning_ood.data.base.outlier_record` dicts).
    outliers: list[dict[str, Any]]
    #: Training splits (:meth:`~lightning_ood.data.OODDataModule.split_record` dicts).
    splits: list[dict[str, Any]]
    #: Sources of the weights whose split is not recorded (older checkpoints), for warnings.
    unrecorded: list[str]


def training_record(section: Any, source: str) -> TrainingRecord:
    """Read a checkpoint's ``lightning_ood`` section (plain data; anything else is skipped);
    without a ``train_splits`` list, ``source`` is a weights source of unknown split."""
    meta = section if isinstance(section, Mapping) else {}
    outliers = [dict(r) for r in meta.get("outliers") or [] if isinstance(r, Mapping)]
    splits = meta.get("train_splits")
    unrecorded = [str(u) for u in meta.get("train_splits_unrecorded") or []]
    if not isinstance(splits, list):
        return TrainingRecord(outliers, [], [source, *unrecorded])
    return TrainingRecord(outliers, [dict(r) for r in splits if isinstance(r, Mapping)], unrecorded)


def recorded_training(path: Any) -> TrainingRecord:
    """What a weights file records of the training that made it (:func:`training_record`),
    so that fine-tuning, testing or tuning from it keeps the refusals; a file that does not
    load records nothing."""
    try:
        ckpt = safe_load(path, map_location="cpu")
    except (CheckpointError, OSError):
        return TrainingRecord([], [], [])  # not ours to judge: the backbone loaded it already
    section = ckpt.get("lightning_ood") if isinstance(ckpt, Mapping) else None
    return training_record(section, f"the weights {path}")


def recorded_outliers(path: Any) -> list[dict[str, Any]]:
    """The Outlier Exposure sets a lightning-ood checkpoint's weights were trained with (none
    for any other weights file)."""
    return recorded_training(path).outliers


def check_class_count(
    num_classes: int,
    data_classes: Any,
    data_name: str,
    *,
    model: str | None = None,
    ckpt_path: str | None = None,
    trained_on: str | None = None,
) -> None:
    """Refuse a network whose class count the data does not have: the one check behind both
    ``ClassificationTask.setup`` (a model built from its arguments) and the CLI's
    run guard (also before ``grid``, which runs no Lightning loop, and for a ``--ckpt_path``
    whose class count replaced the configured one).

    Args:
        num_classes: the network's class count.
        data_classes: the datamodule's (None or unreadable: nothing to check).
        data_name: the datamodule, for the message.
        model: the network's name, for the message.
        ckpt_path: the checkpoint the network comes from: its class count cannot be changed
            with ``--model.num_classes``, so the advice differs.
        trained_on: the data the checkpoint records (``data_version`` or ``id_set``).

    Raises:
        ValueError: the counts differ; the message says which fix can actually help.
    """
    try:
        wanted = None if data_classes is None else int(data_classes)
    except (TypeError, ValueError):
        return
    if wanted is None or wanted == num_classes:
        return
    if ckpt_path is None:
        raise ValueError(
            f"the datamodule {data_name} has {wanted} classes but the model is built with "
            f"num_classes={num_classes}; set --model.num_classes {wanted}"
        )
    raise ValueError(
        f"--ckpt_path {ckpt_path} holds a {model} trained for {num_classes} classes"
        f"{f' on {trained_on}' if trained_on else ''}, but the datamodule {data_name} has "
        f"{wanted} classes. A checkpoint keeps the class count it was trained with "
        "(--model.num_classes cannot change it), so use it with the data it was trained on, or "
        f"train a {wanted}-class model with `lightning-ood fit` (without --ckpt_path)."
    )


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


class ClassificationTask(LightningModule):
    """Cross-entropy classification for any registered backbone, plus post-hoc detectors.

    Args:
        model: registry name (see ``lightning_ood.models.list_models()``).
        num_classes: number of in-distribution classes.
        model_kwargs: extra backbone arguments, e.g. ``{"weights": "path/to/reference.pth.tar"}``.
        optimizer: optimizer factory (YAML ``class_path`` + ``init_args``).
        lr_scheduler: scheduler factory, stepped once per epoch.
        detectors: ``{name: {type: kind, **hyperparameters}}``; usually set by the
            :class:`~lightning_ood.callbacks.OODEvaluation` callback, stored for reloading.
        channels_last: store conv weights in channels-last layout: faster DenseNet-BC-100
            inference on CPU (``benchmarks/densenet_cpu_throughput.py``) and the usual layout
            for bf16 on GPUs. Scores may differ in the last float bits.
        oe_weight: λ of Outlier Exposure (Hendrycks et al. 2019): the loss on a combined
            ``{"id", "outliers"}`` batch (a datamodule with ``outlier_set``) is
            CE(id) + λ · CE(outliers, uniform). Unused without outliers.
    """

    def __init__(
        self,
        model: str = "lenet",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        detectors: dict[str, dict[str, Any] | None] | None = None,
        channels_last: bool = False,
        oe_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.backbone: OODBackbone = create_model(
            model, num_classes=num_classes, **(model_kwargs or {})
        )
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.detectors = build_detectors(detectors or {})
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        #: What a receiving team needs besides the weights (class names, normalisation, input
        #: size, data version): taken from the datamodule, stored in every checkpoint.
        self.data_meta: dict[str, Any] = {}
        self._rng_to_restore: dict[str, Any] | None = None
        if not oe_weight >= 0:
            raise ValueError(f"oe_weight (Outlier Exposure λ) must be >= 0, got {oe_weight}")
        #: Outlier Exposure sets the weights were trained with (``outlier_record`` dicts),
        #: kept in every checkpoint: they may never be reported OOD sets of this model.
        self.trained_outliers: list[dict[str, Any]] = []
        #: How each layer ensemble's shipped combiner was fitted (``engine.deploy_combiners``
        #: plus the data it saw), kept in every checkpoint so a receiving team can tell.
        self.shipped_combiners: dict[str, dict[str, Any]] = {}
        #: ``tune``'s selection per detector (metric, validation sets, chosen values), and the
        #: shipped rows of the last evaluation: both go into the checkpoint's card.
        self.tuned_record: dict[str, dict[str, Any]] = {}
        self.reported: dict[str, Any] | None = None
        #: The training record of the checkpoint this task was restored from (a `test` run
        #: trains nothing: its card keeps the recipe and progress that made the weights).
        self._restored_training: dict[str, Any] | None = None
        self._restored_origin: str | None = None
        #: The training splits the weights were trained with (``split_record`` dicts), kept in
        #: every checkpoint: no later run may hold out (calibrate, tune on) an image in them.
        self.trained_splits: list[dict[str, Any]] = []
        #: Where the weights came from without such a record (older checkpoints): warned about.
        self.unrecorded_splits: list[str] = []
        self._split_notes: set[str] = set()
        weights = (model_kwargs or {}).get("weights")
        if weights is not None:
            record = recorded_training(weights)
            self.trained_outliers = record.outliers
            self.trained_splits, self.unrecorded_splits = record.splits, record.unrecorded
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike[str],
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        *,
        allow_modules: Sequence[str] = (),
        **kwargs: Any,
    ) -> ClassificationTask:
        """Lightning's ``load_from_checkpoint``, with the checkpoint read as data.

        Lightning would pass every stored hyperparameter (and legacy keys such as ``hparams``
        with an ``_instantiator``) through its instantiation machinery; here the task is built
        directly from the arguments :func:`~lightning_ood.state.checkpoint_task_args` admits
        (plain values, a registered architecture, a ``wrap`` class only if listed in
        ``allow_modules``), then the state dict is loaded. ``kwargs`` override them, as in
        Lightning; nothing else in the file is read.
        """
        if hparams_file is not None:
            raise ValueError(
                "ClassificationTask.load_from_checkpoint: hparams_file is not supported: the "
                "checkpoint records its own task arguments; pass overrides as keyword arguments"
            )
        source = str(checkpoint_path)
        ckpt = safe_load(checkpoint_path, map_location="cpu")
        with trust.allow_modules(allow_modules):
            args = checkpoint_task_args(ckpt.get("hyper_parameters"), source)
            if not args or not isinstance(ckpt.get("state_dict"), Mapping):
                raise ValueError(
                    f"{source} is not a lightning-ood checkpoint (no hyper_parameters with a "
                    "model, or no state_dict); bare backbone weights go to model_kwargs.weights"
                )
            task = cls(**{**args, **kwargs})
            section = ckpt.get("lightning_ood")
            clean = {
                "hyper_parameters": args,
                "state_dict": dict(ckpt["state_dict"]),
                "lightning_ood": dict(section) if isinstance(section, Mapping) else {},
                "epoch": ckpt.get("epoch"),
                "global_step": ckpt.get("global_step"),
            }
            task.on_load_checkpoint(clean)
            task.load_state_dict(clean["state_dict"], strict=True if strict is None else strict)
        if map_location is not None:
            task.to(map_location)
        return task

    # -- detectors ------------------------------------------------------------------------
    def set_detectors(self, specs: DetectorSpecs) -> None:
        """Replace the detectors (keeping fitted state of those whose config is unchanged)."""
        new = build_detectors(specs)
        for name, det in new.items():
            if name in self.detectors and self.detectors[name].config() == det.config():
                new[name] = self.detectors[name]
        self.detectors = new.to(self.device)
        self.hparams["detectors"] = {n: d.config() for n, d in self.detectors.items()}

    def replace_detector(self, name: str, det: Detector) -> None:
        """Install a fitted detector under ``name`` (a tuned selection), its config recorded
        in ``hparams`` so that the checkpoint rebuilds it."""
        if name not in self.detectors:
            raise KeyError(f"no detector {name!r} to replace; configured: {list(self.detectors)}")
        det.name = name
        self.detectors[name] = det.to(self.device)
        self.hparams["detectors"] = {n: d.config() for n, d in self.detectors.items()}

    @property
    def detector_taps(self) -> tuple[str, ...]:
        return engine.detector_taps(self.detectors.values(), self.backbone)

    def unfitted_detectors(self) -> list[Detector]:
        return [d for d in self.detectors.values() if not d.is_fitted]

    # -- forward / steps --------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def extract(self, x: Tensor) -> BackboneOutput:
        """One forward pass that serves every detector (features, logits and their taps)."""
        return self.backbone.extract(x, taps=self.detector_taps)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if isinstance(batch, Mapping):
            return self._outlier_exposure_step(batch)
        x, y = batch
        logits = self.backbone(x)
        loss = F.cross_entropy(logits, y)
        # update(), not forward(): forward() deep-copies the metric state to return a per-batch
        # value that on_step=False never logs (6 % of a LeNet step, benchmarks/README.md 3d).
        self.train_acc.update(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _outlier_exposure_step(self, batch: Mapping[str, Any]) -> Tensor:
        """One forward over ID and outlier samples together (as Hendrycks et al. do, so that
        BatchNorm sees both); loss = CE(id) + λ · CE(outliers, uniform)."""
        if set(batch) != {"id", "outliers"}:
            raise ValueError(
                "a dict training batch must be the Outlier Exposure CombinedLoader's "
                f'{{"id", "outliers"}}, got keys {sorted(batch)}'
            )
        (x, y), x_out = batch["id"][:2], engine.split_batch(batch["outliers"])[0]
        logits = self.backbone(torch.cat([x, x_out]))
        id_logits, out_logits = logits[: x.shape[0]], logits[x.shape[0] :]
        ce = F.cross_entropy(id_logits, y)
        oe = outlier_exposure_loss(out_logits)
        loss = ce + self.hparams["oe_weight"] * oe
        self.train_acc.update(id_logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce_loss", ce)
        self.log("train/oe_loss", oe)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.backbone(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(
        self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> BackboneOutput:
        """Dataloader 0 is the ID test set (accuracy); the rest are OOD sets.

        Returns the shared forward pass so the OOD callback scores every detector from it.
        """
        x, y = batch
        out = self.extract(x)
        if dataloader_idx == 0:
            self.test_acc(out.logits, y)
            self.log("test/acc", self.test_acc, add_dataloader_idx=False)
        return out

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Logits, prediction, and every fitted, calibrated detector's score and decision."""
        x, _ = engine.split_batch(batch)
        ready = {n: d for n, d in self.detectors.items() if d.is_fitted and d.is_calibrated}
        return engine.predict_batch(ready, self.extract(x), self.backbone, x)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    # -- metadata ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "hand_off_meta"):
            meta = dm.hand_off_meta()
            check_class_count(
                self.hparams["num_classes"], meta.get("num_classes"), type(dm).__name__
            )
            model_shape = tuple(getattr(self.backbone, "input_shape", ()) or ())
            data_shape = tuple(meta.get("input_shape") or ())
            if model_shape and data_shape and model_shape != data_shape:
                raise ValueError(
                    f"the datamodule {type(dm).__name__} gives inputs of shape {data_shape}, but "
                    f"the model ({self.hparams['model']}) takes {model_shape}; pick the "
                    "datamodule the model was trained on, or a model built for this input "
                    "(e.g. model_kwargs.in_channels)"
                )
            self.data_meta = meta
            record = dm.outlier_record() if hasattr(dm, "outlier_record") else None
            if stage == "fit" and record is not None and record not in self.trained_outliers:
                self.trained_outliers.append(record)
            self._check_outlier_leak(dm)
            weights = (self.hparams.get("model_kwargs") or {}).get("weights")
            self._check_split(dm, stage, "the network" + (f" ({weights})" if weights else ""))
            if stage == "fit" and hasattr(dm, "split_record"):
                split = dm.split_record()
                if split not in self.trained_splits:
                    self.trained_splits.append(split)

    def _check_outlier_leak(self, dm: Any) -> None:
        """A reported or tuning OOD set of ``dm`` that reads samples the weights saw as OE
        outliers is refused (compared by what is read, not by name)."""
        if self.trained_outliers and hasattr(dm, "check_outliers"):
            names = [r.get("name") for r in self.trained_outliers]
            dm.check_outliers(
                self.trained_outliers, f"model trained with Outlier Exposure on {names}"
            )

    def _check_split(self, dm: Any, stage: Any, where: str) -> None:
        """Refuse a datamodule whose held-out ID validation data (calibration, tuning) holds
        training images the weights were trained on; warn where the weights record no split.
        Prediction reads no validation data."""
        if dm is None or not hasattr(dm, "check_split") or stage == "predict":
            return
        for note in dm.check_split(self.trained_splits, self.unrecorded_splits, where):
            if note not in self._split_notes:
                self._split_notes.add(note)
                rank_zero_warn(f"[lightning_ood] {note}")

    # -- checkpoint plumbing ----------------------------------------------------------------
    def _check_compatible(self, checkpoint: Mapping[str, Any]) -> None:
        """A checkpoint of another architecture or class count fails with both named."""
        hp = checkpoint.get("hyper_parameters") or {}
        mine = (self.hparams.get("model"), self.hparams.get("num_classes"))
        theirs = (hp.get("model"), hp.get("num_classes"))
        if None not in theirs and theirs != mine:
            raise ValueError(
                f"checkpoint was trained as model={theirs[0]!r} with num_classes={theirs[1]}, "
                f"but this run builds model={mine[0]!r} with num_classes={mine[1]}; use the "
                "checkpoint's config (or drop --ckpt_path to train from scratch)"
            )
        ours = self.backbone.state_dict()
        bad = []
        for key, value in (checkpoint.get("state_dict") or {}).items():
            name = key.removeprefix("backbone.")
            if key.startswith("backbone.") and name in ours and value.shape != ours[name].shape:
                shapes = f"checkpoint {tuple(value.shape)} vs model {tuple(ours[name].shape)}"
                bad.append(f"{name}: {shapes}")
        if bad:
            raise ValueError(
                "checkpoint weights do not fit this model (another architecture or class "
                f"count?): {'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The state dict carries the weights; a checkpoint handed to another team must not
        # need the file the backbone was first initialised from.
        hp = checkpoint.get("hyper_parameters", {})
        kwargs = dict(hp.get("model_kwargs") or {})
        if kwargs.pop("weights", None) is not None:
            hp["model_kwargs"] = kwargs
        hp["detectors"] = {n: d.config() for n, d in self.detectors.items()}
        checkpoint["lightning_ood"] = {"format": 1, "data": self.data_meta}
        if self.trained_outliers:
            checkpoint["lightning_ood"]["outliers"] = [dict(r) for r in self.trained_outliers]
        checkpoint["lightning_ood"]["train_splits"] = [dict(r) for r in self.trained_splits]
        live = {n: dict(r) for n, r in self.shipped_combiners.items() if n in self.detectors}
        if live:
            checkpoint["lightning_ood"]["shipped_combiners"] = live
        checkpoint["lightning_ood"]["card"] = self._card(checkpoint, live)
        if self.unrecorded_splits:
            checkpoint["lightning_ood"]["train_splits_unrecorded"] = list(self.unrecorded_splits)
        checkpoint["rng_states"] = self._gather_rng_states()

    def _card(self, checkpoint: Mapping[str, Any], combiners: Mapping[str, Any]) -> dict:
        """The card (:mod:`lightning_ood.card`) of the checkpoint being written."""
        from lightning_ood.card import UNKNOWN

        step = int(checkpoint.get("global_step", 0) or 0)
        weights = (self.hparams.get("model_kwargs") or {}).get("weights")
        trained = f"trained by lightning-ood fit ({step} optimizer steps)" if step else ""
        if weights is not None:
            origin = f"initial weights from {weights}" + (f", then {trained}" if trained else "")
        else:
            origin = trained or UNKNOWN
        training: dict[str, Any] = {"epoch": checkpoint.get("epoch"), "global_step": step}
        if not step and self._restored_training is not None:  # `test` of a trained checkpoint
            return self._card_with(checkpoint, combiners, self._restored_origin or UNKNOWN,
                                   dict(self._restored_training))  # fmt: skip
        if self._trainer is not None:
            training["max_epochs"] = self.trainer.max_epochs
            opts = self.trainer.optimizers
            if opts:
                training["optimizer"] = type(opts[0]).__name__
                training["lr"] = opts[0].param_groups[0].get("lr")
        return self._card_with(checkpoint, combiners, origin, training)

    def _card_with(
        self,
        checkpoint: Mapping[str, Any],
        combiners: Mapping[str, Any],
        origin: str,
        training: dict[str, Any],
    ) -> dict:
        from lightning_ood.card import build_card

        dets = {
            n: {
                "config": d.config(),
                "threshold": float(d.threshold) if d.is_calibrated else None,
                "threshold_tpr": float(d.threshold_tpr) if d.is_calibrated else None,
                "tuned": self.tuned_record.get(n) or False,
                "combiner": dict(combiners[n]) if n in combiners else None,
            }
            for n, d in self.detectors.items()
            if d.is_fitted
        }
        reported = self.reported
        if reported:
            rows = {n: r for n, r in reported.get("rows", {}).items() if n in dets}
            reported = {**reported, "rows": rows}
        return build_card(
            hparams=self.hparams,
            data=self.data_meta,
            detectors=dets,
            training=training,
            weights_origin=origin,
            train_splits=[dict(r) for r in self.trained_splits],
            outliers=[dict(r) for r in self.trained_outliers],
            reported=reported,
        )

    def _gather_rng_states(self) -> dict[str, Any]:
        """Every rank's torch RNG state (dropout masks, augmentation draws), so a resumed run
        continues the same random streams; saved on every rank's call, written by rank 0."""
        cpu = torch.get_rng_state()
        states: dict[str, Any] = {"world_size": 1, "torch": cpu.unsqueeze(0)}
        if self._trainer is not None and self.trainer.world_size > 1:
            gathered = self.all_gather(cpu.to(self.device))
            states = {"world_size": self.trainer.world_size, "torch": gathered.cpu()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            cuda = torch.cuda.get_rng_state(self.device)
            g = self.all_gather(cuda.to(self.device)) if states["world_size"] > 1 else cuda[None]
            states["cuda"] = g.cpu()
        return states

    def on_train_start(self) -> None:
        # Restored here, not in on_load_checkpoint: Lightning creates the training iterator in
        # between, which draws from the RNG; the uninterrupted run drew that at epoch start.
        states, self._rng_to_restore = self._rng_to_restore, None
        if not states:
            return
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if states.get("world_size") != world:
            rank_zero_info(
                f"[lightning_ood] the checkpoint's RNG states are from {states.get('world_size')} "
                f"process(es), this run has {world}; random streams are not continued exactly"
            )
            return
        torch.set_rng_state(states["torch"][rank].cpu())
        if "cuda" in states and self.device.type == "cuda":
            torch.cuda.set_rng_state(states["cuda"][rank].cpu(), self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Reconcile stored detector state with the configured detectors.

        A configured detector absent from the checkpoint (or stored with other
        hyperparameters) starts unfitted and is fitted at test start; stored detectors that
        are no longer configured are dropped. Both are reported.
        """
        self._check_compatible(checkpoint)
        stored = checkpoint.get("lightning_ood") or {}
        card = stored.get("card") if isinstance(stored.get("card"), Mapping) else {}
        self._restored_training = dict(card.get("training") or {}) or {
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
        }
        origin = (card.get("model") or {}).get("weights_origin")
        step = checkpoint.get("global_step")
        self._restored_origin = origin or (
            f"trained by lightning-ood fit ({step} optimizer steps)" if step else None
        )
        combiners = stored.get("shipped_combiners")
        if isinstance(combiners, Mapping):
            self.shipped_combiners.update(
                {str(n): dict(r) for n, r in combiners.items() if isinstance(r, Mapping)}
            )
        if stored.get("data") and not self.data_meta:
            self.data_meta = dict(stored["data"])
        self._rng_to_restore = checkpoint.get("rng_states")
        path = self.trainer.ckpt_path if self._trainer is not None else None
        source = f"the checkpoint {path}" if path else "the checkpoint"
        record = training_record(stored, source)
        for mine, theirs in (
            (self.trained_outliers, record.outliers),
            (self.trained_splits, record.splits),
            (self.unrecorded_splits, record.unrecorded),
        ):
            mine.extend(r for r in theirs if r not in mine)
        if self._trainer is not None:
            dm = getattr(self.trainer, "datamodule", None)
            self._check_outlier_leak(dm)
            self._check_split(dm, self.trainer.state.fn, f"the network of {source}")
        stored_cfg = (checkpoint.get("hyper_parameters") or {}).get("detectors") or {}
        reconcile_detector_state(
            checkpoint["state_dict"],
            self.detectors,
            stored_cfg,
            log=lambda msg: rank_zero_info(f"[lightning_ood] {msg}"),
        )
