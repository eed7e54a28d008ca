"""FSSD paper Figures 4 and 5 on our models: corruption shift and robustness to noisy test data.

Issue 12 item 8. Two modes, everything through ``lightning-ood test`` with generated configs:

``shift`` (Figure 4 analogue): the corrupted half of the ID test set as OOD, every corruption
type of our port x severity 1-5 (``kind: corrupted``; the ID side scores the other, clean
half). FashionMNIST vs FashionMNIST-C on the --epochs LeNets (one run per seed), and the
reference DenseNet-BC-100 on the CIFAR-10 JPEG-q75 copy vs its corrupted test half (a slice
of ``--dn_ood_every`` per set). The callback's severity summary gives AUROC mean and quartiles
over the corruption types per severity.

``robust`` (Figure 5): ID and OOD test images both corrupted (``data.test_corruption``) with
gaussian_noise and impulse_noise at severity 1-5, detectors fitted on clean training data,
layer-ensemble combiners fitted per run on held-out corrupted samples (as the callback does
by default) or, with ``--clean_combiners``, the clean run's loaded (``combiners_from``: fitted
and tuned on clean data only, as the paper); one run per (corruption, severity) plus a
clean one, reusing the first run's ``fitted.ckpt``. FashionMNIST vs MNIST (LeNets, seeds)
and the DenseNet CIFAR copy vs TinyImageNet-resize (a slice). Aggregated with
:func:`lightning_ood.report.robustness_summary`.

Regenerate (slices as in the results)::

    nice -n 19 .venv/bin/python -m benchmarks.fssd_corruption shift
    nice -n 19 .venv/bin/python -m benchmarks.fssd_corruption robust
    nice -n 19 .venv/bin/python -m benchmarks.fssd_corruption robust --clean_combiners
    # the 14-epoch LeNets (fssd_table2_train.sh 14 2), in their own --work and result names:
    nice -n 19 .venv/bin/python -m benchmarks.fssd_corruption shift --models lenet \
        --epochs 14 --work .cache/fssd_corruption_e14 --name fssd_corruption_shift_e14

``--quick`` runs both modes on one LeNet trained for three steps (no DenseNet), a few images per
set, severity 1 only in ``robust``.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    LENET_RECIPE,
    LENET_TAPS_FSSD,
    LENET_TAPS_MAHA,
    ROOT,
    Recorder,
    paper_metrics,
    parse,
    parser,
    quick_lenets,
    reference_weights,
    run_test,
    work_dir,
)
from lightning_ood import report
from lightning_ood.data.corruptions import CORRUPTIONS

TAPS_MAHA, TAPS_FSSD = LENET_TAPS_MAHA, LENET_TAPS_FSSD
#: DenseNet taps for FSSD: the stem and the three dense blocks (as the ResNet-34 recipe's stem
#: and stages), plus the logits (as the LeNet recipe).
TAPS_FSSD_DN = ["conv1", "block1", "block2", "block3", "logits"]
LENET_DETS: dict[str, Any] = {
    "msp": {},
    "maxlogit": {},
    "odin": {"temperature": 1000.0, "epsilon": 0.0014},
    "energy": {},
    "react": {},
    "mahalanobis": {"taps": TAPS_MAHA},
    "fssd": {"taps": TAPS_FSSD, "noise": "reference"},
    "vim": {},
    "rmds": {},
}
DN_DETS: dict[str, Any] = {
    "msp": {},
    # epsilon 0 (temperature scaling): the input-gradient step triples DenseNet's CPU cost
    "odin": {"temperature": 1000.0, "epsilon": 0.0},
    "energy": {},
    "mahalanobis": {"taps": ["features"]},
    "line": {"delta": 1.0, "p_a": 90, "p_w": 90},
    "fssd": {"taps": TAPS_FSSD_DN, "noise": "reference"},
}
NOISES = ["gaussian_noise", "impulse_noise"]
REUSE_NOTE = (
    "Each `lightning-ood test` run is reused from --out when its generated config is "
    "unchanged, so the wall time above is the last invocation's (only aggregation when every "
    "run was cached), not the runs'; their logs are in --out."
)
FMNIST_C = {"name": "fashionmnist_c", "kind": "corrupted", "base": "fashionmnist"}
FMNIST_C.update(corruption="all", severity="all")
CIFAR10_C = {"name": "cifar10_c", "kind": "corrupted", "base": "cifar10"}
CIFAR10_C.update(corruption="all", severity="all")


def callback(detectors: dict[str, Any], **kw: Any) -> list[dict[str, Any]]:
    return [
        {
            "class_path": "lightning_ood.callbacks.OODEvaluation",
            "init_args": {
                "detectors": detectors,
                "progress": False,
                "log_histograms": False,
                "log_roc": False,
                **kw,
            },
        }
    ]


def lenet_config(
    epochs: int,
    data: dict[str, Any],
    detectors: dict[str, Any],
    root: Path | None = None,
    **cb: Any,
) -> dict[str, Any]:
    """The LeNet training recipe's config (benchmarks/configs/lenet_fashionmnist_train.yaml)
    with ``data`` (and the data ``root``) merged in and an OOD callback; no figures unless
    ``cb`` asks."""
    train = yaml.safe_load(LENET_RECIPE.read_text())
    cfg = {k: v for k, v in train.items() if k != "experiment"}
    cfg["trainer"] = {**train["trainer"], "max_epochs": epochs}
    cfg["data"]["init_args"] = {**train["data"]["init_args"], **data}
    if root is not None:
        cfg["data"]["init_args"]["root"] = str(root)
    cfg["trainer"]["callbacks"] = callback(detectors, **{"figures": False, **cb})
    return cfg


def densenet_config(
    data: dict[str, Any], detectors: dict[str, Any], root: Path, **cb: Any
) -> dict[str, Any]:
    """configs/line_densenet_cifar10.yaml (reference DenseNet-BC-100, CIFAR-10 JPEG-q75 copy,
    both under the data ``root``) with ``data`` merged in and an OOD callback."""
    base = yaml.safe_load((ROOT / "configs/line_densenet_cifar10.yaml").read_text())
    cfg = {k: v for k, v in base.items() if k != "experiment"}
    cfg["trainer"] = {**base["trainer"], "accelerator": "cpu", "enable_progress_bar": False}
    cfg["model"]["model_kwargs"] = {
        **cfg["model"].get("model_kwargs", {}),
        "weights": str(reference_weights(root)),
    }
    cfg["data"]["init_args"] = {
        **base["data"]["init_args"],
        "root": str(root),
        "num_workers": 1,
        **data,
    }
    cfg["trainer"]["callbacks"] = callback(detectors, **{"figures": False, **cb})
    return cfg


def fitted_from(out: Path, tag: str) -> Path | None:
    """The ``--ckpt_path`` the run ``tag`` in ``out`` was made from (the ``# ckpt_path:`` line
    that :func:`benchmarks.common.run_test` writes into its config)."""
    path = out / f"{tag}.yaml"
    lines = path.read_text().splitlines() if path.is_file() else []
    found = [
        line.removeprefix("# ckpt_path: ") for line in lines if line.startswith("# ckpt_path: ")
    ]
    return Path(found[-1]) if found and found[-1] != "None" else None


def pooled_summary(per_run: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Severity summary over the corruption types of several runs (seeds) together: the
    callback's :func:`report.severity_summary` on the seeds' metrics side by side (each
    seed's sets renamed ``<base>@<k>/<type>/<severity>``, so types x seeds are pooled)."""
    merged: dict[str, dict[str, dict[str, float]]] = {}
    for k, r in enumerate(per_run):
        for det, per_set in paper_metrics(r["metrics"]).items():  # the papers' per-set rows
            for name, vals in per_set.items():
                parsed = report.severity_of(name)
                if parsed is not None:
                    key = f"{parsed[0]}@{k}/{parsed[1]}/{parsed[2]}"
                    merged.setdefault(det, {})[key] = vals
    return report.severity_summary(merged, "auroc")


