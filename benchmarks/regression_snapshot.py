"""Snapshot every number of the demo and of the LINe DenseNet slice, to compare two commits.

Runs, in-process through ``lightning_ood.cli.main``:

* ``line``: ``lightning-ood test`` with ``configs/line_densenet_cifar10.yaml`` on the slice of
  ``tests/cli/test_line_densenet.py`` (reference DenseNet-BC-100, CIFAR-10 JPEG-q75 copy,
  every 10th training image, every 5th test image, TinyImageNet-crop and MNIST every 5th;
  Energy and LINe p_w 90, p_a 90, δ 1.0);
* ``demo``: ``fit`` then ``test`` of ``configs/demo.yaml`` (what ``make demo`` runs).

Writes ``<out>/{line,demo}.json`` with every metric at full precision (plus thresholds and
combiners for the demo); use a fresh ``--out`` folder per run. ``--compare A B`` prints every
value that differs between two snapshot folders and exits 1 if any does. How it was used:
the engine refactor's snapshot equalled the previous commit's exactly (closing note of that
session)::

    python benchmarks/regression_snapshot.py --out /tmp/after            # this checkout
    cd OLD_CHECKOUT && python /path/to/regression_snapshot.py --root . --out /tmp/before
    python benchmarks/regression_snapshot.py --compare /tmp/before /tmp/after
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _results(cli: Any) -> dict[str, Any]:
    for cb in cli.trainer.callbacks:
        if isinstance(getattr(cb, "results", None), dict) and "metrics" in cb.results:
            return cb.results
    raise RuntimeError("no OODEvaluation results in this run")


def snapshot(root: Path, out: Path, data: Path, which: str) -> None:
    sys.path.insert(0, str(root))  # the checkout under test, not an installed copy
    from lightning_ood.cli import main

    out.mkdir(parents=True, exist_ok=True)
    run = out / "run"
    common = ["--log_root", str(run / "logs"), "--checkpoint_root", str(run / "ckpt")]
    if which in ("both", "line"):
        override = run / "line_override.yaml"
        override.parent.mkdir(parents=True, exist_ok=True)
        weights = data / "checkpoints" / "densenet100_cifar10_reference.pth.tar"
        callback = {
            "class_path": "lightning_ood.callbacks.OODEvaluation",
            "init_args": {
                "progress": False,
                "log_roc": False,
                "detectors": {"energy": {}, "line": {"delta": 1.0, "p_a": 90, "p_w": 90}},
            },
        }
        override.write_text(
            yaml.safe_dump(
                {
                    "trainer": {"enable_progress_bar": False, "callbacks": [callback]},
                    "model": {"model_kwargs": {"weights": str(weights)}},
                    "data": {
                        "init_args": {
                            "root": str(data),
                            "train_every": 10,
                            "test_every": 5,
                            "ood_every": 5,
                            "ood_sets": ["tinyimagenet_crop", "mnist"],
                            "num_workers": 0,
                            "eval_batch_size": 32,
                        }
                    },
                }
            )
        )
        config = str(root / "configs" / "line_densenet_cifar10.yaml")
        cli = main(["test", "--config", config, "--config", str(override), *common])
        metrics = _results(cli)["metrics"]
        (out / "line.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    if which in ("both", "demo"):
        config = str(root / "configs" / "demo.yaml")
        quiet = ["--trainer.enable_progress_bar", "false", "--data.init_args.root", str(data)]
        main(["fit", "--config", config, *common, *quiet])
        ckpt = str(run / "ckpt" / "demo" / "last.ckpt")
        cli = main(["test", "--config", config, "--ckpt_path", ckpt, *common, *quiet])
        r = _results(cli)
        keep = {k: r[k] for k in ("metrics", "thresholds", "combiners", "validation")}
        (out / "demo.json").write_text(json.dumps(keep, indent=1, sort_keys=True))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        flat: dict[str, Any] = {}
        for k, v in obj.items():
            flat.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return flat
    return {prefix: obj}


def compare(a: Path, b: Path) -> int:
    """Print every differing value of the snapshots in folders ``a`` and ``b``."""
    differ = 0
    for name in ("line.json", "demo.json"):
        if not (a / name).is_file() or not (b / name).is_file():
            print(f"{name}: not in both folders, skipped")
            continue
        fa = _flatten(json.loads((a / name).read_text()))
        fb = _flatten(json.loads((b / name).read_text()))
        keys = sorted(set(fa) | set(fb))
        diffs = [k for k in keys if fa.get(k) != fb.get(k)]
        print(f"{name}: {len(keys)} values, {len(diffs)} differ")
        for k in diffs[:50]:
            print(f"  {k}: {fa.get(k)!r} -> {fb.get(k)!r}")
        differ += len(diffs)
    return 1 if differ else 0


def main_args(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT, help="checkout to run (default: this one)")
    p.add_argument("--out", type=Path, help="snapshot folder to write")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--which", choices=("both", "line", "demo"), default="both")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    ns = p.parse_args(argv)
    if ns.compare:
        return compare(*ns.compare)
    if ns.out is None:
        p.error("--out is required unless --compare is given")
    snapshot(ns.root.resolve(), ns.out, ns.data, ns.which)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_args())
