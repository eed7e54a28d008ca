"""Fit and score speed from the SAME cached features: lightning_ood vs pytorch-ood 0.4.0.

    nice -n 19 .venv/bin/python -m benchmarks.peer_speed [--repeats 7]

Both libraries see identical float32 tensors: the reference CIFAR-10 DenseNet-BC-100's
penultimate features and logits of 5,000 training images (every 10th of the CIFAR-10 JPEG-q75
training set) and 2,000 test images (every 5th), read from the feature cache
(``.cache/features``, filled by ``line_intgrad.py --train_every 10 --test_every 5``). Ours
fits through the engine as a user does (:func:`lightning_ood.features.fit_from_cache`, default
batch 4,096) and scores through :func:`lightning_ood.features.score_cached`; theirs through
each detector's public ``fit_features`` / ``fit_feature_maps`` and ``predict_features`` /
``predict_feature_maps`` / ``predict_logits``. Times are the median of ``--repeats`` runs
(after one untimed warm-up), ours and theirs interleaved, ``torch.set_num_threads(2)``; the
ratio is ours / theirs (< 1: ours faster). pytorch-ood's KNN runs scikit-learn's
``NearestNeighbors(n_jobs=-1)`` (both cores here). Each row also records the Pearson
correlation of our scores with the negated peer scores (pytorch-ood returns outlier scores):
1.0 where both compute the same quantity up to a positive scale. ``--quick``: one timed run
of seven detectors on features of 50 training and 20 test images computed into ``<out>/work``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import (
    CACHE,
    QUICK_SLICES,
    ROOT,
    Recorder,
    cifar10_densenet,
    parse,
    parser,
    reference_weights,
    work_dir,
)

FEATURES = CACHE / "features"
#: ``--quick``'s detectors: those that fit on 50 training rows.
QUICK_DETECTORS = ["mahalanobis", "react", "nci", "fdbd", "ash", "energy", "gen"]


@dataclass
class Case:
    """One detector on both sides. ``theirs_fit(z, y, logits)`` returns a fitted peer object
    (None: nothing to fit there), ``theirs_score(obj, z, logits)`` its outlier scores."""

    name: str
    ours: dict[str, Any]
    theirs_fit: Callable[[Tensor, Tensor, Tensor], Any] | None
    theirs_score: Callable[[Any, Tensor, Tensor], Tensor]
    note: str = ""


def cases(fc: torch.nn.Linear, n_classes: int, q: int) -> list[Case]:
    """The detectors both libraries implement that fit from (or score) cached features, with
    matched hyperparameters (ours in percent, theirs as fractions)."""
    from pytorch_ood import detector as pood

    w, b = fc.weight.detach(), fc.bias.detach()

    def head(t: Tensor) -> Tensor:
        return fc(t.flatten(1))

    def maps(z: Tensor) -> Tensor:  # their ASH/SCALE assert (B, C, H, W) feature maps
        return z[:, :, None, None]

    dim = q // 2  # our ViM default for q < 768 (the authors' rule); theirs takes it explicitly
    return [
        Case("mahalanobis", {"type": "mahalanobis"},
             lambda z, y, lg: pood.Mahalanobis(None).fit_features(z, y),
             lambda d, z, lg: d.predict_features(z), "tied covariance, penultimate features"),
        Case("rmds", {"type": "rmds"},
             lambda z, y, lg: pood.RMD(None).fit_features(z, y),
             lambda d, z, lg: d.predict_features(z)),
        Case("dice", {"type": "dice", "p": 90.0},
             lambda z, y, lg: pood.DICE(None, w, b, p=0.9).fit_features(z, y),
             lambda d, z, lg: d.predict_features(z), "p 90"),
        Case("react", {"type": "react", "percentile": 90.0},
             lambda z, y, lg: pood.ReAct(None, fc, percentile=0.9).fit_feature_maps(z, y),
             lambda d, z, lg: d.predict_feature_maps(z), "exact p90 of all 1.71 M activations"),
        Case("vim", {"type": "vim", "dim": dim},
             lambda z, y, lg: pood.ViM(None, d=dim, w=w, b=b).fit_features(z, y),
             lambda d, z, lg: d.predict_features(z), f"D {dim}"),
        Case("knn", {"type": "knn", "k": 50, "backend": "torch"},
             lambda z, y, lg: pood.KNN(None, k=50).fit_features(z, y),
             lambda d, z, lg: d.predict_features(z), "k 50, whole bank; theirs: sklearn"),
        Case("nnguide", {"type": "nnguide", "k": 100, "bank_fraction": 1.0},
             lambda z, y, lg: pood.NNGuide(None, fc, k=100).fit_features(z, y),
             lambda d, z, lg: d.predict_features(z), "k 100, whole bank"),
        Case("nci", {"type": "nci", "alpha": 1e-4},
             lambda z, y, lg: pood.NCI(None, fc, alpha=1e-4).fit_features(z, y),
             lambda d, z, lg: d.predict_features(z), "alpha 1e-4"),
        Case("fdbd", {"type": "fdbd"},
             lambda z, y, lg: pood.fDBD(None, fc).fit_features(z, y),
             lambda d, z, lg: d.predict_features(z)),
        Case("ash", {"type": "ash", "variant": "s", "percentile": 90.0}, None,
             lambda d, z, lg: pood.ASH(None, head, variant="ash-s", percentile=0.9)
             .predict_feature_maps(maps(z)), "ASH-S p90; no fit on either side"),
        Case("scale", {"type": "scale", "percentile": 85.0}, None,
             lambda d, z, lg: pood.SCALE(None, head, percentile=0.85)
             .predict_feature_maps(maps(z)), "p85; no fit on either side"),
        Case("energy", {"type": "energy"}, None,
             lambda d, z, lg: pood.EnergyBased(None).predict_logits(lg)),
        Case("msp", {"type": "msp"}, None,
             lambda d, z, lg: pood.MaxSoftmax(None).predict_logits(lg)),
        Case("maxlogit", {"type": "maxlogit"}, None,
             lambda d, z, lg: pood.MaxLogit(None).predict_logits(lg)),
        Case("gen", {"type": "gen", "gamma": 0.1, "M": n_classes}, None,
             lambda d, z, lg: pood.GEN(None, gamma=0.1, M=None).predict_logits(lg),
             "gamma 0.1, all classes"),
    ]  # fmt: skip


def load_cached(pattern: str) -> tuple[Any, Path]:
    """The one feature-cache entry matching ``pattern`` under ``.cache/features``."""
    from lightning_ood.features import CachedFeatures

    hits = sorted(FEATURES.glob(pattern))
    if len(hits) != 1:
        raise FileNotFoundError(
            f"expected one feature-cache entry {FEATURES / pattern}, found {len(hits)}; fill it "
            "with `python -m benchmarks.line_intgrad --train_every 10 --test_every 5 "
            "--allow_compute` (reference DenseNet, CIFAR-10 JPEG-q75 copy) or pass --train/--test"
        )
    obj = torch.load(hits[0], map_location="cpu", weights_only=True)
    return CachedFeatures(
        obj["features"], obj["logits"], obj["taps"], obj["targets"], obj["meta"], True
    ), hits[0]


#: Process CPU seconds of the last :func:`timed` call (all threads): a second view of the
#: same run, less sensitive than wall time to other processes on a shared machine.
LAST_CPU = [0.0]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` (after a garbage collection) and its result."""
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    r = fn()
    t = time.perf_counter() - t0
    LAST_CPU[0] = time.process_time() - c0
    return t, r


