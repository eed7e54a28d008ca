"""LINe (δ, p_a, p_w) grid on the reference CIFAR-10 DenseNet-BC-100, run from cached features.

The network runs once per set (training set under the eval transform, ID test set, every OOD
set); the 125 combinations of ``configs/grid/line_densenet_cifar10.yaml`` are then fitted and
scored from ``.cache/features``. Selection uses only the validation OOD sets of the grid spec
(KMNIST, FashionMNIST) and a seeded half of the ID test set; the other half and the config's
OOD sets (TinyImageNet crop/resize, MNIST) are reported, for the selected combination and for
the paper's values (δ 1.0, p_a 90, p_w 90), declared in the spec as the reference.

    python -m benchmarks.line_grid_cifar10            # full sets: ~80k DenseNet passes (GPU)
    python -m benchmarks.line_grid_cifar10 --small    # every 50th train / 10th test+OOD image
    python -m benchmarks.line_grid_cifar10 --quick --out /tmp/q   # 50 / 20 / 20 images

Prints the selection and writes ``<out>/line_grid_cifar10[_quick]/grid_results.{md,json,csv}``
(the ``_quick`` folder holds the ``--small`` run, its historical name) and the record
``<out>/line_grid_cifar10[_small].{json,md}``. The ID data is the JPEG-q75 copy of CIFAR-10
(see the data README), so numbers are comparable only with other methods on that copy, not
with the paper's tables. Options this script does not know go to ``lightning-ood grid``.
"""

from __future__ import annotations

from benchmarks.common import (
    CACHE,
    QUICK_SLICES,
    ROOT,
    Recorder,
    parse,
    parser,
    pct,
    reference_weights,
    work_dir,
)

SMALL = {"train_every": 50, "test_every": 10, "ood_every": 10}  # 1,000 images per set


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--small", action="store_true", help="1,000 images per set (CPU minutes)")
    p.add_argument("--cache_dir", default=str(CACHE / "features"))
    ns = parse(p, argv, extra=True)
    from lightning_ood.cli import grid_main
    from lightning_ood.trainer import device_to_trainer

    slices = QUICK_SLICES if ns.quick else SMALL if ns.small else {}
    work = work_dir(ns, "features")
    cache_dir = str(work / "features") if ns.quick else ns.cache_dir
    name = "line_grid_cifar10" + ("_quick" if ns.small else "")
    rec = Recorder("line_grid_cifar10" + ("_small" if ns.small else ""))
    accelerator, devices = device_to_trainer(ns.device)
    args = [
        "--config", str(ROOT / "configs" / "line_densenet_cifar10.yaml"),
        "--grid", str(ROOT / "configs" / "grid" / "line_densenet_cifar10.yaml"),
        "--cache_dir", cache_dir,
        "--out", str(ns.out / name),
        "--log_root", str(work / "logs" if ns.quick else ROOT / "logs"),
        "--checkpoint_root", str(work / "ckpt" if ns.quick else ROOT / "checkpoints"),
        "--trainer.accelerator", accelerator, "--trainer.devices", str(devices),
        "--model.model_kwargs.weights", str(reference_weights(ns.data_root)),
        "--data.init_args.root", str(ns.data_root),
        *(a for k, v in slices.items() for a in (f"--data.init_args.{k}", str(v))),
        *ns.extra,
    ]  # fmt: skip
    result = grid_main(args)
    best = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
    avg = result.test["average"]
    line = f"selected {best}: test FPR95 (ID+) {pct(avg['fpr95'])}, AUROC {pct(avg['auroc'])}"
    if result.reference is not None:
        ref = result.reference["test"]["average"]
        line += f"; paper values: FPR95 {pct(ref['fpr95'])}, AUROC {pct(ref['auroc'])}"
    print(line)
    record = {
        "grid_results": str((ns.out / name / "grid_results.json").relative_to(ns.out)),
        "selected": result.best_params,
        "test": result.test,
        "reference": result.reference,
    }
    rec.write(record, line + f"\n\nThe whole grid: `{name}/grid_results.md`.", ns.out)


if __name__ == "__main__":
    main()
