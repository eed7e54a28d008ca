"""``lightning-ood fit|validate|test|predict|grid``: the one command line.

``fit``/``validate``/``test``/``predict`` are a LightningCLI with the project's defaults;
``grid`` (:func:`grid_main`) grid-searches a detector's hyperparameters from cached features
(:mod:`lightning_ood.grid`), reading the same ``--config`` files. Library modules never import
this module.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_ood.callbacks.predictions import PredictionCSVWriter, default_prediction_path
from lightning_ood.checkpoint import SafeCheckpointIO, safe_load
from lightning_ood.data import OODDataModule
from lightning_ood.grid import GridResult, load_spec, run_spec, write_grid_results
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


def _grid_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-ood grid",
        description="Grid-search a detector's hyperparameters from cached features; select on "
        "validation OOD sets, report on the test sets. Unknown arguments go to the "
        "lightning-ood config parser (e.g. --data.init_args.train_every 10).",
    )
    p.add_argument("--config", action="append", required=True, help="lightning-ood config(s)")
    p.add_argument("--grid", required=True, help="grid YAML (detector, base, grid, ...)")
    p.add_argument("--cache_dir", default=".cache/features", help="feature cache folder")
    p.add_argument("--no_cache", action="store_true", help="compute features, store nothing")
    p.add_argument("--ckpt_path", default=None, help="checkpoint whose backbone weights to use")
    p.add_argument("--out", default=None, help="results folder (default logs/grid/<experiment>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no_progress", action="store_true")
    return p


def grid_main(args: Sequence[str] | None = None) -> GridResult:
    """``lightning-ood grid``: build the configured model and datamodule, run the grid spec
    (:func:`lightning_ood.grid.run_spec`), write ``grid_results.{md,json,csv}``."""
    from lightning_ood.features import FeatureCache
    from lightning_ood.models.weights import load_weights

    ns, extra = _grid_parser().parse_known_args(args)
    spec = load_spec(ns.grid)
    cli_args: list[str] = []
    for cfg in ns.config:
        cli_args += ["--config", cfg]
    with warnings.catch_warnings():  # our own argv is not LightningCLI's: that is intended
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = main([*cli_args, *extra], run=False)
    task, dm = cli.model, cli.datamodule
    backbone = task.backbone
    if ns.ckpt_path:
        load_weights(backbone, ns.ckpt_path, model_name=task.hparams.get("model"))
    device = ns.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone.to(device).eval()
    result = run_spec(
        spec,
        backbone,
        dm,
        spec_name=str(ns.grid),
        val_names_given=any(a.split("=")[0].endswith(".val_ood_sets") for a in extra),
        cache=None if ns.no_cache else FeatureCache(ns.cache_dir),
        progress=not ns.no_progress,
        info={
            "model": task.hparams.get("model"),
            "ckpt_path": ns.ckpt_path,
            "configs": list(ns.config),
            "grid_spec": str(ns.grid),
            "cli_overrides": list(extra),
        },
    )
    experiment = getattr(cli.config, "experiment", None) or "default"
    out = Path(ns.out or Path("logs") / "grid" / str(experiment))
    write_grid_results(result, out)
    print("\n" + result.to_markdown())
    print(f"[lightning_ood] grid results written to {out}/grid_results.{{md,json,csv}}")
    return result


def entrypoint() -> None:
    """Console script: like :func:`main` (or :func:`grid_main` for ``grid``), but returns
    nothing (a return value would become the process exit status)."""
    argv = sys.argv[1:]
    if argv[:1] == ["grid"]:
        grid_main(argv[1:])
    else:
        main()


def grid_entrypoint() -> None:
    """Console script ``lightning-ood-grid``, the same as ``lightning-ood grid``."""
    grid_main()


if __name__ == "__main__":
    entrypoint()