def quick_features(ns: argparse.Namespace) -> tuple[Any, Path, Any, Path, Any]:
    """``--quick``: the DenseNet's features of the quick slices, computed into ``<out>/work``."""
    from lightning_ood.features import FeatureCache

    backbone, dm, loaders, names = cifar10_densenet(ns, [], **QUICK_SLICES)
    cache = FeatureCache(work_dir(ns, "features") / "features")
    train = cache.get_or_compute(backbone, dm.train_eval_dataloader(), [], desc="train")
    test = cache.get_or_compute(backbone, loaders[names[0]], [], desc="test")
    return train, cache.root, test, cache.root, backbone


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=7, help="timed runs per side (median)")
    p.set_defaults(threads=2)
    p.add_argument("--train", default="ImageFolder-5000-*/taps-*.pt")
    p.add_argument("--test", default="ImageFolder-2000-*/taps-*.pt")
    p.add_argument("--only", nargs="*", default=None, help="detector names to run")
    p.add_argument("--name", default="peer_speed")
    ns = parse(p, argv)
    if ns.quick:  # 50 training rows: no ViM subspace of 171 dims, no 100-neighbour bank
        ns.repeats, ns.only = 1, ns.only or QUICK_DETECTORS
    elif ns.repeats < 5:
        p.error("--repeats must be >= 5 (the median of at least five runs)")
    rec = Recorder(ns.name)
    torch.set_num_threads(ns.threads)

    from lightning_ood.detectors import build_detector
    from lightning_ood.features import backbone_fingerprint, fit_from_cache, score_cached
    from lightning_ood.models import create_model

    weights = reference_weights(ns.data_root)
    if ns.quick:
        train, train_path, test, test_path, model = quick_features(ns)
    else:
        train, train_path = load_cached(ns.train)
        test, test_path = load_cached(ns.test)
        model = create_model("densenet100", num_classes=10, weights=str(weights)).eval()
    if backbone_fingerprint(model) != train.meta.get("weights"):
        raise ValueError(f"{train_path} was not produced by {weights}; refill the cache")
    fc = model.get_classifier()
    z, y, zt, lt = train.features, train.targets, test.features, test.logits
    n_classes, q = train.logits.shape[1], z.shape[1]
    todo = [c for c in cases(fc, n_classes, q) if ns.only is None or c.name in ns.only]

    rows = []
    for case in todo:
        det = build_detector(case.name, case.ours)

        def fit_ours(det=det):
            fit_from_cache([det], model, train)
            return det

        def score_ours(det=det, name=case.name):
            return score_cached({name: det}, test)[name]

        def fit_theirs(case=case):
            return case.theirs_fit(z, y, train.logits)

        fitted_theirs = None
        t = {"fit_ours": [], "fit_theirs": [], "score_ours": [], "score_theirs": []}
        cpu: dict[str, list[float]] = {k: [] for k in t}
        with torch.no_grad():
            for rep in range(ns.repeats + 1):  # run 0: warm-up, untimed
                tf, _ = timed(fit_ours)
                cf = LAST_CPU[0]
                ts, s_ours = timed(score_ours)
                cs = LAST_CPU[0]
                tft = cft = float("nan")
                if case.theirs_fit is not None:
                    tft, fitted_theirs = timed(fit_theirs)
                    cft = LAST_CPU[0]
                tst, s_theirs = timed(lambda: case.theirs_score(fitted_theirs, zt, lt))  # noqa: B023
                if rep:
                    for k, w, c in (
                        ("fit_ours", tf, cf),
                        ("score_ours", ts, cs),
                        ("fit_theirs", tft, cft),
                        ("score_theirs", tst, LAST_CPU[0]),
                    ):
                        t[k].append(w)
                        cpu[k].append(c)  # fmt: skip
        med = {k: statistics.median(v) for k, v in t.items()}
        a = s_ours.double().numpy()
        bb = -s_theirs.detach().double().cpu().numpy()
        r = float(np.corrcoef(a, bb)[0, 1])
        row = {
            "detector": case.name, "ours_config": case.ours, "note": case.note,
            "times_s": t, "median_s": med, "cpu_s": cpu,
            "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
            "fit_ratio": med["fit_ours"] / med["fit_theirs"] if case.theirs_fit else None,
            "score_ratio": med["score_ours"] / med["score_theirs"],
            "pearson_ours_vs_minus_theirs": r,
        }  # fmt: skip
        rows.append(row)
        fr = "—" if row["fit_ratio"] is None else f"{row['fit_ratio']:.2f}"
        print(
            f"{case.name:12s} fit {1e3 * med['fit_ours']:8.2f} / {1e3 * med['fit_theirs']:8.2f} ms"
            f" ({fr})  score {1e3 * med['score_ours']:8.2f} / {1e3 * med['score_theirs']:8.2f} ms"
            f" ({row['score_ratio']:.2f})  r {r:.6f}",
            flush=True,
        )

    # every fitted detector in ONE engine pass (what the callback does), against the sum of
    # the peer's separate fits
    fit_cases = [c for c in todo if c.theirs_fit is not None]
    together = {}
    if len(fit_cases) > 1:
        dets = [build_detector(c.name, c.ours) for c in fit_cases]
        tt = [timed(lambda: fit_from_cache(dets, model, train))[0] for _ in range(ns.repeats + 1)]
        ours_all = statistics.median(tt[1:])
        theirs_sum = sum(r["median_s"]["fit_theirs"] for r in rows if r["fit_ratio"] is not None)
        ours_sum = sum(r["median_s"]["fit_ours"] for r in rows if r["fit_ratio"] is not None)
        together = {
            "detectors": [c.name for c in fit_cases], "ours_one_pass_s": tt[1:],
            "ours_one_pass_median_s": ours_all, "ours_separate_sum_s": ours_sum,
            "theirs_separate_sum_s": theirs_sum,
            "ratio_one_pass_over_theirs_sum": ours_all / theirs_sum,
        }  # fmt: skip
        print(f"all {len(dets)} fits: ours one pass {1e3 * ours_all:.1f} ms, theirs sum "
              f"{1e3 * theirs_sum:.1f} ms ({ours_all / theirs_sum:.2f})")  # fmt: skip

    import pytorch_ood

    res = {
        "train_entry": os.path.relpath(train_path, ROOT),
        "test_entry": os.path.relpath(test_path, ROOT),
        "n_train": len(train), "n_test": len(test), "q": q, "classes": n_classes,
        "repeats": ns.repeats, "threads": torch.get_num_threads(),
        "pytorch_ood": pytorch_ood.__version__, "rows": rows, "all_fits": together,
    }  # fmt: skip
    md = [
        f"\nFit and score from the same cached float32 features of the reference CIFAR-10 "
        f"DenseNet-BC-100 (CIFAR-10 JPEG-q75 copy): {len(train):,} training rows (every 10th "
        f"training image) x q {q}, {len(test):,} test rows (every 5th test image). Ours: "
        "`features.fit_from_cache` / `score_cached` (the engine); theirs: pytorch-ood "
        f"{pytorch_ood.__version__} `fit_features` / `predict_features` (ReAct, ASH, SCALE: "
        "`*_feature_maps`; logit scores: `predict_logits`). Median of "
        f"{ns.repeats} interleaved runs after a warm-up, {torch.get_num_threads()} torch "
        "threads. Ratio = ours / theirs (< 1: ours faster), wall time; the process CPU "
        "times of the same runs are in the JSON (`median_cpu_s`). r: Pearson correlation of "
        "our scores with the negated peer scores.\n",
        "| detector | fit ours ms | fit theirs ms | fit ratio | score ours ms | score theirs ms "
        "| score ratio | r | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        m = r["median_s"]
        fit = (
            f"{1e3 * m['fit_ours']:.2f} | {1e3 * m['fit_theirs']:.2f} | **{r['fit_ratio']:.2f}**"
            if r["fit_ratio"] is not None
            else f"{1e3 * m['fit_ours']:.2f} (head copy) | — | —"
        )
        md.append(
            f"| {r['detector']} | {fit} | {1e3 * m['score_ours']:.2f} | "
            f"{1e3 * m['score_theirs']:.2f} | **{r['score_ratio']:.2f}** | "
            f"{r['pearson_ours_vs_minus_theirs']:.6f} | {r['note']} |"
        )
    if together:
        md.append(
            f"\nAll {len(together['detectors'])} fitted detectors in one engine pass "
            f"(`fit_from_cache` with the list, as the callback fits them): "
            f"{1e3 * together['ours_one_pass_median_s']:.1f} ms, against "
            f"{1e3 * together['theirs_separate_sum_s']:.1f} ms for pytorch-ood's separate fits "
            f"(ratio {together['ratio_one_pass_over_theirs_sum']:.2f}; ours fitted separately: "
            f"{1e3 * together['ours_separate_sum_s']:.1f} ms)."
        )
    slower_fit = [r["detector"] for r in rows if r["fit_ratio"] is not None and r["fit_ratio"] > 1]
    slower_score = [r["detector"] for r in rows if r["score_ratio"] > 1]
    md.append(
        f"\nFit slower than pytorch-ood: {', '.join(slower_fit) or 'none'}. "
        f"Scoring slower: {', '.join(slower_score) or 'none'}.\n"
    )
    body = "\n".join(md)
    rec.write(res, body, ns.out)
    print(body)


if __name__ == "__main__":
    main()
