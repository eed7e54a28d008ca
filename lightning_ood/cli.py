"""``lightning-ood fit|validate|test|predict``: LightningCLI with the project's defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_ood.callbacks.predictions import PredictionCSVWriter, default_prediction_path
from lightning_ood.checkpoint import SafeCheckpointIO, safe_load
from lightning_ood.data import OODDataModule
from lightning_ood.task import ClassificationTask


class OODCLI(LightningCLI):
    """Adds ``--experiment`` which names the checkpoint folder and the TensorBoard run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--experiment",
            type=str,
            default="default",
            help="Run name: checkpoints go to <checkpoint_root>/<experiment>/, logs to "
            "<log_root>/<experiment>/version_N.",
        )
        parser.add_argument("--checkpoint_root", type=str, default="checkpoints")
        parser.add_argument("--log_root", type=str, default="logs")
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=200,
            help="Also write <checkpoint_root>/<experiment>/last.ckpt every N optimizer steps "
            "(0 = only at epoch ends), so a killed run resumes mid-epoch with "
            "`fit --ckpt_path last`.",
        )
        parser.add_argument(
            "--predictions",
            type=str,
            default=None,
            help="predict: CSV of per-sample scores and decisions (default "
            "<log_root>/<experiment>/predictions.csv).",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters before anything else; read the
        # file through safe_load first so a truncated, corrupt or code-carrying file fails
        # with an error that names it (LightningCLI itself also loads weights_only).
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path and path not in ("last", "best", "hpc", "registry") and Path(path).is_file():
            safe_load(path)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        experiment = cfg["experiment"]
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(save_dir=cfg["log_root"], name=experiment)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        ckpt_dir = str(Path(cfg["checkpoint_root"]) / experiment)
        every = cfg["checkpoint_every_n_steps"]
        if every < 0:
            raise ValueError(f"--checkpoint_every_n_steps must be >= 0, got {every}")
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(
                ModelCheckpoint(
                    dirpath=ckpt_dir,
                    filename="epoch{epoch:03d}-acc{val/acc:.4f}",
                    auto_insert_metric_name=False,
                    monitor="val/acc",
                    mode="max",
                    save_top_k=1,
                    save_last=True,
                    # re-running an experiment overwrites files instead of writing -v1 copies,
                    # so `--ckpt_path checkpoints/<experiment>/last.ckpt` stays valid
                    enable_version_counter=False,
                )
            )
            if every:
                # last.ckpt also every N steps: resumable mid-epoch (ResumableDataLoader)
                callbacks.append(
                    ModelCheckpoint(
                        dirpath=ckpt_dir,
                        filename="last",
                        monitor=None,
                        save_top_k=1,
                        every_n_train_steps=every,
                        enable_version_counter=False,
                    )
                )
        if not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        if self.subcommand == "predict" and not any(
            isinstance(c, PredictionCSVWriter) for c in callbacks
        ):
            out = cfg["predictions"] or default_prediction_path(cfg["log_root"], experiment)
            callbacks.append(PredictionCSVWriter(out))
        kwargs["callbacks"] = callbacks
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            # atomic writes, weights-only reads (lightning_ood.checkpoint)
            plugins.append(SafeCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def main(args: ArgsType = None, run: bool = True) -> OODCLI:
    """Entry point for the console script, ``python -m lightning_ood`` and tests."""
    return OODCLI(
        ClassificationTask,
        OODDataModule,
        subclass_mode_data=True,
        trainer_defaults={
            # Gradient-based detectors (ODIN, FSSD/Mahalanobis pre-processing) need autograd
            # inside the test loop, which inference_mode would forbid.
            "inference_mode": False,
        },
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def entrypoint() -> None:
    """Console script: like :func:`main`, but returns nothing (a return value would become
    the process exit status)."""
    main()


if __name__ == "__main__":
    entrypoint()
