"""What every benchmark shares: paths, one argument convention, the evaluation, the record.

* **Paths.** The data root comes from the library's own resolution
  (:func:`lightning_ood.data.paths.default_data_root`: ``LIGHTNING_OOD_DATA``, then
  ``../shared/data``), overridable with ``--data_root``; the reference DenseNet checkpoints live
  under ``<data root>/checkpoints`` (:func:`reference_weights`).
* **Arguments.** :func:`parser` gives every script ``--quick`` (tiny slices, seconds to a minute,
  for ``tests/benchmarks/test_quick.py``), ``--out`` (the folder of the result files; default
  ``benchmarks/results``), ``--data_root``, ``--device``, ``--seed`` and ``--threads``.
* **Evaluation.** :func:`evaluate` is the one place where a benchmark fits detectors, scores its
  sets and applies the evaluation protocol (``lightning_ood.engine`` / ``features`` /
  ``protocol``), so that moving the benchmarks onto ``lightning_ood.session`` changes one
  function. Benchmarks that evaluate a checkpoint as a user would go through the CLI instead
  (:func:`run_test`).
* **Record.** :class:`Recorder` writes ``<out>/<name>.json`` and ``.md`` with the command that
  regenerates them (``python -m benchmarks.<name> ...``), the git commit, the machine and the
  wall time.

Run a benchmark as a module from the checkout: ``.venv/bin/python -m benchmarks.<name> --help``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).absolute().parents[1]
#: Where committed results live (the default ``--out``).
RESULTS = ROOT / "benchmarks" / "results"
#: Where benchmarks keep what they may reuse (feature caches, CLI runs); git-ignored.
CACHE = ROOT / ".cache"
#: The reference DenseNet-BC-100 checkpoints, by ID dataset, under ``<data root>/checkpoints``.
REFERENCE_WEIGHTS = {
    "cifar10": "densenet100_cifar10_reference.pth.tar",
    "cifar100": "densenet100_cifar100_reference.pth.tar",
}
#: The FSSD LeNet training recipe of the paper benchmarks (14 epochs, Adadelta, StepLR).
LENET_RECIPE = ROOT / "benchmarks" / "configs" / "lenet_fashionmnist_train.yaml"


# -- paths ---------------------------------------------------------------------------------------
def data_root(value: str | os.PathLike[str] | None = None) -> Path:
    """``value`` (``--data_root``) or the library's default data root, resolved."""
    from lightning_ood.data.paths import resolve_root

    return resolve_root(value, download=False)[0]


def reference_weights(root: str | os.PathLike[str] | None = None, dataset: str = "cifar10") -> Path:
    """The reference DenseNet-BC-100 checkpoint of ``dataset`` under ``<data root>/checkpoints``.

    Raises:
        SystemExit: the file is missing (the message names the path and how to point at it).
    """
    if dataset not in REFERENCE_WEIGHTS:
        raise ValueError(f"reference_weights: dataset must be one of {sorted(REFERENCE_WEIGHTS)}")
    path = data_root(root) / "checkpoints" / REFERENCE_WEIGHTS[dataset]
    if not path.is_file():
        raise SystemExit(
            f"reference checkpoint {path} not found: pass --data_root (or set LIGHTNING_OOD_DATA) "
            "to the folder holding checkpoints/" + REFERENCE_WEIGHTS[dataset]
        )
    return path


# -- arguments -----------------------------------------------------------------------------------
def parser(doc: str | None, **kwargs: Any) -> argparse.ArgumentParser:
    """The shared argument parser: the script's ``__doc__`` (first paragraph as description)
    plus ``--quick --out --data_root --device --seed --threads``; add the script's own options
    to it, then call :func:`parse`."""
    kwargs.setdefault("description", (doc or "").split("\n\n")[0])
    p = argparse.ArgumentParser(**kwargs)
    g = p.add_argument_group("shared benchmark options (benchmarks/common.py)")
    g.add_argument(
        "--quick",
        action="store_true",
        help="tiny slices and few steps: checks the script end to end in seconds; results are "
        "meaningless and --out must not be benchmarks/results",
    )
    g.add_argument("--out", type=Path, default=None, help=f"result folder (default {RESULTS})")
    g.add_argument(
        "--data_root",
        type=Path,
        default=None,
        help="data root (default: lightning_ood.data.paths.default_data_root())",
    )
    g.add_argument("--device", default="cpu", help="torch device of in-process models")
    g.add_argument("--seed", type=int, default=0, help="seed of torch/random at start")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


