"""DenseNet-BC-100 inference throughput on this machine: batch size x memory format.

    python benchmarks/densenet_cpu_throughput.py [--seconds 8]

Prints a Markdown table and writes it to benchmarks/results/densenet_cpu_throughput.md.
Run on an otherwise idle machine: 2-thread torch on 2 cores slows down several-fold when
another process competes for a core.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from lightning_ood.models import create_model

OUT = Path(__file__).resolve().parent / "results" / "densenet_cpu_throughput.md"


def throughput(batch: int, channels_last: bool, seconds: float) -> float:
    model = create_model("densenet100", num_classes=10).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32)
    with torch.inference_mode():
        model(x)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    lines = [
        f"DenseNet-BC-100 eval forward, images/s, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}",
        "",
        "| batch | contiguous | channels_last |",
        "|---:|---:|---:|",
    ]
    for batch in (16, 32, 64, 200):
        a = throughput(batch, False, args.seconds)
        b = throughput(batch, True, args.seconds)
        lines.append(f"| {batch} | {a:.1f} | {b:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)


if __name__ == "__main__":
    main()
