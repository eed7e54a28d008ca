"""Which combiner should a layer ensemble ship? Evidence on the demo (issue 22 item 1).

FSSD and multi-tap Mahalanobis score one component per tap; the papers combine them with a
logistic regression fitted on held-out samples *of each test set*, which no deployed detector
has. This script scores, on the demo's reported samples (FashionMNIST test vs MNIST test), the
combiners a checkpoint could ship, each fitted by the library's own code:

* ``last tap``: component ``default_layer`` alone (what checkpoints shipped before);
* ``z-mean (ID only)``: components z-scored on the ID validation split and averaged
  (``engine.deploy_combiners`` without OOD data: the OOD-free fallback);
* ``LR, FGSM proxy``: the logistic regression on ID validation vs FGSM-perturbed ID validation
  samples (``engine.fgsm_batches``; Lee et al. 2018's validation without OOD data; eps in pixel
  units);
* ``LR, val OOD``: the logistic regression on ID validation vs the validation OOD set (KMNIST,
  never reported): what ``lightning-ood test`` ships when ``val_ood_sets`` are given;
* ``per-set LR``: the papers' protocol (``protocol.evaluate_detectors`` with 500 ID + 500 MNIST
  test samples held out, reported on the rest): uses the test set, an upper bound, never
  deployable.

    .venv/bin/python -m benchmarks.shipped_combiners --ckpt_path checkpoints/demo/fitted.ckpt

The checkpoint comes from ``make demo``. Writes ``<out>/shipped_combiners.{json,md}``.
``--quick`` runs on a checkpoint fitted on the spot on slices (:func:`common.quick_demo`).
"""

from __future__ import annotations

from typing import Any

import torch

import lightning_ood
from benchmarks.common import ROOT, Recorder, evaluate_banks, parse, parser, pct, quick_demo
from lightning_ood import engine
from lightning_ood.cli import main as cli_main
from lightning_ood.protocol import per_set_row

ENSEMBLES = ("fssd", "mahalanobis")
NEEDS = {
    "last tap": "none",
    "z-mean (ID only)": "ID validation",
    "LR, FGSM proxy": "ID validation",
    "LR, val OOD": "ID validation + validation OOD",
    "per-set LR (test hold-out)": "a hold-out (--holdout) of each TEST set",
    "as shipped in the checkpoint": "(the checkpoint's own)",
}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--ckpt_path", default=str(ROOT / "checkpoints" / "demo" / "fitted.ckpt"))
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--eps", type=float, default=engine.FGSM_PROXY_EPS, help="FGSM step, pixels")
    p.add_argument("--holdout", type=int, default=500, help="per-set protocol hold-out")
    ns = parse(p, argv)
    rec = Recorder("shipped_combiners")
    ckpt, config, holdout = ns.ckpt_path, ns.config, ns.holdout
    if ns.quick:
        ckpt, config = quick_demo(ns.out / "work", ns.data_root)
        holdout = 20
    handoff = lightning_ood.load(ckpt)
    backbone = handoff.backbone.eval()
    dets = {n: handoff.detectors[n] for n in ENSEMBLES}
    dm = cli_main(["--config", str(config), "--data.init_args.root", str(ns.data_root)], run=False)
    dm = dm.datamodule
    dm.setup("test")
    id_test, ood_test = dm.test_dataloader()
    val_ood = next(iter(dm.val_ood_dataloaders().values()))
    fgsm = engine.fgsm_batches(backbone, dm.val_dataloader(), ns.eps, handoff.meta["std"])

    def comps(loader: Any, desc: str) -> dict[str, torch.Tensor]:
        return engine.score_loader(dets, backbone, loader, components=True, desc=desc)

    banks = {
        "id_val": comps(dm.val_dataloader(), "id val"),
        "ood_val": comps(val_ood, "val ood"),
        "adv": comps(fgsm, "fgsm"),
        "id_test": comps(id_test, "id test"),
        "ood_test": comps(ood_test, "ood test"),
    }
    test = {n: [banks["id_test"][n], banks["ood_test"][n]] for n in dets}
    sets = ["fashionmnist", "mnist"]

    def shipped() -> dict[str, dict[str, float]]:
        """Each detector's shipped row (its own combiner) on the reported test sets."""
        metrics = evaluate_banks(dets, test, sets).metrics
        return {n: metrics[n]["mnist"] for n in dets}

    saved = {n: d.combiner_state() for n, d in dets.items()}
    variants: dict[str, dict[str, dict[str, float]]] = {}
    for d in dets.values():
        d.load_combiner_state({**d.combiner_state(), "combiner_fitted": torch.tensor(False)})
    variants["last tap"] = shipped()
    engine.deploy_combiners(dets, banks["id_val"])
    variants["z-mean (ID only)"] = shipped()
    engine.deploy_combiners(dets, banks["id_val"], proxy_components=banks["adv"])
    variants["LR, FGSM proxy"] = shipped()
    engine.deploy_combiners(dets, banks["id_val"], banks["ood_val"])
    variants["LR, val OOD"] = shipped()
    per_set = evaluate_banks(dets, test, sets, per_set_holdout=holdout, seed=42).metrics
    variants["per-set LR (test hold-out)"] = {n: per_set[per_set_row(n)]["mnist"] for n in dets}
    for n, d in dets.items():
        d.load_combiner_state(saved[n])
    variants["as shipped in the checkpoint"] = shipped()
    rows = {n: {v: m[n] for v, m in variants.items()} for n in dets}
    n_id, n_ood = len(banks["id_test"]["fssd"]), len(banks["ood_test"]["fssd"])
    lines = [
        f"ID: FashionMNIST test ({n_id:,}), OOD: MNIST test ({n_ood:,}); ID validation: "
        f"{len(banks['id_val']['fssd']):,} held-out training images; validation OOD: KMNIST "
        f"({len(banks['ood_val']['fssd']):,}); FGSM eps {ns.eps} (pixel units); per-set "
        f"hold-out {holdout}. Values in %, ID positive for FPR95.",
        "",
        "| detector | combiner | data it needs | AUROC↑ | FPR95↓ |",
        "|---|---|---|---:|---:|",
    ]
    for name, per in rows.items():
        for v, m in per.items():
            lines.append(f"| {name} | {v} | {NEEDS[v]} | {pct(m['auroc'])} | {pct(m['fpr95'])} |")
    body = "\n".join(lines)
    rec.write({"checkpoint": str(ckpt), "eps": ns.eps, "rows": rows}, body, ns.out)
    print(body)


if __name__ == "__main__":
    main()
