"""The FSSD LeNets the paper benchmarks evaluate: plain and Outlier-Exposure, one per seed.

The FSSD LeNet recipe (``benchmarks/configs/lenet_fashionmnist_train.yaml``: Adadelta 1.0,
StepLR 0.7, batch 64, 14 epochs in the paper) trained by ``lightning-ood fit``, one process per
network, ``--lanes`` at a time with one thread each (2 cores: 2 lanes):

* plain LeNets ``lenet_e{E}_seed{s}`` for ``--seeds`` (Base/ODIN/Maha/MCD/FSSD use 1-3; the
  Deep Ensemble takes all five as members);
* Outlier-Exposure LeNets for ``--oe_seeds`` (KMNIST test split as outliers, lambda 0.5):
  from scratch for E epochs (``oe_lenet_e{E}_seed{s}``), or with ``--oe_finetune F`` the plain
  LeNet of the seed fine-tuned with OE for F epochs (Hendrycks et al.'s variant; the recipe's
  optimizer restarts at lr 1.0), ``oeft{F}_lenet_e{E}_seed{s}``, after the plain ones.

Checkpoints go to ``<checkpoint_root>/<experiment>/last.ckpt`` (default ``checkpoints/bench``,
where ``fssd_table2``, ``fssd_multi_model``, ``fssd_corruption`` and ``fssd_odin_gap`` read
them); logs to ``.cache/bench_logs/<experiment>.log``. It replaces ``fssd_table2_train.sh`` and
``train_lenet_seeds.sh``::

    .venv/bin/python -m benchmarks.train_lenets --epochs 3                   # table2_train.sh 3
    .venv/bin/python -m benchmarks.train_lenets --epochs 14 --oe_finetune 2  # ... 14 2
    .venv/bin/python -m benchmarks.train_lenets --epochs 14 --seeds 1 2 3 --oe_seeds \\
        --plain_name 'lenet_fmnist_e{epochs}_seed{seed}'                   # train_lenet_seeds.sh

Writes ``<out>/train_lenets_e<E>.{json,md}`` (each network's wall time). ``--quick``: seed 1
plain and OE-fine-tuned, three training steps each, on every 100th image, under ``<out>/work``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import CACHE, LENET_RECIPE, ROOT, Recorder, parse, parser

OE_ARGS = ["--data.init_args.outlier_set", "kmnist", "--data.init_args.ood_sets", "[mnist]"]
QUICK_ARGS = [
    "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
    "--data.init_args.train_every", "100", "--data.init_args.num_workers", "0",
]  # fmt: skip


def fit(name: str, seed: int, epochs: int, extra: list[str], roots: dict[str, Path]) -> float:
    """``lightning-ood fit`` of the recipe as experiment ``name`` in its own one-thread process;
    returns its wall time. Raises with the log's tail when it fails."""
    log = roots["logs"] / f"{name}.log"
    cmd = [
        sys.executable, "-m", "lightning_ood", "fit", "--config", str(LENET_RECIPE),
        "--seed_everything", str(seed), "--trainer.max_epochs", str(epochs),
        "--experiment", name, "--checkpoint_root", str(roots["ckpt"]),
        "--log_root", str(roots["logs"]), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited {proc.returncode}: see {log}\n{log.read_text()[-2000:]}")
    print(f"{name}: {seconds:.0f} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=14, help="plain LeNets' epochs (paper: 14)")
    p.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3, 4, 5])
    p.add_argument("--oe_seeds", type=int, nargs="*", default=[1, 2, 3])
    p.add_argument("--oe_finetune", type=int, default=None, help="OE fine-tuning epochs")
    p.add_argument("--plain_name", default="lenet_e{epochs}_seed{seed}")
    p.add_argument("--checkpoint_root", type=Path, default=ROOT / "checkpoints" / "bench")
    p.add_argument("--lanes", type=int, default=2, help="networks trained at once")
    p.add_argument(
        "--val_size",
        type=int,
        default=0,
        help="training images held out (data.val_size): runs that tune or calibrate on a "
        "hold-out (fssd_table2's tuned runs: 2000; fssd_odin_gap: 1000 x --every) are refused "
        "on networks that trained on it",
    )
    ns = parse(p, argv)
    extra: list[str] = ["--data.init_args.val_size", str(ns.val_size)] if ns.val_size else []
    roots = {"ckpt": ns.checkpoint_root, "logs": CACHE / "bench_logs"}
    if ns.quick:
        vars(ns).update(epochs=1, seeds=[1], oe_seeds=[1], oe_finetune=1)
        roots = {"ckpt": ns.out / "work" / "ckpt", "logs": ns.out / "work" / "logs"}
        extra = [*extra, *QUICK_ARGS]
    for folder in roots.values():
        folder.mkdir(parents=True, exist_ok=True)
    rec = Recorder(f"train_lenets_e{ns.epochs}")
    e = ns.epochs

    def plain(s: int) -> tuple[str, float]:
        name = ns.plain_name.format(epochs=e, seed=s)
        return name, fit(name, s, e, extra, roots)

    def oe(s: int) -> tuple[str, float]:
        if ns.oe_finetune is None:
            name = f"oe_lenet_e{e}_seed{s}"
            return name, fit(name, s, e, [*OE_ARGS, *extra], roots)
        base = roots["ckpt"] / ns.plain_name.format(epochs=e, seed=s) / "last.ckpt"
        if not base.is_file():
            raise SystemExit(f"OE fine-tuning of seed {s} needs {base}: train it (--seeds {s})")
        name = f"oeft{ns.oe_finetune}_lenet_e{e}_seed{s}"
        weights = ["--model.model_kwargs.weights", str(base)]
        return name, fit(name, s, ns.oe_finetune, [*OE_ARGS, *weights, *extra], roots)

    times: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=ns.lanes) as pool:
        times.update(pool.map(plain, ns.seeds))  # plain first: fine-tuning starts from them
        times.update(pool.map(oe, ns.oe_seeds))
    ckpts = {n: str(roots["ckpt"] / n / "last.ckpt") for n in times}
    lines = [
        f"LeNet recipe `{LENET_RECIPE.relative_to(ROOT)}`, {ns.lanes} lanes of one thread.",
        "",
    ]
    lines += ["| network | wall s | checkpoint |", "|---|---:|---|"]
    lines += [f"| {n} | {t:.0f} | `{ckpts[n]}` |" for n, t in times.items()]
    body = "\n".join(lines)
    print(body)
    rec.write({"seconds": times, "checkpoints": ckpts, "epochs": e}, body, ns.out)


if __name__ == "__main__":
    main()
