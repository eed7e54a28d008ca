"""Issue 12 item 7: FSSD ensembled over layers of one network and over several networks.

The FSSD paper (see METHODS.md, its Figure 6) combines FSSDs "from different layers of a
single neural network and multiple trained networks" with one logistic regression. For each
seed s the LeNet of seed s is tested (`lightning-ood test`, the callback's protocol: every
combiner fitted on 500 held-out samples per test set, seed 42, reported on the rest) with:

* ``fssd``: the 4-tap layer ensemble of that LeNet (conv1, conv2, fc1, logits): 4 components;
* ``fssd_nets``: ``fssd_ensemble`` over that LeNet and the 4 other LeNets of seeds 1-5, the
  same 4 taps each: 20 components;
* ``fssd_nets_logits``: the 5 networks' logits-tap FSSD only: 5 components (multi-model
  without the layer ensemble).

Checkpoints from ``benchmarks/fssd_table2_train.sh EPOCHS``::

    .venv/bin/python -m benchmarks.fssd_multi_model --epochs 3 --every 4

``--quick``: seed 1 tested with two LeNets trained for three steps each, every 100th image.
"""

from __future__ import annotations

from typing import Any

from benchmarks import common
from benchmarks.fssd_table2 import (
    METRICS,
    QUICK_DATA,
    TAPS_FSSD,
    base_config,
    callback,
    mean_std,
)

VARIANTS = {
    "fssd": "FSSD, 1 network x 4 taps",
    "fssd_nets": "FSSD, 5 networks x 4 taps",
    "fssd_nets_logits": "FSSD, 5 networks x logits",
}


def main(argv: list[str] | None = None) -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--networks", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--ckpt_root", default="checkpoints/bench")
    ap.add_argument("--every", type=int, default=4, help="keep every n-th test image per set")
    ap.add_argument("--work", default=None, help="run folder; default .cache/fssd_multi[_e<E>]")
    ap.add_argument("--name", default=None, help="result stem; default fssd_multi_model[_e<E>]")
    ns = common.parse(ap, argv)
    extra_data, holdout = {}, 500
    if ns.quick:
        vars(ns).update(epochs=1, seeds=[1], networks=[1, 2], every=100)
        folder = common.work_dir(ns, "fssd_multi") / "lenets"
        common.quick_lenets(folder, {f"lenet_e1_seed{s}": s for s in ns.networks}, ns.data_root)
        ns.ckpt_root, extra_data, holdout = str(folder), QUICK_DATA, 30
    suffix = common.epoch_suffix(ns.epochs)
    rec = common.Recorder(ns.name or "fssd_multi_model" + suffix)
    e, out = ns.epochs, common.work_dir(ns, "fssd_multi" + suffix)
    ckpt = {
        s: common.ROOT / ns.ckpt_root / f"lenet_e{e}_seed{s}" / "last.ckpt" for s in ns.networks
    }
    results: dict[int, dict[str, Any]] = {}
    for s in ns.seeds:
        others = [str(ckpt[o]) for o in ns.networks if o != s]
        dets = {
            "fssd": {"taps": TAPS_FSSD},
            "fssd_nets": {"type": "fssd_ensemble", "checkpoints": others, "taps": TAPS_FSSD},
            "fssd_nets_logits": {
                "type": "fssd_ensemble",
                "checkpoints": others,
                "taps": ["logits"],
            },
        }
        data = {"test_every": ns.every, "ood_every": ns.every, "ood_sets": ["mnist", "kmnist"]}
        cfg = base_config(e, {**data, **extra_data}, ns.data_root)
        cfg["trainer"]["callbacks"] = callback(dets, per_set_holdout=holdout)
        results[s] = common.run_test(f"multi_seed{s}", cfg, out, ckpt[s], prefix="table2")

    md = [
        "",
        f"LeNets (FSSD recipe, **{e} epochs**; the paper trains 14) on FashionMNIST; tested "
        f"networks: seeds {ns.seeds}, each with the other networks of seeds {ns.networks} as "
        f"ensemble members; every {ns.every}-th test image of each set. Every combiner is a "
        "LogisticRegressionCV (random_state 42) on 500 held-out samples per test set (seed 42), "
        "never reported; all rows report the same remaining samples. Values in %, mean ± std "
        "over the tested seeds; ID positive for AUROC/AUPR-In/FPR.",
        "",
        "The multi-network rows use the same five networks whichever seed is tested (the "
        "tested one plus the other four), so they are one ensemble seen in three component "
        "orders: their spread is the combiner's sensitivity to column order, not a spread "
        "over independent ensembles.",
    ]
    for ood in ("mnist", "kmnist"):
        md += [
            f"\n### FashionMNIST vs {ood}\n",
            "| detector | components | AUROC↑ | AUPR-In↑ | FPR80↓ | FPR95↓ |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for det, label in VARIANTS.items():
            runs = results.values()
            rows = [common.paper_metrics(r["metrics"]) for r in runs]  # the papers' per-set rows
            cells = [mean_std([r[det][ood][m] for r in rows]) for m in METRICS]
            md.append(f"| {det} | {label} | " + " | ".join(cells) + " |")
    results_json = {"seeds": ns.seeds, "networks": ns.networks, "runs": results}
    rec.write(results_json, "\n".join(md), ns.out)


if __name__ == "__main__":
    main()