def parse(
    p: argparse.ArgumentParser, argv: Sequence[str] | None = None, *, extra: bool = False
) -> argparse.Namespace:
    """Parse, resolve ``out``/``data_root``, seed torch and ``random``, set the threads.

    A ``--quick`` run never writes into ``benchmarks/results`` (its numbers mean nothing):
    without ``--out`` it writes into a fresh temporary folder. ``extra=True``: options the
    parser does not know are kept in ``ns.extra`` (for a wrapped CLI) instead of refused.
    """
    if extra:
        ns, ns_extra = p.parse_known_args(argv)
        ns.extra = ns_extra
    else:
        ns = p.parse_args(argv)
    if ns.quick and ns.out is None:
        ns.out = Path(tempfile.mkdtemp(prefix="benchmark_quick_"))
    ns.out = (ns.out or RESULTS).resolve()
    if ns.quick and ns.out == RESULTS.resolve():
        p.error(f"--quick must not write into {RESULTS}: pass another --out")
    ns.data_root = data_root(ns.data_root)
    torch.manual_seed(ns.seed)
    random.seed(ns.seed)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    return ns


def work_dir(ns: argparse.Namespace, default: str) -> Path:
    """Folder of a script's reusable intermediate runs: ``ns.work`` if the script has such an
    option and it is set, ``<out>/work`` in quick mode (never the real caches), else
    ``.cache/<default>``."""
    given = getattr(ns, "work", None)
    if given:
        return Path(given) if Path(given).is_absolute() else ROOT / given
    return ns.out / "work" if ns.quick else CACHE / default


# -- evaluation ---------------------------------------------------------------------------------
def source(data: Any, backbone: Any) -> Any:
    """``data`` as a :mod:`lightning_ood.session` source: cached features (or sharded ones)
    as a ``CachedSource``, anything else (a loader, batches) as a ``LoaderSource``."""
    from lightning_ood.features import CachedFeatures, ShardedFeatures
    from lightning_ood.session import CachedSource, LoaderSource

    if isinstance(data, CachedFeatures | ShardedFeatures):
        return CachedSource(data)
    return LoaderSource(data, backbone)


def session(backbone: Any, per_set_holdout: int = 0, seed: int = 42) -> Any:
    """The library's evaluation session with the benchmarks' protocol: every reported sample
    scored, unless ``per_set_holdout`` > 0 holds that many out of each set (seed ``seed``) for
    the papers' per-set layer-ensemble rows."""
    from lightning_ood.protocol import Protocol
    from lightning_ood.session import EvaluationSession

    protocol = Protocol(per_set_holdout=per_set_holdout, per_set_seed=seed)
    return EvaluationSession(backbone, protocol)


def evaluate(
    detectors: Mapping[str, Any],
    backbone: Any,
    sets: Mapping[str, Any],
    train: Any = None,
    *,
    per_set_holdout: int = 0,
    seed: int = 42,
) -> Any:
    """The benchmarks' one evaluation, through :class:`lightning_ood.session.EvaluationSession`:
    fit ``detectors`` together on ``train`` (skipped when None: they are fitted already),
    score every set of ``sets`` (the ID set first, then the OOD sets; cached features or
    loaders; one pass per set for every detector) and apply the protocol
    (:func:`lightning_ood.protocol.evaluate_detectors`).

    Returns its :class:`~lightning_ood.protocol.Evaluation`: ``metrics[detector][ood_set]``
    holds AUROC, AUPR-In/Out, FPR95 (ID positive) and counts, plus ``"average"``; a layer
    ensemble with ``per_set_holdout`` > 0 also has its papers' per-set row
    ``<name>[per-set]``.
    """
    run = session(backbone, per_set_holdout, seed)
    if train is not None:
        run.fit(list(detectors.values()), source(train, backbone))
    bank = run.score(detectors, {n: source(data, backbone) for n, data in sets.items()})
    return run.evaluate(detectors, bank.banks(), list(sets), per_set=per_set_holdout > 0)


