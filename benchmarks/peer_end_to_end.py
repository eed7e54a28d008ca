"""End to end, on the same images: lightning_ood's engine vs pytorch-ood 0.4.0 as its users
write it. Fit on FashionMNIST train, score FashionMNIST test (ID) and MNIST test (OOD).

    nice -n 19 .venv/bin/python -m benchmarks.peer_end_to_end [--train_every 1 --test_every 1]

The model is the 3-epoch LeNet of ``checkpoints/bench/lenet_e3_seed1/last.ckpt`` (built with
``lightning_ood.state.build_from_checkpoint``); both sides read the same images through the
same loaders (``FashionMNISTDataModule`` eval transform, batch ``--batch_size``, no workers).

* ours: ``engine.fit_from_loader`` (ONE eval pass over the training loader feeds every
  detector) and ``engine.score_loader`` per test set (ONE forward per batch scored by every
  detector);
* theirs: each detector's own ``fit(loader)`` (its own pass over the training loader) and
  ``predict(x)`` per test batch (its own forward), under ``torch.no_grad``.

Each side runs in its own subprocess (``--side``), so peak memory is that process's alone:
``ru_maxrss`` (``resource.getrusage``) and the rise of the peak RSS (VmHWM, reset through
``/proc/self/clear_refs``) over the RSS after loading the model and the data module. Sides
alternate over ``--repeats`` runs; times are medians. Each row records the AUROC of both
sides' scores (theirs negated: pytorch-ood returns outlier scores) as a consistency check.
``--quick``: one run per side on a LeNet trained for three steps, every 100th training and
every 50th test image.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    ROOT,
    Recorder,
    memory,
    parse,
    parser,
    quick_lenets,
    reset_peak_memory,
)

CKPT = ROOT / "checkpoints" / "bench" / "lenet_e3_seed1" / "last.ckpt"
SETS = ("fashionmnist", "mnist")

#: Our config per detector (matched to the peer's values below); the brief's set first.
OURS: dict[str, dict[str, Any]] = {
    "msp": {}, "maxlogit": {}, "energy": {},
    "react": {"percentile": 90.0}, "dice": {"p": 90.0}, "mahalanobis": {},
    "knn": {"k": 50, "backend": "torch"}, "vim": {},
    "gen": {"gamma": 0.1, "M": 10}, "rmds": {}, "nci": {"alpha": 1e-4}, "fdbd": {},
    "ash": {"variant": "s", "percentile": 90.0}, "scale": {"percentile": 85.0},
}  # fmt: skip
DEFAULT = list(OURS)
#: Detectors without a training pass on either side (logit scores; ASH/SCALE shape per sample).
NO_FIT = ("msp", "maxlogit", "energy", "gen", "ash", "scale")


def theirs_detectors(model: Any, names: list[str]) -> dict[str, Any]:
    """pytorch-ood detectors as its documentation builds them: an encoder (our backbone's
    ``forward_features``) and the linear head, or the whole model for logit scores."""
    from pytorch_ood import detector as pood

    fc = model.get_classifier()
    enc = model.forward_features
    q = fc.weight.shape[1]

    def maps(x: torch.Tensor) -> torch.Tensor:  # ASH/SCALE assert (B, C, H, W) feature maps
        return enc(x)[:, :, None, None]

    def head(t: torch.Tensor) -> torch.Tensor:
        return fc(t.flatten(1))

    make: dict[str, Callable[[], Any]] = {
        "msp": lambda: pood.MaxSoftmax(model),
        "maxlogit": lambda: pood.MaxLogit(model),
        "energy": lambda: pood.EnergyBased(model),
        "gen": lambda: pood.GEN(model, gamma=0.1, M=None),
        "react": lambda: pood.ReAct(enc, fc, percentile=0.9),
        "dice": lambda: pood.DICE(enc, fc.weight, fc.bias, p=0.9),
        "mahalanobis": lambda: pood.Mahalanobis(enc),
        "rmds": lambda: pood.RMD(enc),
        "knn": lambda: pood.KNN(enc, k=50),
        "vim": lambda: pood.ViM(enc, d=q // 2, w=fc.weight, b=fc.bias),  # our default D
        "nci": lambda: pood.NCI(enc, fc, alpha=1e-4),
        "fdbd": lambda: pood.fDBD(enc, fc),
        "ash": lambda: pood.ASH(maps, head, variant="ash-s", percentile=0.9),
        "scale": lambda: pood.SCALE(maps, head, percentile=0.85),
    }
    return {n: make[n]() for n in names}


# -- one side, in its own process ---------------------------------------------------------------


def run_side(ns: argparse.Namespace) -> None:
    """Load, fit, score; write times, memory and scores to ``ns.out``."""
    torch.set_num_threads(ns.threads)
    from lightning_ood import engine
    from lightning_ood.data import FashionMNISTDataModule
    from lightning_ood.detectors import build_detectors
    from lightning_ood.io import safe_load
    from lightning_ood.state import build_from_checkpoint

    t_start = time.perf_counter()
    model, _, _ = build_from_checkpoint(safe_load(ns.ckpt), str(ns.ckpt))
    model.eval()
    dm = FashionMNISTDataModule(
        root=str(ns.data_root), eval_batch_size=ns.batch_size, num_workers=0, ood_sets=["mnist"],
        train_every=ns.train_every, test_every=ns.test_every, ood_every=ns.test_every,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("test")
    train = dm.train_eval_dataloader()
    tests = dict(zip(dm.test_set_names, dm.test_dataloader(), strict=True))
    names = ns.detectors
    base = memory()["VmRSS"]
    reset_ok = reset_peak_memory()  # peak RSS := current RSS
    scores: dict[str, dict[str, torch.Tensor]] = {}
    if ns.side == "ours":
        dets = build_detectors({n: OURS[n] for n in names})
        t0 = time.perf_counter()
        engine.fit_from_loader(dets.values(), model, train)
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s, loader in tests.items():
            for n, v in engine.score_loader(dict(dets.items()), model, loader).items():
                scores.setdefault(n, {})[s] = v
        t_score = time.perf_counter() - t0
    else:
        import logging

        logging.getLogger("pytorch_ood").setLevel(logging.ERROR)  # "No device set" warnings
        dets = theirs_detectors(model, names)
        t0 = time.perf_counter()
        for d in dets.values():
            if d.requires_fit:
                d.fit(train)
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            for s, loader in tests.items():
                chunks: dict[str, list[torch.Tensor]] = {n: [] for n in dets}
                for x, *_ in loader:
                    for n, d in dets.items():
                        chunks[n].append(d.predict(x).double().cpu())
                for n, c in chunks.items():
                    scores.setdefault(n, {})[s] = torch.cat(c)
        t_score = time.perf_counter() - t0
    st = memory()
    res = {
        "side": ns.side, "fit_s": t_fit, "score_s": t_score, "fit_score_s": t_fit + t_score,
        "process_s": time.perf_counter() - t_start,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_load_bytes": base, "peak_rise_bytes": st["VmHWM"] - base if reset_ok else None,
        "n_train": len(train.dataset), "n_test": {s: len(ld.dataset) for s, ld in tests.items()},
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    torch.save({"result": res, "scores": scores}, ns.side_out)


# -- the parent: alternate the sides, compare ---------------------------------------------------
def child(ns: argparse.Namespace, side: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.peer_end_to_end", "--side", side,
           "--side_out", str(out), "--data_root", str(ns.data_root),
           "--threads", str(ns.threads), "--batch_size", str(ns.batch_size),
           "--train_every", str(ns.train_every), "--test_every", str(ns.test_every),
           "--ckpt", str(ns.ckpt), "--detectors", *ns.detectors]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    got = torch.load(out, weights_only=True)
    got["result"]["wall_s"] = time.perf_counter() - t0
    return got


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--train_every", type=int, default=1, help="every k-th training image")
    p.add_argument("--test_every", type=int, default=1, help="every k-th test image (both sets)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side (median)")
    p.add_argument("--batch_size", type=int, default=256)
    p.set_defaults(threads=2)
    p.add_argument("--detectors", nargs="+", default=DEFAULT, choices=list(OURS))
    p.add_argument("--ckpt", type=Path, default=CKPT)
    p.add_argument("--name", default="peer_end_to_end")
    p.add_argument("--side", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    p.add_argument("--side_out", type=Path, help=argparse.SUPPRESS)
    ns = parse(p, argv)
    if ns.side:
        run_side(ns)
        return
    from lightning_ood.protocol import evaluate_pair

    rec = Recorder(ns.name)
    if ns.quick:
        lenet = quick_lenets(ns.out / "work", {"lenet_quick": 1}, ns.data_root)["lenet_quick"]
        vars(ns).update(ckpt=lenet, repeats=1, train_every=100, test_every=50)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "theirs": []}
    last: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(ns.repeats):
            order = ("ours", "theirs") if rep % 2 == 0 else ("theirs", "ours")
            for side in order:
                got = child(ns, side, Path(tmp) / f"{side}.pt")
                runs[side].append(got["result"])
                last[side] = got["scores"]
                r = got["result"]
                rise = (r["peak_rise_bytes"] or 0) / 2**20
                print(
                    f"run {rep} {side:6s}: fit {r['fit_s']:.2f} s, score {r['score_s']:.2f} s, "
                    f"process {r['wall_s']:.2f} s, maxrss {r['ru_maxrss_bytes'] / 2**20:.0f} "
                    f"MiB, peak rise {rise:.0f} MiB",
                    flush=True,
                )

    def med(side: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in runs[side])

    keys = ("fit_s", "score_s", "fit_score_s", "wall_s", "ru_maxrss_bytes", "peak_rise_bytes")
    m = {s: {k: med(s, k) for k in keys if runs[s][0][k] is not None} for s in runs}
    ratio = {k: m["ours"][k] / m["theirs"][k] for k in m["ours"] if k in m["theirs"]}
    auroc = {}
    for n in ns.detectors:
        o, t = last["ours"][n], last["theirs"][n]
        auroc[n] = {
            "ours": evaluate_pair(o[SETS[0]], o[SETS[1]])["auroc"],
            "theirs": evaluate_pair(-t[SETS[0]], -t[SETS[1]])["auroc"],
        }
    info = runs["ours"][0]
    res = {
        "checkpoint": os.path.relpath(ns.ckpt, ROOT), "detectors": ns.detectors,
        "n_train": info["n_train"], "n_test": info["n_test"], "batch_size": ns.batch_size,
        "train_every": ns.train_every, "test_every": ns.test_every, "threads": ns.threads,
        "repeats": ns.repeats, "runs": runs, "median": m, "ratio_ours_over_theirs": ratio,
        "auroc_fashionmnist_vs_mnist": auroc,
    }  # fmt: skip
    mib = 2**20
    n_fit = sum(1 for n in ns.detectors if n not in NO_FIT)
    rows = [
        ("fit (training set)", "fit_s", "s", 1), ("score (ID + OOD test)", "score_s", "s", 1),
        ("fit + score", "fit_score_s", "s", 1),
        ("whole process (imports, data, model)", "wall_s", "s", 1),
        ("peak RSS (ru_maxrss)", "ru_maxrss_bytes", "MiB", mib),
        ("peak rise over RSS after loading", "peak_rise_bytes", "MiB", mib),
    ]  # fmt: skip
    md = [
        f"\nLeNet (3 epochs, `{res['checkpoint']}`), {len(ns.detectors)} detectors "
        f"({', '.join(ns.detectors)}): fit on {info['n_train']:,} FashionMNIST training images "
        f"(every {ns.train_every}), score {info['n_test']['fashionmnist']:,} FashionMNIST + "
        f"{info['n_test']['mnist']:,} MNIST test images (every {ns.test_every}), batch "
        f"{ns.batch_size}, no loader workers, {ns.threads} torch threads. Ours: one shared eval "
        "pass for fitting and one per test set (`engine.fit_from_loader`, `engine.score_loader`); "
        f"theirs: pytorch-ood's `fit(loader)` per detector ({n_fit} training passes) and "
        f"`predict(x)` per detector and batch ({len(ns.detectors)} forwards per batch). Each side "
        f"in its own process, alternating, median of {ns.repeats}.\n",
        "| measure | ours | pytorch-ood | ours / theirs |",
        "|---|---:|---:|---:|",
    ]
    for label, k, unit, div in rows:
        if k in ratio:
            md.append(f"| {label} | {m['ours'][k] / div:.2f} {unit} | "
                      f"{m['theirs'][k] / div:.2f} {unit} | **{ratio[k]:.2f}** |")  # fmt: skip
    md += [
        "\nAUROC (FashionMNIST vs MNIST, ID positive; theirs negated), same images:\n",
        "| detector | ours | pytorch-ood |",
        "|---|---:|---:|",
        *(f"| {n} | {100 * a['ours']:.2f} | {100 * a['theirs']:.2f} |" for n, a in auroc.items()),
    ]
    body = "\n".join(md) + "\n"
    rec.write(res, body, ns.out)
    print(body)


if __name__ == "__main__":
    main()
