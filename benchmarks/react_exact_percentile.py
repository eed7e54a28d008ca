"""ReAct's clip on the reference CIFAR-10 DenseNet: the exact p90 of all training activations
against numpy, and against the strided subsample the library used before (issue 14, item 5).

Reads the cached training features of ``line_intgrad.py`` / ``line_densenet_cifar10.py`` (the
same ``--train_every`` slice; computes them with ``--allow_compute``)::

    .venv/bin/python benchmarks/react_exact_percentile.py --train_every 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks._record import Recorder  # noqa: E402
from benchmarks.line_intgrad import build, cached  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache_dir", default=str(ROOT / ".cache" / "features"))
    p.add_argument("--train_every", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--allow_compute", action="store_true")
    ns = p.parse_args()
    rec = Recorder("react_exact_percentile")
    from lightning_ood.detectors import ReAct
    from lightning_ood.features import FeatureCache, fit_from_cache

    ns.ood_sets, ns.test_every, ns.ood_every = [], 10**9, 10**9
    backbone, dm, _, _ = build(ns)
    train = cached(FeatureCache(ns.cache_dir), backbone, dm.fit_dataloader(), "train",
                   ns.allow_compute)  # fmt: skip
    h = train.features
    n = h.numel()
    exact = float(np.percentile(h.double().numpy(), 90))
    rows: list[tuple[str, float, float]] = []
    for label, cap in (("in memory (default max_samples)", 1 << 26),
                       ("radix selection (max_samples 100,000)", 100_000)):  # fmt: skip
        det = ReAct(percentile=90.0, max_samples=cap)
        t0 = time.perf_counter()
        fit_from_cache([det], backbone, train, batch_size=4096)
        rows.append((label, float(det.clip_value), time.perf_counter() - t0))
    # The strided sampler this replaced: every s-th row, s doubled until <= 1e6 values remain.
    stride, kept = 1, h.shape[0]
    while kept * h.shape[1] > 1_000_000:
        stride *= 2
        kept = len(range(0, h.shape[0], stride))
    old = float(np.percentile(h[::stride].double().numpy(), 90))
    md = [
        f"Reference DenseNet-BC-100, CIFAR-10 JPEG-q75 copy, every {ns.train_every}-th training "
        f"image: {h.shape[0]} x {h.shape[1]} = {n:,} activations. p90 in float32 features.",
        "",
        "| method | p90 | abs. error vs numpy | fit s |",
        "|---|---:|---:|---:|",
        f"| numpy.percentile (float64, all values) | {exact:.6f} | 0 | |",
    ]
    for label, value, secs in rows:
        md.append(f"| ReAct, {label} | {value:.6f} | {abs(value - exact):.1e} | {secs:.3f} |")
    md.append(
        f"| former strided subsample (every {stride}-th row, {kept * h.shape[1]:,} values) | "
        f"{old:.6f} | {abs(old - exact):.1e} | |"
    )
    body = "\n".join(md)
    print(body)
    rec.write({"exact": exact, "rows": rows, "strided": old, "n": n}, body)


if __name__ == "__main__":
    main()
