"""ReAct's clip on the reference CIFAR-10 DenseNet: the exact p90 of all training activations
against numpy, and against the strided subsample the library used before (issue 14, item 5).

Reads the cached training features of ``line_intgrad.py`` / ``line_densenet_cifar10.py`` (the
same ``--train_every`` slice; computes them with ``--allow_compute``)::

    .venv/bin/python -m benchmarks.react_exact_percentile --train_every 10

``--quick``: 50 training images, computed into ``<out>/work``.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import (
    CACHE,
    QUICK_SLICES,
    Recorder,
    cached_features,
    cifar10_densenet,
    parse,
    parser,
    work_dir,
)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--cache_dir", default=str(CACHE / "features"))
    p.add_argument("--train_every", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--allow_compute", action="store_true")
    ns = parse(p, argv)
    if ns.quick:
        ns.train_every, ns.allow_compute = QUICK_SLICES["train_every"], True
        ns.cache_dir = str(work_dir(ns, "features") / "features")
    rec = Recorder("react_exact_percentile")
    from lightning_ood.detectors import ReAct
    from lightning_ood.features import FeatureCache, fit_from_cache

    backbone, dm, _, _ = cifar10_densenet(
        ns, [], ns.batch_size, train_every=ns.train_every, test_every=10**9
    )
    train = cached_features(
        FeatureCache(ns.cache_dir), backbone, dm.train_eval_dataloader(), "train", ns.allow_compute
    )
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
    rec.write({"exact": exact, "rows": rows, "strided": old, "n": n}, body, ns.out)


if __name__ == "__main__":
    main()
