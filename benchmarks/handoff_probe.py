"""Issue 22's probe: what the demo checkpoint ships, scored as a receiving team would.

``lightning_ood.load(checkpoints/demo/fitted.ckpt)`` on the first 2,000 FashionMNIST and MNIST
test images (un-normalised [0, 1] floats straight from the idx files): AUROC of the layer
ensembles and the fraction each set flags as OOD at the shipped thresholds.

    .venv/bin/python -m benchmarks.handoff_probe

Writes ``<out>/handoff_probe.{json,md}``. ``--quick`` probes a checkpoint fitted on the spot
(:func:`benchmarks.common.quick_demo`) on 50 images.
"""

from __future__ import annotations

from torchvision.datasets import MNIST, FashionMNIST

import lightning_ood
from benchmarks.common import ROOT, Recorder, parse, parser, pct, quick_demo
from lightning_ood.metrics import ood_metrics


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--ckpt_path", default=str(ROOT / "checkpoints" / "demo" / "fitted.ckpt"))
    p.add_argument("--n", type=int, default=2000, help="first n test images of each set")
    p.add_argument("--detectors", default="fssd,mahalanobis")
    ns = parse(p, argv)
    rec = Recorder("handoff_probe")
    ckpt, n = ns.ckpt_path, ns.n
    if ns.quick:
        ckpt, n = quick_demo(ns.out / "work", ns.data_root)[0], 50
    dets = ns.detectors.split(",")
    model = lightning_ood.load(ckpt, detectors=dets)
    root = str(ns.data_root)
    xs = [ds.data[:n].float().div(255).unsqueeze(1) for ds in (
        FashionMNIST(root, train=False), MNIST(root, train=False))]  # fmt: skip
    out_id, out_ood = model(xs[0]), model(xs[1])
    rows, lines = {}, [f"`{ckpt}`, first {n} FashionMNIST (ID) and MNIST (OOD) test images.", ""]
    for d in dets:
        auroc = ood_metrics(out_id["scores"][d].double(), out_ood["scores"][d].double())["auroc"]
        rows[d] = {
            "auroc": auroc,
            "mnist_flagged_ood": float(out_ood["is_ood"][d].float().mean()),
            "fashionmnist_flagged_ood": float(out_id["is_ood"][d].float().mean()),
        }
        lines.append(
            f"- {d}: AUROC {pct(auroc)}, MNIST flagged OOD {pct(rows[d]['mnist_flagged_ood'])} %,"
            f" FashionMNIST flagged OOD {pct(rows[d]['fashionmnist_flagged_ood'])} %"
        )
    body = "\n".join(lines)
    print(body)
    rec.write({"checkpoint": str(ckpt), "n": n, "detectors": rows}, body, ns.out)


if __name__ == "__main__":
    main()
