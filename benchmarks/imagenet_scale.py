"""Issue 14 item 5: ImageNet-sized synthetic features through the feature cache, in bounded memory.

1,281,167 x 2048 penultimate features (ImageNet-1K's training-set size, ResNet-50's width) of
1,000 classes, with the logits of a fixed random 2048 -> 1000 linear head, are written once into
a *sharded* feature-cache entry (``FeatureCache.save_stream``; ~15.6 GB under
``.cache/imagenet_synth``). Then, each stage in its own process so each peak RSS is its own:

* ``fit``: every feature-based detector is fitted from that entry by **one**
  ``features.fit_from_cache`` call (the engine's one pass; detectors that need another pass over
  the same batches, such as the exact percentile's radix selection, share it). Reported: peak
  RSS of the process (``ru_maxrss``), wall time, and per detector the time spent in its own
  ``update``/``next_pass``/``finalize`` (timers wrapped around them); the rest is streaming.
* ``knn``: KNN with k = 1000 over a 1 % bank (as the KNN paper does for ImageNet), fitted in
  the ``fit`` stage with ``store_bank``, scores 50,000 synthetic queries; reported: peak RSS
  above the RSS once the bank and the queries are in memory.

Targets: peak RSS of ``fit`` <= 6 GB; KNN scoring <= 2 GB extra.

Synthetic data (seeded): class means mu_c ~ |N(0, 0.5^2)| per dimension, a sample of class c is
relu(mu_c + N(0, 0.5^2)) (non-negative, like a post-ReLU average pool); the head's weights are
N(0, 0.02^2), bias 0. The numbers measure memory and time, not detection quality::

    .venv/bin/python -m benchmarks.imagenet_scale                  # all stages
    .venv/bin/python -m benchmarks.imagenet_scale --rows 20000     # a short try
    .venv/bin/python -m benchmarks.imagenet_scale --quick --out /tmp/q   # seconds, in /tmp/q

No ImageNet data is read: the features are synthetic, so ``--quick`` (12,000 rows, 500 queries,
KNN's k 10, eight of the detectors, the entry under ``<out>/work``) runs the same stages on any
machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import ROOT, Recorder, parse, parser, work_dir

IMAGENET_TRAIN = 1_281_167
Q, L = 2048, 1000
GEN_BATCH = 8192
#: ``--quick``: a bank of 120 rows (KNN k 10, NNGuide k 100 both fit), 500 queries, and the
#: detectors whose finalize does not cost a 2048-wide eigendecomposition or 1,000 class
#: covariances (those take ~100 s whatever the rows).
QUICK = {
    "rows": 12_000, "shard_rows": 4096, "queries": 500, "k": 10, "batch_size": 2048,
    "detectors": ["knn", "nnguide", "react", "dice_react", "nci", "fdbd", "energy", "msp"],
}  # fmt: skip
#: Detectors fitted in the one pass (all that read training features, plus the logit- and
#: shaping-based ones, which fit nothing, for completeness).
DETECTORS: dict[str, dict[str, Any]] = {
    "mahalanobis": {"taps": ["features"]},
    "vim": {},  # D = 1000 for q = 2048 (the authors' choice)
    "rmds": {},
    "knn": {"k": 1000, "bank_fraction": 0.01, "seed": 0, "store_bank": True},
    "nnguide": {"k": 100, "bank_fraction": 0.01, "seed": 0},
    "dice": {"p": 70.0},  # DICE's ImageNet sparsity
    "react": {"percentile": 90.0},
    "dice_react": {"p": 70.0, "percentile": 90.0},
    "line": {},
    "nci": {},
    "fdbd": {},
    "ash": {"variant": "s", "percentile": 90.0},
    "scale": {"percentile": 85.0},
    "gradnorm": {},
    "energy": {},
    "msp": {},
    "maxlogit": {},
    "gen": {},
}


def specs(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """:data:`DETECTORS` with KNN's k from ``--k`` (a quick try has a bank below 1,000)."""
    return {**DETECTORS, "knn": {**DETECTORS["knn"], "k": ns.k}}


def head_backbone() -> Any:
    """A backbone whose penultimate features are its inputs and whose head is the fixed random
    2048 -> 1000 linear layer (what the detectors read W and b from)."""
    from lightning_ood.models.wrap import wrap

    g = torch.Generator().manual_seed(1)
    fc = nn.Linear(Q, L)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(L, Q, generator=g) * 0.02)
        fc.bias.zero_()
    net = nn.Sequential(OrderedDict(body=nn.Identity(), fc=fc))
    return wrap(net, head="fc", input_shape=(Q,), name="synthetic-resnet50-head").eval()


