"""DenseNet-BC-100 inference throughput on this machine: batch size x memory format.

    .venv/bin/python -m benchmarks.densenet_cpu_throughput [--seconds 8]

Writes ``<out>/densenet_cpu_throughput.{json,md}``. Run on an otherwise idle machine: 2-thread
torch on 2 cores slows down several-fold when another process competes for a core. Random
weights (throughput does not depend on them).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import Recorder, parse, parser
from lightning_ood.models import create_model

BATCHES = (16, 32, 64, 200)


def throughput(batch: int, channels_last: bool, seconds: float, device: str) -> float:
    """Images per second of the eval forward over ``seconds`` (after one warm-up batch)."""
    model = create_model("densenet100", num_classes=10).eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32, device=device)
    with torch.inference_mode():
        model(x)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += batch
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per cell")
    ns = parse(p, argv)
    rec = Recorder("densenet_cpu_throughput")
    batches, seconds = ((2,), 0.2) if ns.quick else (BATCHES, ns.seconds)
    lines = [
        f"DenseNet-BC-100 eval forward, images/s, {torch.get_num_threads()} torch threads, "
        f"device {ns.device}, {seconds:g} s per cell.",
        "",
        "| batch | contiguous | channels_last |",
        "|---:|---:|---:|",
    ]
    rows = {}
    for batch in batches:
        a = throughput(batch, False, seconds, ns.device)
        b = throughput(batch, True, seconds, ns.device)
        rows[batch] = {"contiguous": a, "channels_last": b}
        lines.append(f"| {batch} | {a:.1f} | {b:.1f} |")
    body = "\n".join(lines)
    print(body)
    rec.write({"images_per_s": rows, "seconds": seconds, "device": ns.device}, body, ns.out)


if __name__ == "__main__":
    main()
