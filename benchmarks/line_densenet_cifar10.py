"""Issue item 2: LINe and every baseline on the reference CIFAR-10 DenseNet-BC-100.

ID: ``cifar10-jpeg-q75/test`` (10,000 images; a lossy JPEG-q75 copy of CIFAR-10). LINe's
contribution matrix, DICE's mean feature, ReAct's clip percentile and the Mahalanobis class
means/covariance come from ``cifar10-jpeg-q75/train`` (50,000 images, eval transform).
OOD: TinyImageNet-crop, TinyImageNet-resize, MNIST, FashionMNIST, KMNIST (test splits, 32x32
RGB). Paper hyperparameters: p_w 90, p_a 90, delta 1.0 (METHODS.md).

Stages (features are cached under ``.cache/features``, so stage ``score`` runs no network):

    .venv/bin/python -m benchmarks.line_densenet_cifar10 --stage features
    .venv/bin/python -m benchmarks.line_densenet_cifar10 --stage odin --odin_every 10 \
        --odin_id_every 10
    .venv/bin/python -m benchmarks.line_densenet_cifar10 --stage score --odin_every 10

``odin`` needs input gradients (no cache possible); it runs on every ``--odin_id_every``-th ID
test image and every ``--odin_every``-th image of each OOD set (after ``--ood_every``) and
writes ``.cache/odin_scores_ood<ood_every>_every<odin_every>.pt``, which ``score`` reads.
``--quick`` runs the three stages on 50 training, 20 ID and 20 images per OOD set, with every
feature and score file under ``<out>/work``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks import common

OOD_SETS = common.CIFAR10_OOD
STD_REF = common.CIFAR10_STD
DETECTORS = {
    "msp": {},
    "energy": {},
    "react": {"percentile": 90.0},
    "dice": {"p": 90.0},
    "dice_react": {"p": 90.0, "percentile": 90.0},
    # ReAct with the fixed clip c = 1.0 (= LINe's delta): an extra variant, see README
    "react_c1": {"type": "react", "clip": 1.0},
    "dice_react_c1": {"type": "dice_react", "p": 90.0, "clip": 1.0},
    "mahalanobis": {},  # penultimate features only (taps = [features]), no pre-processing
    "line_energy_ac": {"type": "line", "delta": 1.0, "p_a": 90, "p_w": 90,
                       "act_prune": False, "weight_prune": False},
    "line_ac_ap": {"type": "line", "delta": 1.0, "p_a": 90, "p_w": 90, "weight_prune": False},
    "line_ac_wp": {"type": "line", "delta": 1.0, "p_a": 90, "p_w": 90, "act_prune": False},
    "line": {"type": "line", "delta": 1.0, "p_a": 90, "p_w": 90},
}  # fmt: skip
ODIN = {"temperature": 1000.0, "epsilon": 0.0014, "input_std": STD_REF}
METRICS = ["fpr95", "auroc", "aupr_in", "aupr_out"]


def build(ns: argparse.Namespace, train_every: int, ood_every: int) -> tuple:
    """The DenseNet and data of every stage (ID test set whole unless ``--quick``)."""
    every = {"train_every": train_every, "ood_every": ood_every}
    if ns.quick:
        every["test_every"] = common.QUICK_SLICES["test_every"]
    return common.cifar10_densenet(ns, OOD_SETS, ns.batch_size, **every)


def stage_features(ns: argparse.Namespace) -> None:
    from lightning_ood.features import FeatureCache

    backbone, dm, loaders, names = build(ns, ns.train_every, ns.ood_every)
    cache = FeatureCache(ns.cache_dir)
    order = [names[0], *names[1:]]
    for n in order:
        t0 = time.perf_counter()
        c = cache.get_or_compute(backbone, loaders[n], [], desc=n)
        print(
            f"{n}: {len(c)} samples, {time.perf_counter() - t0:.1f} s, hit={c.from_cache}",
            flush=True,
        )
    t0 = time.perf_counter()
    c = cache.get_or_compute(backbone, dm.train_eval_dataloader(), [], desc="train")
    print(
        f"train: {len(c)} samples, {time.perf_counter() - t0:.1f} s, hit={c.from_cache}", flush=True
    )


def stage_odin(ns: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader, Subset

    from lightning_ood.detectors import build_detector
    from lightning_ood.engine import score_loader

    backbone, _dm, loaders, names = build(ns, 1, ns.ood_every)
    dets = {"odin": build_detector("odin", ODIN)}
    out = {
        "every": ns.odin_every,
        "id_every": ns.odin_id_every,
        "config": ODIN,
        "scores": {},
        "seconds": {},
    }
    for n in names:
        ds = loaders[n].dataset
        k = ns.odin_id_every if n == names[0] else ns.odin_every
        sub = Subset(ds, list(range(0, len(ds), k)))
        ld = DataLoader(sub, batch_size=ns.batch_size, shuffle=False)
        t0 = time.perf_counter()
        out["scores"][n] = score_loader(dets, backbone, ld)["odin"]
        out["seconds"][n] = time.perf_counter() - t0
        print(f"odin {n}: {len(sub)} samples, {out['seconds'][n]:.1f} s", flush=True)
    path = Path(ns.cache_dir).parent / f"odin_scores_ood{ns.ood_every}_every{ns.odin_every}.pt"
    torch.save(out, path)
    print(f"wrote {path}")


def stage_score(ns: argparse.Namespace, rec: common.Recorder) -> None:
    from lightning_ood.detectors import build_detector, build_detectors
    from lightning_ood.features import FeatureCache

    backbone, dm, loaders, names = build(ns, ns.train_every, ns.ood_every)
    cache = FeatureCache(ns.cache_dir)
    feats = {n: cache.get_or_compute(backbone, loaders[n], [], desc=n) for n in names}
    train = cache.get_or_compute(backbone, dm.train_eval_dataloader(), [], desc="train")
    if cache.misses:
        print(f"WARNING: {cache.misses} feature sets were computed now (not cached)")
    idn = names[0]
    acc = float((feats[idn].logits.argmax(1) == feats[idn].targets).double().mean())
    train_acc = float((train.logits.argmax(1) == train.targets).double().mean())
    t0 = time.perf_counter()
    dets = build_detectors(DETECTORS)
    evaluation = common.evaluate(
        dets, backbone, feats, train
    )  # one fitting pass, one score per set
    rows = {
        name: {**per, "average": {m: per["average"][m] for m in METRICS}}
        for name, per in evaluation.metrics.items()
    }
    for name, det in dets.items():  # the fitted clip of the ReAct variants, for the table
        if hasattr(det, "clip_value"):
            rows[name]["_c"] = float(det.clip_value)
    timing = {"all_detectors": round(time.perf_counter() - t0, 3)}
    odin_path = Path(ns.cache_dir).parent / f"odin_scores_ood{ns.ood_every}_every{ns.odin_every}.pt"
    odin_note = None
    if odin_path.is_file():
        o = torch.load(odin_path, weights_only=True)  # tensors, floats and strings only
        s = o["scores"]
        odin = {"odin": build_detector("odin", ODIN)}  # scores at hand: the protocol step only
        per = common.evaluate_banks(odin, {"odin": [s[n] for n in names]}, names).metrics["odin"]
        rows["odin"] = {**per, "average": {m: per["average"][m] for m in METRICS}}
        odin_note = (
            f"ODIN (T 1000, eps 0.0014, step / std {STD_REF}) on a slice: every "
            f"{o.get('id_every', o['every'])}-th ID test image (n {len(s[idn])}) and every "
            f"{o['every']}-th image of each OOD set above (n "
            f"{', '.join(str(len(s[n])) for n in names[1:])}); input gradients cannot be cached. "
            f"Network time {sum(o['seconds'].values()):.0f} s."
        )
    order = ["msp", "odin", "energy", "react", "react_c1", "dice", "dice_react",
             "dice_react_c1", "mahalanobis",
             "line_energy_ac", "line_ac_ap", "line_ac_wp", "line"]  # fmt: skip
    order = [d for d in order if d in rows]
    # ordering check (paper: LINe < DICE+ReAct < DICE < Energy < MSP in FPR95)
    chain = ["line", "dice_react", "dice", "energy", "msp"]
    checks = {}
    for n in [*names[1:], "average"]:
        f = [rows[d][n]["fpr95"] for d in chain]
        pairs = {f"{chain[i]}<{chain[i + 1]}": bool(f[i] < f[i + 1]) for i in range(4)}
        checks[n] = {"holds": all(pairs.values()), "pairs": pairs}
    checks_c1 = {}
    chain_c1 = ["line", "dice_react_c1", "dice", "energy", "msp"]
    for n in [*names[1:], "average"]:
        f = [rows[d][n]["fpr95"] for d in chain_c1]
        pairs = {f"{chain_c1[i]}<{chain_c1[i + 1]}": bool(f[i] < f[i + 1]) for i in range(4)}
        checks_c1[n] = {"holds": all(pairs.values()), "pairs": pairs}
    sizes = {n: len(feats[n]) for n in names}
    # Why the percentile clip behaves as it does here: quantiles of the penultimate activations.
    act_stats = {}
    for label, f in (("id_test", feats[idn].features), ("train", train.features)):
        v = f.flatten().double().sort().values  # exact (torch.quantile caps at 16M values)
        q = [float(v[min(v.numel() - 1, int(p * (v.numel() - 1)))]) for p in (0.5, 0.9, 0.99)]
        act_stats[label] = {"median": q[0], "p90": q[1], "p99": q[2],
                            "frac_above_delta_1.0": float((v > 1.0).double().mean()),
                            "n_values": v.numel()}  # fmt: skip
    # markdown
    lines = [
        "",
        f"Data: CIFAR-10 JPEG-q75 copy (ID test n = {sizes[idn]}; fit on train n = {len(train)}). "
        f"Reference DenseNet-BC-100 top-1 on this copy: test {100 * acc:.2f} %, train "
        f"{100 * train_acc:.2f} % (eval transform, std {STD_REF}).",
        "OOD n per set: " + ", ".join(f"{n} {sizes[n]}" for n in names[1:]) + ".",
        "Values in %; FPR95 with ID as the positive class (papers' convention); AUPR-In ID "
        "positive, AUPR-Out OOD positive. Hyperparameters: p_w 90, p_a 90, delta 1.0; ReAct/"
        "DICE+ReAct clip at the 90th percentile of training activations (react, dice_react; "
        f"c = {rows['react']['_c']:.3f} here) or at c = 1.0 (react_c1, dice_react_c1); DICE p 90; "
        "Mahalanobis on the penultimate features (342-d, class means + tied covariance, no "
        "input pre-processing, no layer ensemble).",
    ]
    lines.append(
        "Penultimate activations (342-d, after the final BN-ReLU-pool): "
        + "; ".join(
            f"{k}: median {a['median']:.4f}, p90 {a['p90']:.3f}, p99 {a['p99']:.3f}, "
            f"{100 * a['frac_above_delta_1.0']:.2f} % above delta 1.0"
            for k, a in act_stats.items()
        )
        + " (lower order statistics over all values)."
    )
    if odin_note:
        lines.append(
            odin_note + " Its average is over those slices, not comparable sample-"
            "for-sample with the other rows."
        )
    lines += ["", "| method | " + " | ".join(names[1:]) + " | average |",
              "|---|" + "---:|" * (len(names))]  # fmt: skip
    for d in order:
        cells = [f"{common.pct(rows[d][n]['fpr95'])} / {common.pct(rows[d][n]['auroc'])}"
                 for n in [*names[1:], "average"]]  # fmt: skip
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines[-len(order) - 2] = "| FPR95↓ (ID+) / AUROC↑ | " + " | ".join(names[1:]) + " | average |"
    lines += ["", "AUPR-In / AUPR-Out:", "",
              "| method | " + " | ".join(names[1:]) + " | average |",
              "|---|" + "---:|" * (len(names))]  # fmt: skip
    for d in order:
        cells = [f"{common.pct(rows[d][n]['aupr_in'])} / {common.pct(rows[d][n]['aupr_out'])}"
                 for n in [*names[1:], "average"]]  # fmt: skip
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines += ["", "Paper ordering LINe < DICE+ReAct < DICE < Energy < MSP (FPR95):", ""]
    for n, c in checks.items():
        bad = [k for k, v in c["pairs"].items() if not v]
        lines.append(f"- {n}: {'holds' if c['holds'] else 'fails at ' + ', '.join(bad)}")
    lines += ["", "Same chain with DICE+ReAct clipped at c = 1.0 (dice_react_c1):", ""]
    for n, c in checks_c1.items():
        bad = [k for k, v in c["pairs"].items() if not v]
        lines.append(f"- {n}: {'holds' if c['holds'] else 'fails at ' + ', '.join(bad)}")
    results = {
        "id_set": idn, "sizes": sizes, "n_train": len(train), "test_acc": acc,
        "train_acc": train_acc, "detectors": {**DETECTORS, "odin": ODIN}, "metrics": rows,
        "ordering": checks, "ordering_c1": checks_c1, "odin_note": odin_note,
        "fit_and_score_seconds": timing, "activation_stats": act_stats,
    }  # fmt: skip
    rec.write(results, "\n".join(lines), ns.out)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__)
    p.add_argument("--stage", choices=["features", "odin", "score"], default=None)
    p.add_argument("--cache_dir", default=str(common.CACHE / "features"))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--train_every", type=int, default=1)
    p.add_argument("--ood_every", type=int, default=1)
    p.add_argument("--odin_every", type=int, default=4)
    p.add_argument("--odin_id_every", type=int, default=20)
    ns = common.parse(p, argv)
    if ns.quick:
        vars(ns).update(
            train_every=common.QUICK_SLICES["train_every"], odin_every=5, odin_id_every=5
        )
        ns.ood_every = common.QUICK_SLICES["ood_every"]
        ns.cache_dir = str(common.work_dir(ns, "features") / "features")
    elif ns.stage is None:
        p.error("--stage is required (features, odin, then score), unless --quick")
    rec = common.Recorder("line_densenet_cifar10")
    stages = ["features", "odin", "score"] if ns.quick else [ns.stage]
    for stage in stages:
        if stage == "features":
            stage_features(ns)
        elif stage == "odin":
            stage_odin(ns)
        else:
            stage_score(ns, rec)


if __name__ == "__main__":
    main()
