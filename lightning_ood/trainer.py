"""``OODTrainer``: Lightning's Trainer plus ``grid``, so that ``lightning-ood grid`` is a
LightningCLI subcommand like ``fit``/``test`` and inherits ``--trainer.*`` (accelerator,
devices, strategy).

LightningCLI builds a subcommand from :meth:`lightning_ood.cli.OODCLI.subcommands` and the
signature of the Trainer method of that name; :meth:`OODTrainer.grid` is run through the
strategy's launcher as ``fit`` is, so ``--trainer.strategy ddp --trainer.devices 2`` starts
the ranks (the launcher re-runs the command with ``LOCAL_RANK`` set), sets up the process
group (``strategy.setup_environment()``) and tears it down. Each rank extracts features of its
unpadded shard of every loader (the datamodule, attached to this trainer, shards with
``EvalShardedSampler``); detector fits reduce through the trainer's strategy
(:class:`~lightning_ood.callbacks.evaluation.StrategyReducer`), scores are gathered in dataset
order (:func:`~lightning_ood.callbacks.evaluation.in_dataset_order`), and rank 0 alone writes
the results. The grid itself is :func:`lightning_ood.grid.run_spec` (the evaluation session
over cached features).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

# Lightning exports the launcher classes from this package (underscored, no public alias):
# the subprocess launcher is the only one that runs `grid` in every rank and returns its result
# in the process the user started (the spawn launcher would pickle it through a queue).
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

from lightning_ood.callbacks.evaluation import OODEvaluation, StrategyReducer, in_dataset_order
from lightning_ood.distributed import ProcessGroupOwnership
from lightning_ood.grid import GridResult, Ranks, load_spec, run_spec, write_grid_results

#: ``--device`` of the old ``lightning-ood grid`` parser, now ``--trainer.*``.
DEVICE_DEPRECATION = (
    "lightning-ood grid: --device is deprecated and will be removed; it now sets "
    "--trainer.accelerator {accelerator} --trainer.devices {devices}. Pass those instead "
    "(they also take --trainer.strategy ddp for several ranks)."
)


def device_to_trainer(device: str) -> tuple[str, Any]:
    """``(accelerator, devices)`` for an old ``--device`` value: ``auto`` (a GPU if there is
    one, else the CPU: one device either way), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.

    Raises:
        ValueError: a value the old flag did not take, naming the ``--trainer.*`` flags.
    """
    kind, _, index = device.partition(":")
    if kind == "auto":
        return "auto", 1
    if kind in ("cpu", "mps") and not index:
        return kind, 1
    if kind in ("cuda", "gpu") and (not index or index.isdigit()):
        return "cuda", [int(index)] if index else 1
    raise ValueError(
        f"--device {device!r}: expected auto, cpu, mps, cuda or cuda:N; better, pass "
        "--trainer.accelerator and --trainer.devices"
    )


class OODTrainer(Trainer):
    """Lightning's :class:`~lightning.pytorch.Trainer` with a :meth:`grid` entry point.

    Attributes:
        grid_result: the last :meth:`grid`'s result (LightningCLI drops a subcommand's return
            value; :func:`lightning_ood.cli.grid_main` returns this).
        grid_info: caller facts copied into the grid result's ``meta`` (the CLI records the
            config files and overrides of the run); ``val_names_given`` in it says the user
            named ``--data.init_args.val_ood_sets`` (the spec's must then agree with them).
    """

    grid_result: GridResult | None = None
    grid_info: dict[str, Any]

    def grid(
        self,
        model: LightningModule,
        datamodule: LightningDataModule,
        grid: str,
        cache_dir: str = ".cache/features",
        no_cache: bool = False,
        ckpt_path: str | None = None,
        out: str | None = None,
        no_progress: bool = False,
        device: str | None = None,
    ) -> GridResult:
        """Grid-search a detector's hyperparameters from cached features.

        Every combination of the spec is fitted from the cached training features, selected
        on the validation OOD sets and the held-out ID split, and the selection is reported on
        the test sets, under the protocol of the config's OOD callback (what ``lightning-ood
        test`` with ``tune`` uses); ``grid_results.{md,json,csv}`` go to ``out``.

        Args:
            model: the configured task; its backbone's features are what the grid reads.
            datamodule: the configured data (an ``OODDataModule``).
            grid: grid YAML (detector, base, grid, val_ood_sets, select, ...).
            cache_dir: feature cache folder (one entry per set; under several ranks one per
                rank's shard, keyed by rank and world size).
            no_cache: compute features, store nothing.
            ckpt_path: checkpoint whose backbone weights to use.
            out: results folder (the CLI's default: <log_root>/grid/<experiment>).
            no_progress: no progress bars.
            device: deprecated: the CLI turns it into --trainer.accelerator/devices.
        """
        if device is not None:
            raise ValueError(
                f"OODTrainer.grid(device={device!r}): the device is the trainer's; build the "
                "trainer with accelerator=/devices= (lightning-ood grid translates --device)"
            )
        spec = load_spec(grid)  # refused in the launching process, before any rank starts
        if not isinstance(self.strategy, SingleDeviceStrategy | DDPStrategy) or not (
            self.strategy.launcher is None
            or isinstance(self.strategy.launcher, _SubprocessScriptLauncher)
        ):
            raise ValueError(
                f"lightning-ood grid runs on one device or with --trainer.strategy ddp; "
                f"{type(self.strategy).__name__} with "
                f"{type(self.strategy.launcher).__name__} is not supported (ddp_spawn and "
                "notebook launchers cannot hand the result back)"
            )
        args = (model, datamodule, spec, grid, cache_dir, no_cache, ckpt_path, out, no_progress)
        launcher = self.strategy.launcher
        try:
            if launcher is None:
                return self._grid_impl(*args)
            return launcher.launch(self._grid_impl, *args, trainer=self)
        except KeyboardInterrupt:
            if isinstance(launcher, _SubprocessScriptLauncher):
                launcher.kill(signal.SIGKILL)  # the ranks it started
            raise

    def _grid_impl(
        self,
        model: LightningModule,
        datamodule: LightningDataModule,
        spec: dict[str, Any],
        grid: str,
        cache_dir: str,
        no_cache: bool,
        ckpt_path: str | None,
        out: str | None,
        no_progress: bool,
    ) -> GridResult:
        """One rank's grid: process group up, the sharded run, rank 0 writes, group down."""
        from lightning_ood.features import FeatureCache
        from lightning_ood.models.weights import load_weights

        # a group Lightning creates here is ours to end (lightning_ood.distributed says why)
        group = ProcessGroupOwnership.observe()
        self.strategy.setup_environment()  # DDP: the process group; every strategy: the device
        try:
            info = dict(getattr(self, "grid_info", {}) or {})
            val_names_given = bool(info.pop("val_names_given", False))
            backbone = model.backbone  # type: ignore[attr-defined]
            if ckpt_path:
                load_weights(backbone, ckpt_path, model_name=model.hparams.get("model"))
            backbone.to(self.strategy.root_device).eval()
            datamodule.trainer = self  # its loaders shard over this trainer's ranks
            configured = [c for c in self.callbacks if isinstance(c, OODEvaluation)]
            ranks = Ranks()
            if self.world_size > 1:
                ranks = Ranks(
                    self.global_rank,
                    self.world_size,
                    gather=lambda t: in_dataset_order(t, self),
                    reducer=StrategyReducer(self),
                )
            result = run_spec(
                spec,
                backbone,
                datamodule,
                spec_name=str(grid),
                val_names_given=val_names_given,
                cache=None if no_cache else FeatureCache(cache_dir),
                progress=not no_progress and self.is_global_zero,
                protocol=configured[0].protocol if configured else None,
                info={
                    "model": model.hparams.get("model"),
                    "ckpt_path": ckpt_path,
                    "grid_spec": str(grid),
                    **info,
                },
                ranks=ranks,
            )
            if self.is_global_zero:
                folder = Path(out) if out else Path("logs") / "grid"
                write_grid_results(result, folder)
                print("\n" + result.to_markdown())
                written = f"{folder}/grid_results.{{md,json,csv}}"
                print(f"[lightning_ood] grid results written to {written}")
        except BaseException:
            group.release()  # no barrier: another rank may never reach it
            raise
        group.release(lambda: self.strategy.barrier("grid"))  # every rank done first
        self.grid_result = result
        return result
