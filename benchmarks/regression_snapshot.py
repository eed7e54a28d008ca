"""Snapshot every number of the demo and of the LINe DenseNet slice, to compare two commits.

Runs ``lightning-ood`` of the checkout ``--root`` (default: this one) in subprocesses started
in that checkout, so that its own ``lightning_ood`` is imported, not an installed copy:

* ``line``: ``lightning-ood test`` with ``configs/line_densenet_cifar10.yaml`` on the slice of
  ``tests/cli/test_line_densenet.py`` (reference DenseNet-BC-100, CIFAR-10 JPEG-q75 copy,
  every 10th training image, every 5th test image, TinyImageNet-crop and MNIST every 5th;
  Energy and LINe p_w 90, p_a 90, δ 1.0);
* ``demo``: ``fit`` then ``test`` of ``configs/demo.yaml`` (what ``make demo`` runs).

Writes ``<out>/{line,demo}.json`` with every metric at full precision (plus thresholds and
combiners for the demo) and the record ``<out>/regression_snapshot.{json,md}``; use a fresh
``--out`` folder per run. ``--compare A B`` prints every value that differs between two
snapshot folders and exits 1 if any does. How it was used: the engine refactor's snapshot
equalled the previous commit's exactly (closing note of that session)::

    python -m benchmarks.regression_snapshot --out /tmp/after            # this checkout
    python -m benchmarks.regression_snapshot --root OLD_CHECKOUT --out /tmp/before
    python -m benchmarks.regression_snapshot --compare /tmp/before /tmp/after

``--quick``: 3 demo training steps without tuning, and the DenseNet slice of
:data:`benchmarks.common.QUICK_SLICES`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    QUICK_DEMO_DETECTORS,
    QUICK_SLICES,
    RESULTS,
    ROOT,
    Recorder,
    parse,
    parser,
    reference_weights,
)

LINE_SLICE = {"train_every": 10, "test_every": 5, "ood_every": 5}
KEEP = ("metrics", "thresholds", "combiners", "validation")


def _cli(root: Path, *args: str) -> None:
    """``python -m lightning_ood ARGS`` started in ``root`` (its package is the one imported)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_ood", *args], cwd=root, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"lightning-ood {args[0]} in {root} exited {proc.returncode}:\n"
                         + (proc.stdout + proc.stderr)[-3000:])  # fmt: skip


def _callback(detectors: dict[str, Any], results_dir: Path, **kw: Any) -> dict[str, Any]:
    init = {"progress": False, "log_roc": False, "figures": False, "detectors": detectors}
    return {
        "class_path": "lightning_ood.callbacks.OODEvaluation",
        "init_args": {**init, **kw, "results_dir": str(results_dir)},
    }


def snapshot(root: Path, out: Path, data: Path, which: str, quick: bool) -> dict[str, int]:
    """Run the snapshot(s) with the checkout ``root``; returns the number of values of each."""
    out.mkdir(parents=True, exist_ok=True)
    run = out / "run"
    run.mkdir(parents=True, exist_ok=True)
    roots = ["--log_root", str(run / "logs"), "--checkpoint_root", str(run / "ckpt")]
    counts: dict[str, int] = {}
    if which in ("both", "line"):
        dets = {"energy": {}, "line": {"delta": 1.0, "p_a": 90, "p_w": 90}}
        slices = QUICK_SLICES if quick else LINE_SLICE
        override = {
            "trainer": {"enable_progress_bar": False, "callbacks": [_callback(dets, run / "line")]},
            "model": {"model_kwargs": {"weights": str(reference_weights(data))}},
            "data": {"init_args": {"root": str(data), **slices, "num_workers": 0,
                                   "ood_sets": ["tinyimagenet_crop", "mnist"],
                                   "eval_batch_size": 32}},
        }  # fmt: skip
        path = run / "line_override.yaml"
        path.write_text(yaml.safe_dump(override))
        config = str(root / "configs" / "line_densenet_cifar10.yaml")
        _cli(root, "test", "--config", config, "--config", str(path), *roots)
        metrics = json.loads((run / "line" / "ood_results.json").read_text())["metrics"]
        (out / "line.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        counts["line"] = len(_flatten(metrics))
    if which in ("both", "demo"):
        cfg = yaml.safe_load((root / "configs" / "demo.yaml").read_text())
        cb = cfg["trainer"]["callbacks"][0]["init_args"]
        cb["results_dir"] = str(run / "demo")
        cfg["trainer"]["enable_progress_bar"] = False
        cfg["data"]["init_args"]["root"] = str(data)
        if quick:
            cb.pop("tune", None)  # and detectors a 3-step LeNet can fit (not ViM's subspace)
            cb.update(per_set_holdout=20, detectors=QUICK_DEMO_DETECTORS)
            cfg["trainer"].update(max_epochs=1, max_steps=3, limit_val_batches=0)
            cfg["data"]["init_args"].update(
                train_every=100, test_every=50, ood_every=50, val_size=1000,
                val_ood_sets=[{"name": "kmnist", "every": 50}],
            )  # fmt: skip
        path = run / "demo.yaml"
        path.write_text(yaml.safe_dump(cfg))
        _cli(root, "fit", "--config", str(path), *roots)
        ckpt = str(run / "ckpt" / "demo" / "last.ckpt")
        _cli(root, "test", "--config", str(path), "--ckpt_path", ckpt, *roots)
        r = json.loads((run / "demo" / "ood_results.json").read_text())
        keep = {k: r[k] for k in KEEP if k in r}
        (out / "demo.json").write_text(json.dumps(keep, indent=1, sort_keys=True))
        counts["demo"] = len(_flatten(keep))
    return counts


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


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--root", type=Path, default=ROOT, help="checkout to run (default: this one)")
    p.add_argument("--which", choices=("both", "line", "demo"), default="both")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    ns = parse(p, argv)
    if ns.compare:
        return compare(*ns.compare)
    if ns.out == RESULTS.resolve():
        p.error("pass --out: a snapshot folder of its own, never benchmarks/results")
    rec = Recorder("regression_snapshot")
    counts = snapshot(ns.root.resolve(), ns.out, ns.data_root, ns.which, ns.quick)
    body = f"Snapshot of `{ns.root}`: " + ", ".join(
        f"`{k}.json` ({n} values)" for k, n in counts.items()
    )
    rec.write({"root": str(ns.root), "values": counts}, body, ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
