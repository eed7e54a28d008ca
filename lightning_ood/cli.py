"""``lightning-ood fit|validate|test|predict|grid|models|inspect|serve``: the one command line.

``fit``/``validate``/``test``/``predict``/``grid`` are subcommands of one LightningCLI with the
project's defaults: ``grid`` is :meth:`lightning_ood.trainer.OODTrainer.grid` (grid-search a
detector's hyperparameters from cached features, :mod:`lightning_ood.grid`), so it reads the
same ``--config`` files and takes ``--trainer.devices``/``--trainer.strategy ddp`` like
``test``. ``models`` (:func:`models_main`), ``inspect`` (:func:`inspect_main`) and ``serve``
need no model, data or trainer: plain parsers, listed in ``lightning-ood --help``.

The checks that guard a run live in :class:`OODCLI` and nowhere else in the CLI: names that
may not leave their roots and untrained weights (``before_instantiate_classes``), the class
count (``after_instantiate_classes``, through :func:`lightning_ood.task.check_class_count`,
the function ``ClassificationTask.setup`` calls too), and overwriting (``fit``'s checkpoints,
``predict``'s file). Library modules never import this module.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ood.callbacks.evaluation import OODEvaluation
from lightning_ood.callbacks.predictions import PredictionCSVWriter
from lightning_ood.checkpoint import SafeCheckpointIO, check_lightning_checkpoint, safe_load
from lightning_ood.data import OODDataModule
from lightning_ood.grid import GridResult
from lightning_ood.models.trust import UntrustedCheckpointError, allow_modules, trust_modules
from lightning_ood.runs import ReplacedRunGuard, check_experiment, move_aside, run_folder
from lightning_ood.state import checkpoint_task_args
from lightning_ood.task import ClassificationTask, check_class_count
from lightning_ood.trainer import DEVICE_DEPRECATION, OODTrainer, device_to_trainer


class OODArgumentParser(LightningArgumentParser):
    """The CLI's parser; a subcommand's usage line reads ``lightning-ood grid ...`` (as the
    ``grid`` parser's did before it joined LightningCLI), where jsonargparse writes
    ``lightning-ood [options] grid``: the options of ``lightning-ood`` itself are only
    ``--config``/``--print_config``, which every subcommand takes too."""

    @property
    def prog(self) -> str:
        return self._lightning_ood_prog

    @prog.setter
    def prog(self, value: str) -> None:
        self._lightning_ood_prog = value.replace(" [options] ", " ")


class OODCLI(LightningCLI):
    """LightningCLI with the project's defaults and refusals.

    Adds ``--experiment`` (the checkpoint folder and TensorBoard run name), and refuses what
    would lose work or report nonsense: ``test``/``predict`` of a network without trained
    weights (unless ``--allow_untrained true``), a ``fit`` over an earlier run's checkpoints or
    a ``predict`` over an existing file (unless ``--overwrite true``), and a checkpoint whose
    class count the data does not have. Flags that ``--ckpt_path`` overrides are warned about.

    A checkpoint is data: ``--ckpt_path`` contributes only a registered architecture and plain
    values to the run (:mod:`lightning_ood.models.trust`), never an import path, unless the user
    lists it in ``--allow_modules`` or configures ``model: wrap`` with that module themselves.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``grid`` (:meth:`OODTrainer.grid`: the model and the
        datamodule come from ``--model``/``--data``, its other arguments are flags)."""
        return {**LightningCLI.subcommands(), "grid": {"model", "datamodule"}}

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
            "<log_root>/<experiment>/version_N/predictions.csv, a new file per run).",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="test/predict: run even though the network has no trained weights (neither "
            "--ckpt_path nor model.model_kwargs.weights); the results then describe a random "
            "network, and no fitted.ckpt is written.",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: replace the checkpoints of an earlier run of this experiment (otherwise "
            "refused: resume it with --ckpt_path last); they are moved aside and deleted only "
            "once the new run has written its first checkpoint. predict: replace an existing "
            "--predictions file.",
        )
        parser.add_argument(
            "--allow_modules",
            type=list[str],
            default=[],
            help="Import paths of your own network classes (my_pkg.nets.MyNet) that a checkpoint "
            "or ensemble member file recording `model: wrap` may name. A file can never make "
            "lightning-ood import anything else.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # the raw flags, to tell flags the user gave from defaults (see _parse_ckpt_path)
        if args is None:
            self._argv = sys.argv[1:]
        else:
            self._argv = [str(a) for a in args] if isinstance(args, list | tuple) else []
        if args is None or isinstance(args, list | tuple):
            # `--config demo`: a config shipped in the package (lightning_ood/configs/)
            self.config = parser.parse_args(packaged_configs(_grid_switches(self._argv)))
            return
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # Overrides LightningCLI's private hook (lightning 2.6, LightningCLI._parse_ckpt_path,
        # called from __init__ right after parse_arguments), which merges *every*
        # hyperparameter of the file into the config (including `_class_path`, and wrap import
        # paths that the model then imports and calls) and silently replaces the user's flags.
        # Upstream has no public hook for this: Lightning-AI/pytorch-lightning#21255 asks for
        # one (PR #21408, `adapt_checkpoint_hparams`, unmerged as of lightning 2.6.6), and
        # #20801/#21455 track the checkpoint's values replacing given flags. Drop this override
        # for that hook once released. A checkpoint is data, so only the task's plain arguments
        # are taken from it, each checked by lightning_ood.models.trust; the file is read
        # through safe_load so a truncated, corrupt, code-carrying or bare-weights file fails
        # with an error naming it and the fix; flags it replaces are warned about.
        self._ckpt_data: dict[str, Any] = {}
        sub = self.config.get("subcommand")
        self._trust_user_modules(sub)
        path = self.config[sub].get("ckpt_path") if sub else None
        if not (path and path not in ("last", "best", "hpc", "registry") and Path(path).is_file()):
            return  # Lightning resolves "last"/"best" to files of this run: nothing to merge
        ckpt = safe_load(path)
        check_lightning_checkpoint(ckpt, path)
        self._ckpt_data = dict((ckpt.get("lightning_ood") or {}).get("data") or {})
        try:
            hparams = checkpoint_task_args(ckpt.get("hyper_parameters"), f"--ckpt_path {path}")
        except UntrustedCheckpointError as err:
            raise SystemExit(f"lightning-ood {sub}: {err}") from None
        if not hparams:
            return
        given = self._given_model_args(sub)
        # Assigned, never parsed: jsonargparse reads a string under an `Any` type as YAML and
        # instantiates a `class_path` in it, so a file's values must not go through the parser.
        model_cfg = self.config[sub]["model"]
        for key, value in hparams.items():
            model_cfg[key] = copy.deepcopy(value)
        for key, value in given.items():
            now = model_cfg.get(key)
            if _same_arg(now, value):
                continue
            rank_zero_warn(
                f"[lightning_ood] --ckpt_path {path}: the checkpoint's {key}={now!r} replaces "
                f"the given {key}={value!r}. A checkpoint is always rebuilt as it was trained "
                f"(its weights, class count and detectors); drop --model.{key}, or drop "
                "--ckpt_path to build the configured model instead."
            )

    def _trust_user_modules(self, sub: str | None) -> None:
        """The user's own ``--allow_modules`` and ``model: wrap`` module are the import paths
        that files read in this run (a checkpoint, ensemble members) may name."""
        if not sub:
            return
        cfg = self.config[sub]
        names = list(cfg.get("allow_modules") or [])
        model_cfg = cfg.get("model") or {}
        module = (model_cfg.get("model_kwargs") or {}).get("module")
        if model_cfg.get("model") == "wrap" and isinstance(module, str):
            names.append(module)
        trust_modules(names)

    def _given_model_args(self, sub: str) -> dict[str, Any]:
        """Model arguments set by a flag or a config file (not left at their defaults), among
        those a checkpoint's hyperparameters replace."""
        defaults = inspect.signature(ClassificationTask.__init__).parameters
        named = [a.split("=")[0] for a in getattr(self, "_argv", []) if a.startswith("--model.")]
        model_cfg = self.config[sub]["model"]
        given = {}
        for key in _CKPT_MODEL_ARGS:
            value = model_cfg.get(key)
            flag = f"--model.{key}"
            by_flag = any(n == flag or n.startswith(f"{flag}.") for n in named)
            if by_flag or not _same_arg(value, defaults[key].default):
                given[key] = copy.deepcopy(value)
        return given

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        if sub is None:
            return
        cfg = self.config[sub]
        try:  # before anything is written: a name may not leave the roots
            run_folder(cfg["checkpoint_root"], cfg["experiment"])
            run_folder(cfg["log_root"], cfg["experiment"])
        except (ValueError, RuntimeError, OSError) as err:  # RuntimeError: a symlink loop
            raise SystemExit(f"lightning-ood {sub}: {err}") from None
        if sub == "grid" and cfg.get("device") is not None:
            self._translate_device(cfg)
        if sub not in ("test", "predict"):
            return
        weights = (cfg["model"].get("model_kwargs") or {}).get("weights")
        if cfg.get("ckpt_path") or weights or cfg["allow_untrained"]:
            return
        raise SystemExit(
            f"lightning-ood {sub}: refusing to {sub} a network with untrained weights. Neither "
            "--ckpt_path nor model.model_kwargs.weights is given, so the backbone is randomly "
            "initialised and its accuracy and OOD scores mean nothing. Pass the trained run's "
            "checkpoint (--ckpt_path <checkpoint_root>/<experiment>/last.ckpt) or the "
            "backbone's weights (--model.model_kwargs.weights PATH); or --allow_untrained true "
            f"to {sub} the untrained network on purpose (no fitted.ckpt is then written)."
        )

    @staticmethod
    def _translate_device(cfg: Any) -> None:
        """``grid --device X`` (the old parser's flag): deprecated, becomes
        ``--trainer.accelerator``/``--trainer.devices`` before the trainer is built."""
        try:
            accelerator, devices = device_to_trainer(str(cfg["device"]))
        except ValueError as err:
            raise SystemExit(f"lightning-ood grid: {err}") from None
        warnings.warn(
            DEVICE_DEPRECATION.format(accelerator=accelerator, devices=devices),
            FutureWarning,
            stacklevel=2,
        )
        cfg["trainer"]["accelerator"] = accelerator
        cfg["trainer"]["devices"] = devices
        cfg["device"] = None

    def instantiate_classes(self) -> None:
        # jsonargparse reports a class that refuses its arguments as "Does not validate against
        # any of the Union subtypes" plus a dump of the config, with the project's own message
        # buried above; the user needs that message, so it becomes the last line printed.
        try:
            super().instantiate_classes()
        except Exception as err:
            own = _own_refusal(err)
            if own is None:
                raise
            sub = f" {self.subcommand}" if self.subcommand else ""
            raise SystemExit(f"lightning-ood{sub}: {own}") from err

    def after_instantiate_classes(self) -> None:
        sub = self.subcommand
        if sub is None:
            return
        cfg = self.config[sub]
        self._check_class_count(sub, cfg.get("ckpt_path"))
        if sub == "fit":
            self._refuse_replacing_a_run(cfg.get("ckpt_path"), cfg["experiment"], cfg["overwrite"])
        weights = (cfg["model"].get("model_kwargs") or {}).get("weights")
        if sub == "test" and not cfg.get("ckpt_path") and not weights:  # --allow_untrained
            for cb in self.trainer.callbacks:
                if isinstance(cb, OODEvaluation):
                    cb.untrained_weights = True

    def _check_class_count(self, sub: str, ckpt_path: str | None) -> None:
        """:func:`lightning_ood.task.check_class_count` before anything runs (``grid`` runs no
        Lightning loop, so ``setup`` would never check it): a checkpoint keeps its class count
        (its num_classes replaces --model.num_classes), so the advice names the fix that can
        actually help."""
        try:
            data_classes = self.datamodule.num_classes
        except (AttributeError, NotImplementedError, TypeError):
            return
        from_ckpt = bool(ckpt_path and Path(ckpt_path).is_file())
        hp = self.model.hparams
        data = getattr(self, "_ckpt_data", {})
        try:
            check_class_count(
                hp["num_classes"],
                data_classes,
                type(self.datamodule).__name__,
                model=hp.get("model"),
                ckpt_path=ckpt_path if from_ckpt else None,
                trained_on=data.get("data_version") or data.get("id_set"),
            )
        except ValueError as err:
            raise SystemExit(f"lightning-ood {sub}: {err}") from None

    def _refuse_replacing_a_run(
        self, ckpt_path: str | None, experiment: str, overwrite: bool = False
    ) -> None:
        """``fit`` writes ``last.ckpt`` and the best epoch into a fixed folder: a second run of
        the same experiment would replace the first one's checkpoints. Refused, or with
        ``overwrite`` the earlier run's checkpoints (``fitted.ckpt`` included, so that no file
        of the replaced model is left to be loaded by mistake) are moved aside
        (:func:`lightning_ood.runs.move_aside`) and deleted only once the new run has written
        its first checkpoint; a run that fails before that gets them back."""
        for cb in self.trainer.checkpoint_callbacks:
            folder = Path(cb.dirpath) if getattr(cb, "dirpath", None) else None
            if folder is None or not folder.is_dir():
                continue
            if ckpt_path and (
                ckpt_path in ("last", "hpc") or Path(ckpt_path).resolve().parent == folder.resolve()
            ):
                continue  # resuming the run that lives in this folder
            earlier = sorted(p.name for p in folder.glob("*.ckpt"))
            if earlier and overwrite:
                if not _is_launching_rank():
                    continue  # rank 0 moved them aside before it started this process
                backup = move_aside(folder, earlier)
                self.trainer.callbacks.insert(0, ReplacedRunGuard(folder, backup, earlier))
                rank_zero_info(
                    f"[lightning_ood] --overwrite: moved the earlier run's {earlier} to {backup}; "
                    "they are deleted once this run writes its first checkpoint, and restored "
                    "if it fails before"
                )
            elif earlier:
                raise SystemExit(
                    f"lightning-ood fit: {folder} already holds the checkpoints of an earlier run "
                    f"of experiment {experiment!r} ({', '.join(earlier[:4])}); this fit would "
                    "replace them. Resume that run with --ckpt_path last, start a new one with "
                    "another --experiment NAME, or pass --overwrite true to replace them."
                )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        experiment = check_experiment(cfg["experiment"])
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = init.get("trainer") or {}
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(save_dir=cfg["log_root"], name=experiment)
        elif not trainer_cfg.get("default_root_dir"):
            # Without a logger, Lightning's log_dir (where the run's config.yaml is saved) is
            # default_root_dir, i.e. the working directory: keep it under --log_root instead.
            kwargs["default_root_dir"] = str(Path(cfg["log_root"]) / experiment)
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
                    # a re-run with --overwrite replaces files instead of writing -v1 copies,
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
        has_logger = trainer_cfg.get("logger") not in (False, [])
        if has_logger and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            # (Lightning refuses a LearningRateMonitor on a trainer without a logger)
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        if self.subcommand == "predict" and not any(
            isinstance(c, PredictionCSVWriter) for c in callbacks
        ):
            out = cfg["predictions"]
            try:  # refused before the trainer exists (the callback checks again at start)
                PredictionCSVWriter.refuse_existing(out, cfg["overwrite"])
            except FileExistsError as err:
                raise SystemExit(f"lightning-ood predict: {err}") from None
            callbacks.append(PredictionCSVWriter(out, overwrite=cfg["overwrite"]))
        kwargs["callbacks"] = callbacks
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            # atomic writes, weights-only reads (lightning_ood.checkpoint)
            plugins.append(SafeCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)

    def before_grid(self) -> None:
        """LightningCLI's hook before ``trainer.grid``: what only the command line knows (its
        configs and overrides, whether ``--data.init_args.val_ood_sets`` was given, the default
        results folder ``<log_root>/grid/<experiment>``)."""
        cfg = self.config["grid"]
        argv = getattr(self, "_argv", [])
        configs = [str(c) for c in cfg.get("config") or []]
        overrides = _overrides(argv[1:] if argv[:1] == ["grid"] else argv)
        self.trainer.grid_info = {
            "configs": configs,
            "cli_overrides": overrides,
            "val_names_given": any(a.split("=")[0].endswith(".val_ood_sets") for a in overrides),
        }
        if not cfg.get("out"):
            folder = run_folder(Path(cfg["log_root"]) / "grid", cfg["experiment"])
            self.config_init["grid"]["out"] = str(folder)


#: The configs shipped inside the package: ``--config demo`` is ``PACKAGED_CONFIGS/demo.yaml``.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_config(value: str) -> str:
    """``value`` when it is an existing path, else the packaged config it names (``demo``,
    ``ood/svhn``, ``configs/demo.yaml`` outside the checkout), else ``value`` unchanged (the
    parser then says the file does not exist)."""
    if not value or Path(value).exists():
        return value
    name = value.removeprefix("configs/")
    name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    candidate = (PACKAGED_CONFIGS / name).resolve()
    if PACKAGED_CONFIGS in candidate.parents and candidate.is_file():
        return str(candidate)
    return value


#: ``grid``'s flags that the old argparse parser took bare (``--no_cache``): a switch.
_GRID_SWITCHES = ("--no_cache", "--no_progress")
_BOOL_WORDS = {"true", "false", "yes", "no", "1", "0", "on", "off"}


def _grid_switches(argv: Sequence[str]) -> list[str]:
    """``argv`` with every bare ``grid`` switch (``--no_progress`` not followed by a value)
    given as ``--no_progress=true``: jsonargparse's ``bool`` flags need their value."""
    if "grid" not in argv:
        return list(argv)
    out: list[str] = []
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        bare = nxt is None or str(nxt).lower() not in _BOOL_WORDS
        out.append(f"{arg}=true" if arg in _GRID_SWITCHES and bare else arg)
    return out


def packaged_configs(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--config`` value passed through :func:`packaged_config`."""
    out: list[str] = []
    after_flag = False
    for arg in argv:
        if after_flag:
            out.append(packaged_config(arg))
        elif arg.startswith("--config="):
            out.append("--config=" + packaged_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
        after_flag = arg == "--config"
    return out


#: Model arguments a checkpoint's hyperparameters replace (``detectors`` come from the callback).
_CKPT_MODEL_ARGS = ("model", "num_classes", "model_kwargs", "channels_last")


def _own_refusal(err: BaseException) -> str | None:
    """The message of the innermost exception in ``err``'s chain that lightning-ood itself
    raised (a refused argument), or None when the failure is not one of ours."""
    package = str(Path(__file__).resolve().parent)
    found, seen = None, set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        if frames and str(Path(frames[-1].filename).resolve()).startswith(package):
            found = current
        current = current.__cause__ or current.__context__
    if found is None:
        return None
    return str(found) if isinstance(found, ValueError | TypeError | OSError) else None


def _is_launching_rank() -> bool:
    """True in the process the user started (DDP's launcher re-runs the CLI in the others with
    ``LOCAL_RANK``/``NODE_RANK`` set), which alone may move files."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _same_arg(a: Any, b: Any) -> bool:
    """Equal model arguments; ``None`` and ``{}`` are the same ``model_kwargs``."""
    return (a or None) == (b or None) if isinstance(a, dict) or isinstance(b, dict) else a == b


def main(args: ArgsType = None, run: bool = True) -> OODCLI:
    """Entry point for the console script, ``python -m lightning_ood`` and tests.

    The modules the run trusts (``--allow_modules``, the user's ``wrap`` module) are trusted
    for this call only.
    """
    with allow_modules(()):
        return OODCLI(
            ClassificationTask,
            OODDataModule,
            trainer_class=OODTrainer,
            parser_class=OODArgumentParser,
            subclass_mode_data=True,
            trainer_defaults={
                # Gradient-based detectors (ODIN, FSSD/Mahalanobis pre-processing) need autograd
                # inside the test loop, which inference_mode would forbid.
                "inference_mode": False,
            },
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "prog": "lightning-ood",
                "description": _DESCRIPTION,
                "epilog": _EPILOG,
                "grid": {"description": _GRID_DESCRIPTION},
            },
            args=args,
            run=run,
        )


_DESCRIPTION = (
    "lightning-ood: train a classifier, fit post-hoc OOD detectors, evaluate and hand off. "
    "fit/validate/test/predict/grid run on a Trainer (below, --trainer.* flags); models, "
    "inspect and serve are listed at the end."
)
_GRID_DESCRIPTION = (
    "Grid-search a detector's hyperparameters from cached features; select on validation OOD "
    "sets, report on the test sets. Takes the lightning-ood config flags (e.g. "
    "--data.init_args.train_every 10) and --trainer.* (--trainer.devices 2 "
    "--trainer.strategy ddp: one shard of every set per rank)."
)
#: The subcommands that are not Trainer methods, shown in ``lightning-ood --help``.
_EXTRA_SUBCOMMANDS = {
    "models": "list model names (registered, tv:NAME, timm:NAME, wrap) or one model's taps",
    "serve": "serve a fitted checkpoint over HTTP (LitServe; extra 'serve')",
    "inspect": "print a checkpoint's card: where every shipped number came from",
}
_EPILOG = (
    "more subcommands (each takes --help): "
    + "; ".join(f"{name}: {text}" for name, text in _EXTRA_SUBCOMMANDS.items())
    + ". lightning-ood --version prints the version."
)


def _overrides(argv: Sequence[str]) -> list[str]:
    """The flags of ``argv`` that are not the grid's own (``--config``, ``--grid``, ...): the
    config overrides recorded in the results (``--data.init_args.train_every 10``, ...)."""
    flags = set(inspect.signature(OODTrainer.grid).parameters) - {"self", "model", "datamodule"}
    own = {f"--{p}" for p in flags} | {"--config", "-c"}
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in own:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            skip = "=" not in arg and nxt is not None and not nxt.startswith("--")
            continue
        out.append(arg)
    return out


def grid_main(args: Sequence[str] | None = None) -> GridResult:
    """``lightning-ood grid`` as a function (tests, ``lightning-ood-grid``): the ``grid``
    subcommand of :func:`main` (:meth:`lightning_ood.trainer.OODTrainer.grid`); returns its
    result. ``args`` are the arguments after ``grid`` (default: ``sys.argv[1:]``).

    Several ranks (``--trainer.devices 2 --trainer.strategy ddp``) need the command line: the
    DDP launcher starts the other ranks by re-running this process's command.
    """
    argv = list(sys.argv[1:] if args is None else args)
    with warnings.catch_warnings():  # our own argv is not LightningCLI's: that is intended
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = main(["grid", *argv])
    result = cli.trainer.grid_result
    assert result is not None  # grid() ran (a refusal raises)
    return result


def models_main(args: Sequence[str] | None = None) -> str:
    """``lightning-ood models [--taps NAME]``: the model names, or one model's taps with their
    output shapes (printed, and returned for tests)."""
    from lightning_ood.models import create_model
    from lightning_ood.models.registry import registered_models
    from lightning_ood.models.zoo import describe_models, format_taps

    p = argparse.ArgumentParser(
        prog="lightning-ood models",
        description="List model names (registered, tv:NAME, timm:NAME, wrap), or the taps of one.",
    )
    p.add_argument("--taps", metavar="NAME", help="model name whose taps to list")
    p.add_argument("--num_classes", type=int, default=10, help="with --taps (default 10)")
    p.add_argument(
        "--model_kwargs",
        default="{}",
        help='with --taps: model arguments as YAML, e.g. "{image_size: 32, in_channels: 1}"',
    )
    ns = p.parse_args(args)
    if ns.taps:
        import yaml

        kwargs = yaml.safe_load(ns.model_kwargs) or {}
        model = create_model(ns.taps, num_classes=ns.num_classes, **kwargs)
        text = format_taps(model, ns.taps)
    else:
        text = describe_models(registered_models())
    print(text)
    return text


def inspect_main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """``lightning-ood inspect CKPT [--json]``: the checkpoint's card (where every shipped
    number came from), read as data; printed, and returned for tests."""
    import json

    from lightning_ood.card import card_of, format_card

    p = argparse.ArgumentParser(
        prog="lightning-ood inspect",
        description="Print a checkpoint's card: model, weights origin, data, training, each "
        "shipped detector's hyperparameters (tuned or not), threshold and combiner, and the "
        "reported metrics of its rows. The file is read weights-only; nothing in it runs.",
    )
    p.add_argument("ckpt_path", help="a lightning-ood .ckpt (fitted.ckpt carries the metrics)")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    ns = p.parse_args(args)
    ckpt = safe_load(ns.ckpt_path)
    check_lightning_checkpoint(ckpt, ns.ckpt_path)
    card = card_of(ckpt, ns.ckpt_path)
    print(json.dumps(card, indent=2, default=str) if ns.json else format_card(card))
    return card


def entrypoint() -> None:
    """Console script: like :func:`main` (or :func:`models_main`, :func:`inspect_main`, the
    server for ``models``/``inspect``/``serve``, which need no Trainer), but returns nothing
    (a return value would become the process exit status)."""
    argv = sys.argv[1:]
    if argv[:1] in (["--version"], ["-V"]):
        from lightning_ood import __version__

        print(f"lightning-ood {__version__}")
    elif argv[:1] == ["models"]:
        models_main(argv[1:])
    elif argv[:1] == ["inspect"]:
        inspect_main(argv[1:])
    elif argv[:1] == ["serve"]:
        from lightning_ood.serve import serve_main  # LitServe only when serving

        serve_main(argv[1:])
    else:
        main()


def grid_entrypoint() -> None:
    """Console script ``lightning-ood-grid``, the same as ``lightning-ood grid``."""
    grid_main()


if __name__ == "__main__":
    entrypoint()
