"""Throughput of ``lightning-ood test`` on zoo models against a bare forward loop (issue 13).

For each model, the same batches of the CIFAR-10 JPEG-q75 test copy (eval transform, 32x32)
go through (a) a bare ``model(x)`` loop under ``torch.inference_mode`` and (b) Lightning's test
loop of the project (``ClassificationTask`` + the OOD callback scoring MSP, MaxLogit and Energy
from the task's single forward pass; no fitting pass). The ratio (a)/(b) of wall times, measured
in one run, alternately, best of ``--repeats``, is what the OOD machinery costs (1.0 = nothing).

    .venv/bin/python -m benchmarks.zoo_throughput [--images 2000] [--repeats 3]

``--quick``: 20 images, one round, the first model only.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

from benchmarks.common import Recorder, parse, parser

MODELS = {
    "resnet18 (CIFAR stem, OpenOOD v1.5)": ("resnet18", {"cifar_stem": True}),
    "tv:resnet18 (ImageNet stem) at 32x32": ("tv:resnet18", {"image_size": 32}),
    "tv:mobilenet_v2 at 32x32": ("tv:mobilenet_v2", {"image_size": 32}),
}
DETECTORS = {"msp": {}, "maxlogit": {}, "energy": {}}


class LoopTimer(Callback):
    """Wall time of the test loop only (batches, scoring; not setup or the final report)."""

    def on_test_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.t0 = time.perf_counter()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.t1 = time.perf_counter()


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch_size", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ns = parse(ap, argv)
    rec = Recorder("zoo_throughput")
    models = dict(MODELS)
    if ns.quick:
        ns.images, ns.batch_size, ns.repeats = 20, 10, 1
        models = dict(list(MODELS.items())[:1])
    from lightning_ood.callbacks import OODEvaluation
    from lightning_ood.data import CIFAR10DataModule
    from lightning_ood.task import ClassificationTask

    every = max(1, 10000 // ns.images)
    dm = CIFAR10DataModule(
        root=str(ns.data_root), batch_size=ns.batch_size,
        eval_batch_size=ns.batch_size, num_workers=0, test_every=every, ood_every=10**6,
        ood_sets=["mnist"],
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("test")
    n_img = len(dm.test_dataloader()[0].dataset)
    md = [
        f"{n_img} CIFAR-10 JPEG-q75 test images, batch {ns.batch_size}, "
        f"{torch.get_num_threads()} torch threads, random weights; best of {ns.repeats}. "
        "(a) bare `model(x)` over the ID test loader; (b) the test loop of lightning-ood over "
        "the same loader (and a 1-image MNIST set) scoring msp, maxlogit, energy; both decode "
        "the JPEGs. Ratio = images/s (b) / (a).",
        "",
        "| model | bare forward img/s | lightning-ood test img/s | ratio |",
        "|---|---:|---:|---:|",
    ]
    out: dict[str, Any] = {}
    for label, (name, kwargs) in models.items():
        task = ClassificationTask(model=name, num_classes=10, model_kwargs=kwargs)
        task.set_detectors(DETECTORS)
        model = task.backbone.eval()
        bare, loop = [], []
        for _ in range(ns.repeats):
            with torch.inference_mode():
                t0 = time.perf_counter()
                for x, _ in dm.test_dataloader()[0]:
                    model(x)
                bare.append(time.perf_counter() - t0)
            timer = LoopTimer()
            cb = OODEvaluation(detectors=None, progress=False, figures=False, log_roc=False,
                               log_histograms=False, save_fitted=False)  # fmt: skip
            trainer = Trainer(
                accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, inference_mode=False,
                callbacks=[cb, timer],
            )  # fmt: skip
            trainer.test(task, datamodule=dm, verbose=False)
            loop.append(timer.t1 - timer.t0)
        a, b = n_img / min(bare), n_img / min(loop)
        out[label] = {"bare_img_s": a, "test_img_s": b, "ratio": b / a}
        out[label].update(bare_s=bare, loop_s=loop)
        md.append(f"| {label} | {a:.1f} | {b:.1f} | {b / a:.3f} |")
    body = "\n".join(md)
    print(body)
    rec.write(out, body, ns.out)


if __name__ == "__main__":
    main()