def n_types(metrics: dict[str, Any]) -> int:
    """Number of corruption types among a detector's reported sets."""
    return len({p[1] for p in map(report.severity_of, metrics) if p is not None})


def spread_check(summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The paper's claims, per severity: which detector has the highest mean AUROC and the
    smallest interquartile range; and whether each detector's mean rises with severity."""
    lines = ["| severity | highest mean | smallest IQR (Q3-Q1) | FSSD mean / IQR |"]
    lines.append("|---|---|---|---|")
    sevs = sorted({int(s) for per in summary.values() for s in per})
    for s in map(str, sevs):
        top = max(summary, key=lambda d: summary[d][s]["mean"])
        tight = min(summary, key=lambda d: summary[d][s]["q3"] - summary[d][s]["q1"])
        f = summary.get("fssd", {}).get(s)
        fc = f"{100 * f['mean']:.2f} / {100 * (f['q3'] - f['q1']):.2f}" if f else ""
        iqr = 100 * (summary[tight][s]["q3"] - summary[tight][s]["q1"])
        lines.append(
            f"| {s} | {top} ({100 * summary[top][s]['mean']:.2f}) | {tight} ({iqr:.2f}) | {fc} |"
        )
    rising = []
    for det, per in summary.items():
        means = [per[str(s)]["mean"] for s in sevs]
        mono = all(b >= a for a, b in itertools.pairwise(means))
        rising.append(f"{det}: {'rises' if mono else 'not monotone'} "
                      f"({100 * means[0]:.1f} → {100 * means[-1]:.1f})")  # fmt: skip
    lines.append("\nMean AUROC from severity 1 to 5: " + "; ".join(rising) + ".")
    lines.append(
        "(A near-chance detector has a small IQR too: compare spreads among detectors with "
        "similar means.)"
    )
    return lines


def save_png(summary: dict[str, Any], path: Path, pooled: str = "types") -> str:
    fig = report.severity_figure(summary, "auroc", pooled=pooled)
    report.save_figure(fig, path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def shift(ns: argparse.Namespace, out: Path) -> tuple[dict[str, Any], str]:
    results: dict[str, Any] = {"lenet": {}, "densenet": None}
    md: list[str] = []
    figs = ns.out
    if "lenet" in ns.models:
        for s in ns.seeds:
            ckpt = ROOT / ns.ckpt_root / f"lenet_e{ns.epochs}_seed{s}" / "last.ckpt"
            data = {
                "test_every": ns.lenet_test_every,
                "ood_every": ns.lenet_ood_every,
                "ood_sets": [FMNIST_C],
                "eval_batch_size": 100,
                "num_workers": 0,
                **ns.lenet_fit_slice,
            }
            cfg = lenet_config(
                ns.epochs, data, ns.lenet_dets, ns.data_root, per_set_holdout=ns.lenet_holdout
            )
            results["lenet"][s] = run_test(f"shift_lenet_seed{s}", cfg, out, ckpt=ckpt, threads=1)
        runs = list(results["lenet"].values())
        summary = pooled_summary(runs)
        types = n_types(runs[0]["metrics"]["msp"])
        png = save_png(summary, figs / f"{ns.name}_lenet.png", pooled="types x seeds")
        held = runs[0]["validation"]["held_out_per_set"]
        md += [
            f"### FashionMNIST vs FashionMNIST-C (LeNet, {ns.epochs} epochs, seeds {ns.seeds})\n",
            f"{types} corruption types x severity 1-5; ID: every {ns.lenet_test_every}-th "
            "image of the clean test half; OOD: every "
            f"{ns.lenet_ood_every}-th image of the corrupted half per (type, severity). "
            f"Layer ensembles (mahalanobis, fssd) fit their combiner on {held} held-out samples "
            "per set and are reported on the rest. Quartiles over types x seeds "
            f"({types * len(runs)} values per cell). Figure: `{png}`.\n",
            f"AUROC↑ per corruption severity: mean [Q1, Q3] over {types} types x {len(runs)} "
            "seeds.",
            *report.severity_lines(summary, "auroc")[1:],
            "",
            *spread_check(summary),
        ]
        results["lenet_summary"] = summary
        per_seed = {s: r["severity"]["detectors"] for s, r in results["lenet"].items()}
        results["lenet_summary_per_seed"] = per_seed
    if "densenet" in ns.models:
        data = {
            "train_every": ns.dn_train_every,
            "test_every": ns.dn_test_every,
            "ood_every": ns.dn_ood_every,
            "ood_sets": [CIFAR10_C],
        }
        cfg = densenet_config(data, DN_DETS, ns.data_root, per_set_holdout=ns.dn_holdout)
        r = run_test("shift_densenet", cfg, out, threads=ns.dn_threads)
        results["densenet"] = r
        summary = r["severity"]["detectors"]
        types = n_types(r["metrics"]["msp"])
        png = save_png(summary, figs / f"{ns.name}_densenet.png")
        held = r["validation"]["held_out_per_set"]
        md += [
            "\n### CIFAR-10 JPEG-q75 copy vs its corrupted test half (reference DenseNet-BC-100)\n",
            f"{types} types x severity 1-5; ID: every {ns.dn_test_every}-th image of the "
            f"clean test half; OOD: every {ns.dn_ood_every}-th image of the corrupted half "
            f"per (type, severity) (a slice). Detectors fitted on every {ns.dn_train_every}-th "
            f"training image. Mahalanobis on the penultimate features (one tap), FSSD over "
            f"{TAPS_FSSD_DN}, its combiner on {held} held-out samples per set. ODIN: T 1000, "
            f"eps 0 (temperature scaling only; no input-gradient step, for CPU time). "
            f"Figure: `{png}`.\n",
            *report.severity_lines(summary, "auroc"),
            "",
            *spread_check(summary),
        ]
    return results, "\n".join(md)


def robust_runs(
    tag: str,
    make: Any,
    out: Path,
    ckpt: Path | None,
    threads: int,
    sevs: list[int],
    clean_combiners: bool = False,
) -> list[tuple[int, str, dict[str, Any]]]:
    """Clean run (fits the detectors, saves fitted.ckpt), then one run per noise x severity
    on that fitted.ckpt; with ``clean_combiners`` those runs load the clean run's per-set
    combiners (``combiners_from``) instead of fitting them on corrupted held-out samples.
    Returns ``(severity, corruption, results)``; severity 0 = clean."""
    clean = run_test(f"{tag}_clean", make(None), out, ckpt=ckpt, threads=threads)
    saved = out / "ckpt" / f"hA_{tag}_clean" / "fitted.ckpt"
    fit_ckpt = saved if saved.is_file() else ckpt  # a fitted ckpt in: nothing was refitted
    if fit_ckpt is None:
        raise FileNotFoundError(f"{saved} missing: run {tag}_clean saved no fitted detectors")
    runs = [(0, "clean", clean)]
    for noise in NOISES:
        for sev in sevs:
            corr = {"corruption": noise, "severity": sev, "seed": 0}
            cfg, name = make(corr), f"{tag}_{noise}_{sev}"
            if clean_combiners:
                source = str(out / f"{tag}_clean" / "ood_results.json")
                cfg["trainer"]["callbacks"][0]["init_args"]["combiners_from"] = source
                name += "_clean_combiners"
            r = run_test(name, cfg, out, ckpt=fit_ckpt, threads=threads)
            runs.append((sev, noise, r))
    return runs


def robust(ns: argparse.Namespace, out: Path) -> tuple[dict[str, Any], str]:
    results: dict[str, Any] = {}
    md: list[str] = []
    figs = ns.out
    sevs = ns.severities
    parts: list[tuple[str, str, list[tuple[int, str, dict[str, Any]]]]] = []
    if "lenet" in ns.models:
        runs = []
        for s in ns.seeds:
            ckpt = ROOT / ns.ckpt_root / f"lenet_e{ns.epochs}_seed{s}" / "last.ckpt"
            shared = out / "ckpt" / f"hA_shift_lenet_seed{s}" / "fitted.ckpt"
            if shared.is_file() and fitted_from(out, f"shift_lenet_seed{s}") == ckpt:
                ckpt = shared  # same detectors fitted on the same weights and training data

            def make(corr: dict[str, Any] | None) -> dict[str, Any]:
                data = {
                    "test_every": ns.lenet_robust_every,
                    "ood_every": ns.lenet_robust_every,
                    "ood_sets": ["mnist"],
                    "eval_batch_size": 100,
                    "num_workers": 0,
                    "test_corruption": corr,
                    **ns.lenet_fit_slice,
                }
                return lenet_config(
                    ns.epochs, data, ns.lenet_dets, ns.data_root, per_set_holdout=ns.lenet_holdout
                )

            args = (out, ckpt, 1, sevs, ns.clean_combiners)
            runs += robust_runs(f"robust_lenet_seed{s}", make, *args)
        parts.append(("lenet", "mnist", runs))
    if "densenet" in ns.models:

        def make_dn(corr: dict[str, Any] | None) -> dict[str, Any]:
            data = {
                "train_every": ns.dn_train_every,
                "test_every": ns.dn_robust_every,
                "ood_every": ns.dn_robust_every,
                "ood_sets": ["tinyimagenet_resize"],
                "test_corruption": corr,
            }
            return densenet_config(
                data, DN_DETS, ns.data_root, per_set_holdout=ns.dn_robust_holdout
            )

        shared = out / "ckpt" / "hA_shift_densenet" / "fitted.ckpt"  # same fit (train slice)
        dn_ckpt = shared if shared.is_file() else None
        args = (out, dn_ckpt, ns.dn_threads, sevs, ns.clean_combiners)
        runs = robust_runs("robust_densenet", make_dn, *args)
        parts.append(("densenet", "tinyimagenet_resize", runs))
    for model, ood, runs in parts:
        results[model] = [{"severity": s, "corruption": c, "results": r} for s, c, r in runs]
        for noise in NOISES:
            sel = [(s, r) for s, c, r in runs if c in ("clean", noise)]
            summary = report.robustness_summary(sel, ood, "auroc")
            results[f"{model}_{noise}_summary"] = summary
            png = save_png(summary, figs / f"{ns.name}_{model}_{noise}.png", pooled="seeds")
            n = len({id(r) for s, r in sel if s == 0})
            held = runs[0][2]["validation"]["held_out_per_set"]
            first = runs[0][2]
            m0 = first["metrics"]["msp"][ood]
            n_id = f"Reported per run: {m0['n_id']} ID / {m0['n_ood']} OOD samples (msp)."
            md += [
                f"\n### {model}: {first['id_set']} vs {ood}, both corrupted with {noise}\n",
                "Severity 0 = clean. "
                f"Layer-ensemble combiners on {held} held-out samples per set, "
                + (
                    "fitted on the clean run's and loaded (`combiners_from`) in the corrupted "
                    "runs (fitted and tuned on clean data, as the paper). "
                    if ns.clean_combiners
                    else "refitted on the corrupted ones in every corrupted run. "
                )
                + f"{n_id} Figure: `{png}`.\n",
                f"AUROC↑ per severity: mean [Q1, Q3] over the {n} run(s) (seeds).",
                *report.severity_lines(summary, "auroc")[1:],
            ]
    return results, "\n".join(md)


#: ``--quick``: one LeNet of three training steps, a few images per set, severity 1.
QUICK = {
    "models": ["lenet"], "epochs": 1, "seeds": [1], "lenet_test_every": 200,
    "lenet_ood_every": 200, "lenet_holdout": 10, "lenet_robust_every": 100,
    "severities": [1],
}  # fmt: skip
#: ``--quick``'s LeNet detectors: those a LeNet of three steps fits (no ViM subspace).
QUICK_DETS = {k: v for k, v in LENET_DETS.items() if k != "vim"}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("mode", nargs="?", choices=["shift", "robust"], help="required unless --quick")
    ap.add_argument("--models", nargs="+", default=["lenet", "densenet"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--ckpt_root", default="checkpoints/bench")
    ap.add_argument("--lenet_test_every", type=int, default=5)
    ap.add_argument("--lenet_ood_every", type=int, default=20)
    ap.add_argument("--lenet_holdout", type=int, default=100)
    ap.add_argument("--lenet_robust_every", type=int, default=10)
    ap.add_argument("--dn_train_every", type=int, default=50)
    ap.add_argument("--dn_test_every", type=int, default=20)
    ap.add_argument("--dn_ood_every", type=int, default=125)
    ap.add_argument("--dn_holdout", type=int, default=20)
    ap.add_argument("--dn_robust_every", type=int, default=50)
    ap.add_argument("--dn_robust_holdout", type=int, default=50)
    ap.add_argument("--dn_threads", type=int, default=1)
    ap.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="robust")
    ap.add_argument("--work", default=None, help="run folder (default .cache/fssd_corruption)")
    ap.add_argument(
        "--clean_combiners",
        action="store_true",
        help="robust: the corrupted runs load the clean run's layer-ensemble combiners "
        "(combiners_from) instead of refitting them on corrupted held-out samples",
    )
    ap.add_argument(
        "--name",
        default=None,
        help="result stem: <out>/<name>.{json,md} and its PNGs <name>_<model>*.png "
        "(default fssd_corruption_shift / fssd_robustness)",
    )
    ns = parse(ap, argv)
    ns.lenet_dets, ns.lenet_fit_slice = LENET_DETS, {}
    if ns.quick:  # detectors fitted on every 100th training image
        vars(ns).update(QUICK, lenet_dets=QUICK_DETS, lenet_fit_slice={"train_every": 100})
        folder = work_dir(ns, "fssd_corruption") / "lenets"
        quick_lenets(folder, {"lenet_e1_seed1": 1}, ns.data_root)
        ns.ckpt_root = str(folder)
    elif ns.mode is None:
        ap.error("mode is required (shift or robust), unless --quick")
    out = work_dir(ns, "fssd_corruption")
    for mode in ["shift", "robust"] if ns.quick and ns.mode is None else [ns.mode]:
        robust_name = "fssd_robustness" + ("_clean_combiners" if ns.clean_combiners else "")
        name = ns.name or ("fssd_corruption_shift" if mode == "shift" else robust_name)
        ns.name, rec = name, Recorder(name)
        results, body = (shift if mode == "shift" else robust)(ns, out)
        head = (
            "Values in %, ID positive; AUROC from the callback's exact float64 metrics. Data: "
            "FashionMNIST (original idx files); CIFAR-10 JPEG-q75 copy (reference "
            "DenseNet-BC-100 scores 82.30 % there). Corruptions: our port "
            f"(lightning_ood/data/corruptions.py, {len(CORRUPTIONS)} of the 19 ImageNet-C "
            "types, CIFAR-10-C constants, seeded per sample). Detectors at paper/default values "
            "(nothing tuned). " + REUSE_NOTE + "\n\n"
        )
        print(head + body)
        args = {k: v for k, v in vars(ns).items() if k not in ("lenet_dets", "lenet_fit_slice")}
        rec.write({"args": args, **results}, head + body, ns.out)
        ns.name = None if ns.quick else ns.name


if __name__ == "__main__":
    main()
