"""Issue 22's probe: what the demo checkpoint ships, scored as a receiving team would.

``lightning_ood.load(checkpoints/demo/fitted.ckpt)`` on the first 2,000 FashionMNIST and MNIST
test images (un-normalised [0, 1] floats straight from the idx files): AUROC of the layer
ensembles and the fraction each set flags as OOD at the shipped thresholds.

    .venv/bin/python benchmarks/handoff_probe.py
"""

from __future__ import annotations

import argparse

from torchvision.datasets import MNIST, FashionMNIST

import lightning_ood
from lightning_ood.data.paths import default_data_root
from lightning_ood.metrics import ood_metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", default="checkpoints/demo/fitted.ckpt")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--detectors", default="fssd,mahalanobis")
    ns = p.parse_args(argv)
    dets = ns.detectors.split(",")
    model = lightning_ood.load(ns.ckpt_path, detectors=dets)
    root = str(default_data_root())
    xs = [ds.data[: ns.n].float().div(255).unsqueeze(1) for ds in (
        FashionMNIST(root, train=False), MNIST(root, train=False))]  # fmt: skip
    out_id, out_ood = model(xs[0]), model(xs[1])
    for d in dets:
        auroc = ood_metrics(out_id["scores"][d].double(), out_ood["scores"][d].double())["auroc"]
        print(
            f"{d}: AUROC {100 * auroc:.2f}, MNIST flagged OOD "
            f"{100 * out_ood['is_ood'][d].float().mean():.1f} %, FashionMNIST flagged OOD "
            f"{100 * out_id['is_ood'][d].float().mean():.1f} %"
        )


if __name__ == "__main__":
    main()