def synthetic_batches(rows: int, seed: int, backbone: Any, batch: int = GEN_BATCH) -> Any:
    """Seeded (features, logits, labels) batches; batch i depends only on (seed, i)."""
    from lightning_ood.models.base import BackboneOutput

    g = torch.Generator().manual_seed(seed)
    means = torch.randn(L, Q, generator=g).abs() * 0.5
    head = backbone.get_classifier()
    for i, start in enumerate(range(0, rows, batch)):
        n = min(batch, rows - start)
        gi = torch.Generator().manual_seed(seed * 1_000_003 + i)
        y = torch.randint(0, L, (n,), generator=gi)
        h = torch.relu(means[y] + 0.5 * torch.randn(n, Q, generator=gi))
        with torch.no_grad():
            logits = head(h)
        yield BackboneOutput(h, logits, {}), y


def cache_entry(ns: argparse.Namespace, seed: int) -> tuple[Any, str, str, str]:
    from lightning_ood.features import FeatureCache

    rows = ns.rows
    cache = FeatureCache(ns.work)
    ids = (f"synthetic-head-seed1-q{Q}-L{L}", f"synthetic-train-{rows}-seed{seed}", "none")
    return cache, *ids


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1024**3


def stage_generate(ns: argparse.Namespace) -> dict[str, Any]:
    cache, weights, dataset, transform = cache_entry(ns, 0)
    hit = cache.load(weights, dataset, transform)
    if hit is not None:
        return {"rows": len(hit), "reused": True, "folder": str(hit.folder)}
    t0 = time.perf_counter()
    stored = cache.save_stream(
        synthetic_batches(ns.rows, 0, head_backbone()),
        weights,
        dataset,
        transform,
        shard_rows=ns.shard_rows,
    )
    size = sum(f.stat().st_size for f in stored.folder.iterdir())
    return {
        "rows": len(stored),
        "reused": False,
        "shards": len(stored.shards),
        "bytes_on_disk": size,
        "write_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gb": round(peak_rss_gb(), 3),
    }


def _timed(det: Any, method: str, acc: dict[str, float]) -> None:
    """Wrap ``det.<method>`` so the time spent in it is added to ``acc[method]``."""
    inner = getattr(det, method)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            acc[method] = acc.get(method, 0.0) + time.perf_counter() - t0

    object.__setattr__(det, method, wrapper)


def stage_fit(ns: argparse.Namespace) -> dict[str, Any]:
    from lightning_ood.detectors import build_detector
    from lightning_ood.features import fit_from_cache

    torch.set_num_threads(ns.threads)
    cache, weights, dataset, transform = cache_entry(ns, 0)
    train = cache.load(weights, dataset, transform)
    if train is None:
        raise SystemExit("no synthetic entry: run the generate stage first")
    backbone = head_backbone()
    names = ns.detectors or list(DETECTORS)
    dets = {n: build_detector(n, specs(ns)[n]) for n in names}
    times: dict[str, dict[str, float]] = {n: {} for n in dets}
    for n, d in dets.items():
        for m in ("update", "next_pass", "finalize"):
            _timed(d, m, times[n])
    rss0 = current_rss_gb()
    t0 = time.perf_counter()
    fit_from_cache(dets.values(), backbone, train, batch_size=ns.batch_size)
    wall = time.perf_counter() - t0
    bad = [n for n, d in dets.items() if not d.is_fitted]
    if bad:
        raise RuntimeError(f"not fitted: {bad}")
    knn = dets.get("knn")
    if knn is not None:
        torch.save(knn.state_dict(), Path(ns.work) / f"knn-{ns.rows}.pt")
    per = {
        n: {k: round(v, 2) for k, v in sorted(t.items())} | {"total_s": round(sum(t.values()), 2)}
        for n, t in times.items()
    }
    return {
        "rows": len(train),
        "batch_size": ns.batch_size,
        "threads": ns.threads,
        "wall_s": round(wall, 1),
        "detector_s": per,
        "streaming_and_engine_s": round(wall - sum(p["total_s"] for p in per.values()), 1),
        "rss_before_fit_gb": round(rss0, 3),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "knn_bank_rows": int(knn.bank_shape[0]) if knn is not None else None,
    }


def stage_knn(ns: argparse.Namespace) -> dict[str, Any]:
    from lightning_ood.detectors import build_detector
    from lightning_ood.features import CachedFeatures, score_cached

    torch.set_num_threads(ns.threads)
    backbone = head_backbone()
    knn = build_detector("knn", specs(ns)["knn"])
    knn.load_state_dict(torch.load(Path(ns.work) / f"knn-{ns.rows}.pt", weights_only=True))
    feats, logits, ys = [], [], []
    for out, y in synthetic_batches(ns.queries, 7, backbone, batch=10_000):
        feats.append(out.features)
        logits.append(out.logits)
        ys.append(y)
    queries = CachedFeatures(torch.cat(feats), torch.cat(logits), {}, torch.cat(ys))
    del feats, logits
    base = current_rss_gb()
    t0 = time.perf_counter()
    scores = score_cached({"knn": knn}, queries, batch_size=ns.queries)["knn"]
    wall = time.perf_counter() - t0
    return {
        "queries": len(queries),
        "bank_rows": int(knn.bank_shape[0]),
        "k": knn.k,
        "query_chunk": knn.query_chunk,
        "bank_chunk": knn.bank_chunk,
        "score_s": round(wall, 1),
        "rss_before_scoring_gb": round(base, 3),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "extra_gb": round(peak_rss_gb() - base, 3),
        "finite": bool(torch.isfinite(scores).all()),
    }


