"""Which combiner should a layer ensemble ship? Evidence on the demo (issue 22 item 1).

FSSD and multi-tap Mahalanobis score one component per tap; the papers combine them with a
logistic regression fitted on held-out samples *of each test set*, which no deployed detector
has. This script scores, on the demo's reported samples (FashionMNIST test vs MNIST test), the
combiners a checkpoint could ship:

* ``last tap``: component ``default_layer`` alone (what checkpoints shipped before);
* ``z-mean (ID only)``: components z-scored on the ID validation split and averaged (the
  OOD-free fallback, ``fit_id_only_combiner``);
* ``LR, FGSM proxy``: the logistic regression fitted on ID validation vs FGSM-perturbed ID
  validation samples (Lee et al. 2018's validation without OOD data; eps in pixel units);
* ``LR, val OOD``: the logistic regression on ID validation vs the validation OOD set (KMNIST,
  never reported): what ``lightning-ood test`` ships when ``val_ood_sets`` are given;
* ``per-set LR``: the papers' protocol (500 ID + 500 MNIST test samples held out, reported on
  the rest): uses the test set, an upper bound, never deployable.

    .venv/bin/python benchmarks/shipped_combiners.py --ckpt_path checkpoints/demo/fitted.ckpt

The checkpoint comes from ``make demo``. Writes ``benchmarks/results/shipped_combiners.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning_ood  # noqa: E402
from benchmarks._record import Recorder, pct  # noqa: E402
from lightning_ood import engine  # noqa: E402
from lightning_ood.cli import main  # noqa: E402
from lightning_ood.metrics import ood_metrics  # noqa: E402
from lightning_ood.protocol import holdout_splits  # noqa: E402

ENSEMBLES = ("fssd", "mahalanobis")


def fgsm(backbone: Any, loader: Any, eps: float, std: float) -> DataLoader:
    """FGSM-perturbed copies of ``loader``'s images (normalised space), against the predicted
    class: x + eps/std * sign(grad CE(f(x), argmax f(x)))."""
    out = []
    for x, _ in loader:
        x = x.detach().clone().requires_grad_(True)
        logits = backbone(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), x)
        out.append((x + eps / std * grad.sign()).detach())
    xs = torch.cat(out)
    return DataLoader(TensorDataset(xs, torch.zeros(len(xs))), batch_size=500)


def main_(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", default="checkpoints/demo/fitted.ckpt")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--eps", type=float, default=0.05, help="FGSM step in pixel units")
    p.add_argument("--holdout", type=int, default=500, help="per-set protocol hold-out")
    ns = p.parse_args(argv)
    rec = Recorder("shipped_combiners")
    torch.manual_seed(0)
    handoff = lightning_ood.load(ns.ckpt_path)
    backbone = handoff.backbone.eval()
    dets = {n: handoff.detectors[n] for n in ENSEMBLES}
    cli = main(["--config", ns.config], run=False)
    dm = cli.datamodule
    dm.setup("test")
    id_test, ood_test = dm.test_dataloader()
    val_ood = dm.val_ood_dataloaders()
    std = float(handoff.meta["std"][0])

    def comps(loader: Any, desc: str) -> dict[str, torch.Tensor]:
        return engine.score_loader(dets, backbone, loader, components=True, desc=desc)

    banks = {
        "id_val": comps(dm.val_dataloader(), "id val"),
        "ood_val": comps(next(iter(val_ood.values())), "val ood"),
        "adv": comps(fgsm(backbone, dm.val_dataloader(), ns.eps, std), "fgsm"),
        "id_test": comps(id_test, "id test"),
        "ood_test": comps(ood_test, "ood test"),
    }
    n_id, n_ood = len(banks["id_test"]["fssd"]), len(banks["ood_test"]["fssd"])
    split = holdout_splits({"id": n_id, "ood": n_ood}, ns.holdout, seed=42)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for name, det in dets.items():
        saved = det.combiner_state()
        cid, cood = banks["id_test"][name], banks["ood_test"][name]
        variants: dict[str, Any] = {}
        det.load_combiner_state({**saved, "combiner_fitted": torch.tensor(False)})
        variants["last tap"] = ood_metrics(cid[:, det.default_layer], cood[:, det.default_layer])
        det.fit_id_only_combiner(banks["id_val"][name])
        variants["z-mean (ID only)"] = ood_metrics(det.combine(cid), det.combine(cood))
        det.fit_combiner(banks["id_val"][name], banks["adv"][name])
        variants["LR, FGSM proxy"] = ood_metrics(det.combine(cid), det.combine(cood))
        det.fit_combiner(banks["id_val"][name], banks["ood_val"][name])
        variants["LR, val OOD"] = ood_metrics(det.combine(cid), det.combine(cood))
        det.fit_combiner(cid[split["id"][0]], cood[split["ood"][0]])
        variants["per-set LR (test hold-out)"] = ood_metrics(
            det.combine(cid[split["id"][1]]), det.combine(cood[split["ood"][1]])
        )
        det.load_combiner_state(saved)
        variants["as shipped in the checkpoint"] = ood_metrics(det.combine(cid), det.combine(cood))
        rows[name] = variants
    lines = [
        "ID: FashionMNIST test (10,000), OOD: MNIST test (10,000); ID validation: the demo's "
        f"2,000 held-out training images; validation OOD: KMNIST every 4th test image; FGSM "
        f"eps {ns.eps} (pixel units). Values in %, ID positive for FPR95.",
        "",
        "| detector | combiner | data it needs | AUROC↑ | FPR95↓ |",
        "|---|---|---|---:|---:|",
    ]
    needs = {
        "last tap": "none",
        "z-mean (ID only)": "ID validation",
        "LR, FGSM proxy": "ID validation",
        "LR, val OOD": "ID validation + validation OOD",
        "per-set LR (test hold-out)": "500 samples of each TEST set",
        "as shipped in the checkpoint": "(the checkpoint's own)",
    }
    for name, variants in rows.items():
        for v, m in variants.items():
            lines.append(f"| {name} | {v} | {needs[v]} | {pct(m['auroc'])} | {pct(m['fpr95'])} |")
    rec.write({"checkpoint": ns.ckpt_path, "eps": ns.eps, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main_()