def evaluate_banks(
    detectors: Mapping[str, Any],
    banks: Mapping[str, Sequence[torch.Tensor]],
    set_names: Sequence[str],
    *,
    per_set_holdout: int = 0,
    seed: int = 42,
) -> Any:
    """The protocol step of :func:`evaluate` on scores at hand (``banks``: per detector, the
    scores or layer-ensemble components of each set of ``set_names``, ID first): each
    detector's shipped row, plus the per-set-combiner rows when ``per_set_holdout`` > 0."""
    run = session(None, per_set_holdout, seed)  # the protocol step reads no network
    return run.evaluate(detectors, banks, list(set_names), per_set=per_set_holdout > 0)


# -- memory of this process (Linux) --------------------------------------------------------------
def memory() -> dict[str, int]:
    """This process's resident set ``VmRSS`` and its peak ``VmHWM``, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_memory() -> bool:
    """Make the peak RSS (``VmHWM``) the current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# -- the reference CIFAR-10 DenseNet -------------------------------------------------------------
#: ``--quick`` slices of the DenseNet benchmarks: 50 training, 20 ID test, 20 images per OOD set.
QUICK_SLICES = {"train_every": 1000, "test_every": 500, "ood_every": 500}
#: The OOD sets of the CIFAR-10 DenseNet benchmarks (LINe's Table 1 sets available here).
CIFAR10_OOD = ["tinyimagenet_crop", "tinyimagenet_resize", "mnist", "fashionmnist", "kmnist"]
#: The reference DenseNet's per-channel input std: ODIN's step is divided by it.
CIFAR10_STD = [0.2023, 0.1994, 0.2010]
#: The FSSD LeNet's taps: Mahalanobis's layer ensemble, and FSSD's (plus the logits).
LENET_TAPS_MAHA = ["conv1", "conv2", "fc1"]
LENET_TAPS_FSSD = ["conv1", "conv2", "fc1", "logits"]