def run_stage(stage: str, ns: argparse.Namespace) -> dict[str, Any]:
    """One stage in a fresh process (its own peak RSS); returns its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.imagenet_scale", "--stage", stage,
           "--rows", str(ns.rows), "--shard_rows", str(ns.shard_rows),
           "--batch_size", str(ns.batch_size), "--queries", str(ns.queries),
           "--threads", str(ns.threads), "--k", str(ns.k), "--work", str(ns.work),
           "--out", str(ns.out), "--data_root", str(ns.data_root)]  # fmt: skip
    if ns.detectors:
        cmd += ["--detectors", *ns.detectors]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line.removeprefix("RESULT "))
    print(json.dumps(result, indent=1), flush=True)
    return result


def markdown(res: dict[str, Any], ns: argparse.Namespace) -> str:
    fit, knn, gen = res["fit"], res["knn"], res["generate"]
    lines = [
        "",
        f"Synthetic ImageNet-sized features: {fit['rows']:,} x {Q} (1,000 classes), logits of a "
        f"random {Q} -> {L} linear head; sharded cache entry ({ns.shard_rows:,} rows per shard"
        + (f", {gen['bytes_on_disk'] / 1e9:.1f} GB on disk" if "bytes_on_disk" in gen else "")
        + f"). torch threads {fit['threads']}, fit batch {fit['batch_size']}.",
        "",
        f"**One fit pass for {len(fit['detector_s'])} detectors:** wall {fit['wall_s']:.0f} s, "
        f"peak RSS **{fit['peak_rss_gb']:.2f} GB** (target <= 6 GB; "
        f"{fit['rss_before_fit_gb']:.2f} GB before the pass).",
        "",
        "| detector | hyperparameters | update s | next_pass s | finalize s | total s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for n, t in sorted(fit["detector_s"].items(), key=lambda kv: -kv[1]["total_s"]):
        lines.append(
            f"| {n} | `{json.dumps(specs(ns)[n])}` | {t.get('update', 0):.1f} | "
            f"{t.get('next_pass', 0):.1f} | {t.get('finalize', 0):.1f} | {t['total_s']:.1f} |"
        )
    lines += [
        f"| (streaming the shards, engine) | | | | | {fit['streaming_and_engine_s']:.1f} |",
        "",
        f"**KNN scoring** (k = {knn['k']}, bank {knn['bank_rows']:,} rows = a seeded 1 % of the "
        f"training rows): {knn['queries']:,} queries in {knn['score_s']:.1f} s, peak RSS "
        f"{knn['extra_gb']:.2f} GB above the {knn['rss_before_scoring_gb']:.2f} GB held once the "
        f"bank and queries were loaded (target <= 2 GB extra); chunks: {knn['query_chunk']} "
        f"queries x {knn['bank_chunk']} bank rows.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--stage", choices=["all", "generate", "fit", "knn"], default="all")
    ap.add_argument("--rows", type=int, default=IMAGENET_TRAIN)
    ap.add_argument("--shard_rows", type=int, default=32768)
    ap.add_argument("--batch_size", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=50_000)
    ap.set_defaults(threads=2)
    ap.add_argument("--detectors", nargs="*", default=None)
    ap.add_argument("--k", type=int, default=1000, help="KNN's k (the KNN paper: 1000)")
    ap.add_argument("--work", default=None, help="cache folder (default .cache/imagenet_synth)")
    ns = parse(ap, argv)
    if ns.quick and ns.stage == "all":
        vars(ns).update(QUICK)
    ns.work = str(work_dir(ns, "imagenet_synth"))
    if ns.stage != "all":
        fn = {"generate": stage_generate, "fit": stage_fit, "knn": stage_knn}[ns.stage]
        print("RESULT " + json.dumps(fn(ns)), flush=True)
        return
    full = ns.rows == IMAGENET_TRAIN and not ns.detectors and ns.k == 1000
    name = "imagenet_scale" if full else None
    rec = Recorder(name or f"imagenet_scale_{ns.rows}")
    res = {s: run_stage(s, ns) for s in ("generate", "fit", "knn")}
    res["targets"] = {
        "fit_peak_rss_le_6gb": res["fit"]["peak_rss_gb"] <= 6.0,
        "knn_extra_le_2gb": res["knn"]["extra_gb"] <= 2.0,
    }
    rec.write(res, markdown(res, ns), ns.out)


if __name__ == "__main__":
    main()
