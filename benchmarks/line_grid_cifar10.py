"""LINe (δ, p_a, p_w) grid on the reference CIFAR-10 DenseNet-BC-100, run from cached features.

The network runs once per set (training set under the eval transform, ID test set, every OOD
set); the 125 combinations of ``configs/grid/line_densenet_cifar10.yaml`` are then fitted and
scored from ``.cache/features``. Selection uses only the validation OOD sets of the grid spec
(KMNIST, FashionMNIST) and a seeded half of the ID test set; the other half and the config's
OOD sets (TinyImageNet crop/resize, MNIST) are reported, for the selected combination and for
the paper's values (δ 1.0, p_a 90, p_w 90), declared in the spec as the reference.

    python benchmarks/line_grid_cifar10.py            # full sets: ~80k DenseNet passes (GPU)
    python benchmarks/line_grid_cifar10.py --quick    # every 50th train / 10th test+OOD image

Prints the Markdown table and writes ``benchmarks/results/line_grid_cifar10[_quick]/
grid_results.{md,json,csv}``. The ID data is the JPEG-q75 copy of CIFAR-10 (see the data README),
so numbers are comparable only with other methods on that copy, not with the paper's tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_ood.cli import grid_main  # noqa: E402

QUICK = [
    "--data.init_args.train_every", "50",  # 1,000 training images
    "--data.init_args.test_every", "10",  # 1,000 ID test images
    "--data.init_args.ood_every", "10",  # 1,000 images per OOD set
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small slices (minutes on a CPU)")
    p.add_argument("--cache_dir", default=str(ROOT / ".cache" / "features"))
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/...)")
    ns, extra = p.parse_known_args(argv)
    name = "line_grid_cifar10" + ("_quick" if ns.quick else "")
    out = ns.out or str(ROOT / "benchmarks" / "results" / name)
    args = [
        "--config", str(ROOT / "configs" / "line_densenet_cifar10.yaml"),
        "--grid", str(ROOT / "configs" / "grid" / "line_densenet_cifar10.yaml"),
        "--cache_dir", ns.cache_dir,
        "--out", out,
        "--log_root", str(ROOT / "logs"),
        "--checkpoint_root", str(ROOT / "checkpoints"),
        *(QUICK if ns.quick else []),
        *extra,
    ]  # fmt: skip
    result = grid_main(args)
    best = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
    avg = result.test["average"]
    line = f"selected {best}: test FPR95 (ID+) {100 * avg['fpr95']:.2f}"
    line += f", AUROC {100 * avg['auroc']:.2f}"
    if result.reference is not None:
        ref = result.reference["test"]["average"]
        line += f"; paper values: FPR95 {100 * ref['fpr95']:.2f}, AUROC {100 * ref['auroc']:.2f}"
    print(line)


if __name__ == "__main__":
    main()