def cifar10_densenet(
    ns: argparse.Namespace,
    ood_sets: Sequence[str] = tuple(CIFAR10_OOD),
    batch_size: int = 32,
    **every: int,
) -> tuple[Any, Any, dict[str, Any], list[str]]:
    """The reference DenseNet-BC-100 and the CIFAR-10 JPEG-q75 data of
    ``configs/line_densenet_cifar10.yaml`` (``every``: ``train_every``/``test_every``/
    ``ood_every`` slices; the same slices give the same feature-cache keys in every script).

    Returns ``(backbone in eval mode, datamodule, {set: test loader}, set names)``.
    """
    import warnings

    from lightning_ood.cli import main as cli_main

    args = [
        "--config", str(ROOT / "configs" / "line_densenet_cifar10.yaml"),
        "--model.model_kwargs.weights", str(reference_weights(ns.data_root)),
        "--data.init_args.root", str(ns.data_root),
        "--data.init_args.ood_sets", json.dumps(list(ood_sets)),
        "--data.init_args.eval_batch_size", str(batch_size),
        "--trainer.accelerator", "cpu" if ns.device == "cpu" else "auto",
    ]  # fmt: skip
    for key, value in every.items():
        args += [f"--data.init_args.{key}", str(value)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = cli_main(args, run=False)
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("test")
    names = list(dm.test_set_names)
    loaders = dict(zip(names, dm.test_dataloader(), strict=True))
    return cli.model.backbone.eval().to(ns.device), dm, loaders, names


def cached_features(cache: Any, backbone: Any, loader: Any, name: str, allow_compute: bool) -> Any:
    """The cached features of one loader (penultimate features and logits); computed only
    with ``allow_compute``, else a SystemExit that says how to fill the cache."""
    from lightning_ood.features import backbone_fingerprint, describe_loader

    dataset_id, transform_id = describe_loader(loader)
    hit = cache.load(backbone_fingerprint(backbone), dataset_id, transform_id, [])
    if hit is not None:
        return hit
    if not allow_compute:
        raise SystemExit(
            f"no cached features for {name!r} under {cache.root} with these slices; run "
            "`python -m benchmarks.line_densenet_cifar10 --stage features` with the same "
            "--*_every options, or pass --allow_compute"
        )
    t0 = time.perf_counter()
    out = cache.get_or_compute(backbone, loader, [], desc=name)
    print(f"computed {name}: {len(out)} samples in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# -- tiny checkpoints for --quick ----------------------------------------------------------------
def quick_lenets(
    folder: Path, experiments: Mapping[str, int], root: Path, steps: int = 3, **data: Any
) -> dict[str, Path]:
    """LeNets of the FSSD recipe trained for ``steps`` batches each, in-process, as
    ``<folder>/<experiment>/last.ckpt`` (``experiments``: name -> seed): stand-ins for the
    paper checkpoints in ``--quick`` runs. ``data`` overrides the datamodule's arguments."""
    from lightning_ood.cli import main as cli_main

    recipe = yaml.safe_load(LENET_RECIPE.read_text())
    out: dict[str, Path] = {}
    for name, seed in experiments.items():
        ckpt = folder / name / "last.ckpt"
        out[name] = ckpt
        if ckpt.is_file():
            continue
        cfg = {k: v for k, v in recipe.items() if k not in ("experiment", "seed_everything")}
        cfg["trainer"] = {
            **recipe["trainer"],
            "max_epochs": 1,
            "max_steps": steps,
            "limit_val_batches": 0,
            "enable_model_summary": False,
        }
        cfg["data"]["init_args"] = {
            **recipe["data"]["init_args"],
            "root": str(root),
            "num_workers": 0,
            "train_every": 100,
            **data,
        }
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args = ["fit", "--config", str(path), "--seed_everything", str(seed)]
        args += ["--experiment", name, "--checkpoint_root", str(folder)]
        cli_main([*args, "--log_root", str(folder / "logs")])
        if not ckpt.is_file():
            raise RuntimeError(f"quick LeNet {name}: no {ckpt} after fitting")
    return out


#: Detectors of :func:`quick_demo`'s checkpoint: what the hand-off benchmarks read from the demo.
QUICK_DEMO_DETECTORS: dict[str, dict[str, Any]] = {
    "msp": {},
    "energy": {},
    "line": {"delta": 1.0, "p_a": 90, "p_w": 90},
    "mahalanobis": {"taps": ["conv1", "conv2", "fc1"]},
    "fssd": {"taps": ["conv1", "conv2", "fc1", "logits"], "noise": "reference"},
}


def quick_demo(folder: Path, root: Path) -> tuple[Path, Path]:
    """A stand-in for ``make demo``'s ``checkpoints/demo/fitted.ckpt`` in ``--quick`` runs:
    ``configs/demo.yaml`` on slices (3 training steps, no tuning, :data:`QUICK_DEMO_DETECTORS`),
    trained, fitted and calibrated by ``lightning-ood fit``, in-process. Returns
    ``(checkpoint, config)``; the config is the one to build the datamodule from."""
    from lightning_ood.cli import main as cli_main

    ckpt, path = folder / "quick_demo" / "last.ckpt", folder / "quick_demo.yaml"
    if ckpt.is_file() and path.is_file():
        return ckpt, path
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg.pop("experiment", None)
    cb = cfg["trainer"]["callbacks"][0]["init_args"]
    cb.pop("tune", None)
    cb.update(detectors=QUICK_DEMO_DETECTORS, per_set_holdout=20, progress=False, figures=False)
    cfg["trainer"].update(
        max_epochs=1, max_steps=3, limit_val_batches=0, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    cfg["data"]["init_args"].update(
        root=str(root), train_every=100, test_every=50, ood_every=50, val_size=1000,
        val_ood_sets=[{"name": "kmnist", "every": 50}], eval_batch_size=200,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    roots = ["--experiment", "quick_demo", "--checkpoint_root", str(folder)]
    roots += ["--log_root", str(folder / "logs")]
    cli_main(["fit", "--config", str(path), *roots])  # fits and calibrates after training
    if not ckpt.is_file():
        raise RuntimeError(f"quick demo: no {ckpt} after fitting")
    return ckpt, path


# -- runs through the CLI ------------------------------------------------------------------------
def _stamps(cfg: Any, ckpt: Path | None) -> str:
    """Size and mtime of every checkpoint file the run reads (``--ckpt_path`` and any path in
    the config, e.g. DE members): a member retrained or still training under the same path
    changes the key, so a stale run is never reused."""
    paths: list[str] = [] if ckpt is None else [str(ckpt)]

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and x.endswith((".ckpt", ".pth", ".pt", ".tar")):
            paths.append(x)

    walk(cfg)
    lines = []
    for p in dict.fromkeys(paths):
        f = ROOT / p
        st = f.stat() if f.is_file() else None
        lines.append(
            f"# {p}: " + (f"{st.st_size} bytes, mtime_ns {st.st_mtime_ns}" if st else "missing")
        )
    return "".join(line + "\n" for line in lines)


def paper_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The rows the papers' tables report: a layer ensemble's per-set-combiner row
    (``<name>[per-set]``: a combiner fitted on a hold-out of each test set, as the FSSD and
    Mahalanobis papers do) under its detector's name; every other detector's row as it is.
    Runs written before the rows were split hold only the per-set row, under the name."""
    from lightning_ood.protocol import PER_SET, per_set_row

    return {
        name: metrics.get(per_set_row(name), rows)
        for name, rows in metrics.items()
        if not name.endswith(PER_SET)
    }


def run_test(
    tag: str,
    cfg: dict[str, Any],
    out: Path,
    ckpt: Path | None = None,
    threads: int | None = None,
    prefix: str = "hA",
) -> dict[str, Any]:
    """Run ``lightning-ood test`` on ``cfg`` (its first callback must be ``OODEvaluation``) in a
    subprocess and return its ``ood_results.json``; reused when unchanged.

    Args:
        tag: run name: ``out/tag.yaml`` (config), ``out/tag.log``, ``out/tag/`` (results).
        cfg: the full CLI config; not modified.
        out: folder of the runs.
        ckpt: ``--ckpt_path``; part of the reuse key (the same config on other weights is
            another run).
        threads: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of the run; ``None`` inherits.
        prefix: experiment name prefix (``<prefix>_<tag>``) under ``out/ckpt`` and ``out/logs``.
    """
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg["trainer"]["callbacks"][0]["init_args"]["results_dir"] = str(out / tag)
    path = out / f"{tag}.yaml"
    text = yaml.safe_dump(cfg) + f"# ckpt_path: {ckpt}\n" + _stamps(cfg, ckpt)
    done = out / tag / "ood_results.json"
    if done.exists() and path.exists() and path.read_text() == text:  # same run: reuse
        return json.loads(done.read_text())
    path.write_text(text)
    cmd = [
        sys.executable, "-m", "lightning_ood", "test", "--config", str(path),
        "--experiment", f"{prefix}_{tag}",
        "--checkpoint_root", str(out / "ckpt"), "--log_root", str(out / "logs"),
    ]  # fmt: skip
    if ckpt is not None:
        cmd += ["--ckpt_path", str(ckpt)]
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    (out / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        path.unlink(missing_ok=True)  # never reuse a failed run
        raise RuntimeError(
            f"{tag}: lightning-ood test exited {proc.returncode}; see {out}/{tag}.log:\n"
            + (proc.stdout + proc.stderr)[-2000:]
        )
    return json.loads(done.read_text())


def epoch_suffix(epochs: int) -> str:
    """``_e<E>`` for LeNets of other than 3 epochs (the 3-epoch runs came first), so that runs
    on other networks never overwrite them."""
    return "" if epochs == 3 else f"_e{epochs}"


# -- the record ----------------------------------------------------------------------------------
def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception as err:  # pragma: no cover - no git
        return f"unavailable ({err})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_info() -> str:
    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return "none (CUDA not available)"


def loadavg() -> list[float]:
    try:
        return [float(x) for x in os.getloadavg()]
    except OSError:
        return []


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reruns this process: ``.venv/bin/python -m benchmarks.<name> ARGS``
    (prefixed with ``nice -n N`` when niced)."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).absolute()
    if script.parent == ROOT / "benchmarks" and script.suffix == ".py":
        head = ["-m", f"benchmarks.{script.stem}"]
    else:
        head = [os.path.relpath(script, ROOT)]
    niceness = os.nice(0)
    prefix = f"nice -n {niceness} " if niceness > 0 else ""
    return prefix + ".venv/bin/python " + shlex.join([*head, *argv[1:]])


class Recorder:
    """Start it at the top of a benchmark; call :meth:`write` with the results at the end.

    Every result records the exact command that regenerates it, the git commit (and whether
    tracked files were modified), CPU and GPU, torch version/threads, wall time, and the load
    average at start and end (on a shared machine a start load well above the core count's
    share means timings may be inflated).
    """

    def __init__(self, name: str, argv: Sequence[str] | None = None) -> None:
        self.name = name
        self.command = command_line(argv)
        self.t0 = time.perf_counter()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.load_start = loadavg()
        self.commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        self.dirty = bool(dirty) and not dirty.startswith("unavailable")

    def environment(self) -> dict[str, Any]:
        return {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "gpu": gpu_info(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        }

    def provenance(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "git_commit": self.commit,
            "git_dirty_tracked_files": self.dirty,
            "started": self.started,
            "wall_time_s": round(time.perf_counter() - self.t0, 2),
            "loadavg_start_1_5_15": self.load_start,
            "loadavg_end_1_5_15": loadavg(),
            "environment": self.environment(),
            "note": "load average counts this benchmark's own threads too; a start load well "
            "above 0.5 on a 2-core machine means other processes competed for the CPU",
        }

    def write(self, results: dict[str, Any], markdown_body: str, out_dir: Path) -> Path:
        """Write ``<out_dir>/<name>.json`` and ``.md`` atomically; returns the JSON path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        prov = self.provenance()
        payload = {"name": self.name, "provenance": prov, "results": results}
        env = prov["environment"]
        header = [
            f"# {self.name}",
            "",
            f"- command: `{prov['command']}`",
            f"- git commit: `{prov['git_commit']}`"
            + (" (tracked files modified at run time)" if prov["git_dirty_tracked_files"] else ""),
            f"- CPU: {env['cpu']} ({env['cpu_count']} logical cores, torch threads "
            f"{env['torch_threads']}); GPU: {env['gpu']}",
            f"- torch {env['torch']}, Python {env['python']}",
            f"- started {prov['started']}, wall time {prov['wall_time_s']:.1f} s",
            f"- load average (1/5/15 min) at start {prov['loadavg_start_1_5_15']}, at end "
            f"{prov['loadavg_end_1_5_15']} (includes this run's own threads)",
            "",
        ]
        md = "\n".join(header) + markdown_body.rstrip() + "\n"
        for suffix, text in ((".json", json.dumps(payload, indent=2, default=str)), (".md", md)):
            path = out_dir / f"{self.name}{suffix}"
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text + ("\n" if not text.endswith("\n") else ""))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        print(f"wrote {out_dir / self.name}.json and .md")
        return out_dir / f"{self.name}.json"


def pct(v: float) -> str:
    """A fraction as a percentage with two decimals (``nan`` kept)."""
    return "nan" if v != v else f"{100 * v:.2f}"
