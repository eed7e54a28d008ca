"""The one LightningModule: trains any registered backbone and carries the detectors.

Detectors are sub-modules (``self.detectors``), so their fitted buffers land in every
checkpoint and come back with ``load_from_checkpoint``; their config lives in
``hparams["detectors"]`` so a bare ``load_from_checkpoint`` can rebuild them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_ood.detectors import Detector, build_detectors
from lightning_ood.models import BackboneOutput, OODBackbone, create_model

DetectorSpecs = Mapping[str, Mapping[str, Any] | None]


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
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    # -- detectors ------------------------------------------------------------------------
    def set_detectors(self, specs: DetectorSpecs) -> None:
        """Replace the detectors (keeping fitted state of those whose config is unchanged)."""
        new = build_detectors(specs)
        for name, det in new.items():
            if name in self.detectors and self.detectors[name].config() == det.config():
                new[name] = self.detectors[name]
        self.detectors = new.to(self.device)
        self.hparams["detectors"] = {n: d.config() for n, d in self.detectors.items()}

    @property
    def detector_taps(self) -> tuple[str, ...]:
        taps: dict[str, None] = {}
        for det in self.detectors.values():
            taps.update(dict.fromkeys(det.taps))
        return tuple(taps)

    def unfitted_detectors(self) -> list[Detector]:
        return [d for d in self.detectors.values() if not d.is_fitted]

    # -- forward / steps --------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def extract(self, x: Tensor) -> BackboneOutput:
        """One forward pass that serves every detector (features, logits and their taps)."""
        return self.backbone.extract(x, taps=self.detector_taps)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.backbone(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
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
        x = batch[0] if isinstance(batch, list | tuple) else batch
        out = self.extract(x)
        scores = {}
        for name, det in self.detectors.items():
            if det.is_fitted and not det.needs_input_grad:
                scores[name] = det.score(out)
        return {"logits": out.logits, "pred": out.logits.argmax(1), "scores": scores}

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    # -- checkpoint plumbing ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The state dict carries the weights; a checkpoint handed to another team must not
        # need the file the backbone was first initialised from.
        hp = checkpoint.get("hyper_parameters", {})
        kwargs = dict(hp.get("model_kwargs") or {})
        if kwargs.pop("weights", None) is not None:
            hp["model_kwargs"] = kwargs
        hp["detectors"] = {n: d.config() for n, d in self.detectors.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Reconcile stored detector state with the configured detectors.

        A configured detector absent from the checkpoint (or stored with other
        hyperparameters) starts unfitted and is fitted at test start; stored detectors that
        are no longer configured are dropped. Both are reported.
        """
        state = checkpoint["state_dict"]
        stored_cfg = (checkpoint.get("hyper_parameters") or {}).get("detectors") or {}
        prefix = "detectors."
        for name, det in self.detectors.items():
            keys = [k for k in state if k.startswith(f"{prefix}{name}.")]
            same = stored_cfg.get(name) == det.config()
            if keys and not same:
                rank_zero_info(
                    f"[lightning_ood] detector {name!r}: checkpoint holds it with config "
                    f"{stored_cfg.get(name)}, now configured as {det.config()}; refitting."
                )
            if not keys or not same:
                for k in keys:
                    del state[k]
                det.fitted.fill_(not det.requires_fit)
                state.update(det.state_dict(prefix=f"{prefix}{name}."))
        dropped = sorted(
            {k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}
            - set(self.detectors)
        )
        for k in [
            k for k in state if k.startswith(prefix) and k[len(prefix) :].split(".")[0] in dropped
        ]:
            del state[k]
        if dropped:
            rank_zero_info(
                f"[lightning_ood] checkpoint detectors not configured, ignored: {dropped}"
            )
