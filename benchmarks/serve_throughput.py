"""Requests/s and latency of ``lightning-ood serve`` against the module called directly (issue 23).

For 1, 8 and 32 concurrent clients, the same FashionMNIST test images go

(a) as PNG request bodies to a real ``lightning-ood serve`` subprocess on 127.0.0.1 (LitServe,
    one inference worker, dynamic batching ``--max_batch_size``/``--batch_timeout``), one
    thread per client, each with a keep-alive ``requests.Session``; the time of a request is
    its round trip (PNG decoding, the checks, the module, JSON, HTTP);
(b) to the module itself, ``lightning_ood.load(ckpt, detectors=...)`` in this process, one image
    per call (uint8 tensor, no PNG), from the same number of threads.

Per level, ``--repeats`` rounds alternate (a) and (b); a round stops after ``--requests``
requests or ``--seconds`` s, whichever comes first (after ``--warmup`` untimed requests per
client), and each mode's best round (requests/s) is reported, as in ``zoo_throughput.py``, so a
busy spell of this shared machine does not decide the ratio. Ratios (a)/(b) of requests/s and
of p50/p99 latency are measured in one run. One batched row gives the module's own ceiling:
``--max_batch_size`` images per call. Before timing, the server's answers on 16 images are
checked against the module's (same prediction and decisions, scores within 1e-5).

    .venv/bin/python -m benchmarks.serve_throughput [--ckpt_path checkpoints/demo/fitted.ckpt]
        [--detectors energy,msp,mahalanobis,line] [--requests 1000] [--seconds 5] [--repeats 3]

The checkpoint defaults to ``checkpoints/demo/fitted.ckpt`` (or ``last.ckpt``) of ``make demo``;
without one, ``--fit_tiny`` first fits a small LeNet on slices (:func:`common.quick_demo`: three
training steps, the detectors fitted and calibrated) into a temporary folder. ``--quick`` does
that and runs one short round at 1 and 2 clients. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from PIL import Image
from torchvision.datasets import FashionMNIST

import lightning_ood
from benchmarks.common import ROOT, Recorder, parse, parser, quick_demo
from lightning_ood.serve import sha256_file, stop_server

HOST = "127.0.0.1"
DEFAULT_CKPTS = [
    ROOT / "checkpoints" / "demo" / "fitted.ckpt",
    ROOT / "checkpoints" / "demo" / "last.ckpt",
]
#: ``--quick``'s bounds: one round of a few requests at 1 and 2 clients.
QUICK = {"clients": "1,2", "requests": 8, "seconds": 1.0, "repeats": 1, "warmup": 1, "images": 16}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_server(ckpt: Path, ns: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "lightning_ood", "serve", "--ckpt_path", str(ckpt),
        "--detectors", ns.detectors, "--host", HOST, "--port", str(port),
        "--max_batch_size", str(ns.max_batch_size), "--batch_timeout", str(ns.batch_timeout),
        "--log_level", "warning",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise SystemExit(f"server not healthy after 300 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def png(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x[0].numpy()).save(buf, format="PNG")
    return buf.getvalue()


def run_level(clients: int, call: Any, n_items: int, ns: argparse.Namespace) -> dict[str, Any]:
    """``call(worker_state, i)`` from ``clients`` threads until ``--requests`` or ``--seconds``."""
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors = 0
    barrier = threading.Barrier(clients + 1)
    stop_at = [float("inf")]  # set when every client has warmed up

    def worker(k: int) -> None:
        nonlocal issued, errors
        state: dict[str, Any] = {}
        for j in range(ns.warmup):  # untimed, also opens the keep-alive connection
            call(state, (k + j * clients) % n_items)
        barrier.wait()
        mine: list[float] = []
        bad = 0
        while True:
            with lock:
                if issued >= ns.requests or time.perf_counter() > stop_at[0]:
                    break
                i = issued
                issued += 1
            t0 = time.perf_counter()
            ok = call(state, i % n_items)
            mine.append(time.perf_counter() - t0)
            bad += not ok
        with lock:
            latencies.extend(mine)
            errors += bad
        if "session" in state:
            state["session"].close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + ns.seconds
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_ms": float(lat.mean()),
    }


def check_answers(url: str, model: Any, x: torch.Tensor, bodies: list[bytes]) -> dict[str, Any]:
    """The server's answers on the first 16 images against the module's."""
    ref = model(x[:16])
    worst = 0.0
    same = True
    for i in range(16):
        r = requests.post(
            f"{url}/predict", data=bodies[i], headers={"Content-Type": "image/png"}, timeout=60
        )
        r.raise_for_status()
        got = r.json()
        same &= got["pred"] == int(ref["pred"][i])
        for n, d in got["detectors"].items():
            want = float(ref["scores"][n][i])
            worst = max(worst, abs(d["score"] - want) / max(1.0, abs(want)))
            same &= d["is_ood"] == bool(ref["is_ood"][n][i])
    if not (same and worst <= 1e-5):
        raise SystemExit(f"server answers differ from the module (max rel. Δscore {worst:g})")
    return {"images": 16, "same_pred_and_is_ood": same, "max_rel_score_diff": worst}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument(
        "--ckpt_path", default=None, help="default: checkpoints/demo/fitted.ckpt or last.ckpt"
    )
    ap.add_argument(
        "--fit_tiny", action="store_true", help="no checkpoint: fit a small LeNet first"
    )
    ap.add_argument("--detectors", default="energy,msp,mahalanobis,line")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=1000, help="most timed requests per round")
    ap.add_argument("--seconds", type=float, default=5.0, help="most seconds per round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per level and mode (best)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed requests per client")
    ap.add_argument("--max_batch_size", type=int, default=16)
    ap.add_argument("--batch_timeout", type=float, default=0.01)
    ap.add_argument("--images", type=int, default=256, help="distinct test images cycled")
    ns = parse(ap, argv)
    rec = Recorder("serve_throughput")
    tmp = Path(tempfile.mkdtemp(prefix="serve_throughput_"))
    if ns.quick:
        vars(ns).update(QUICK)
        ns.ckpt_path = str(quick_demo(ns.out / "work", ns.data_root)[0])
    if ns.ckpt_path:
        ckpt = Path(ns.ckpt_path)
    else:
        found = [p for p in DEFAULT_CKPTS if p.is_file()]
        if found:
            ckpt = found[0]
        elif ns.fit_tiny:
            ckpt = quick_demo(tmp, ns.data_root)[0]
        else:
            raise SystemExit(
                "no checkpoint: run `make demo` (writes checkpoints/demo/), pass --ckpt_path, "
                "or --fit_tiny to fit a small LeNet first"
            )
    detectors = [d for d in ns.detectors.split(",") if d]
    model = lightning_ood.load(ckpt, detectors=detectors)
    ds = FashionMNIST(str(ns.data_root), train=False)
    x = ds.data[:: max(1, len(ds) // ns.images)][: ns.images].unsqueeze(1).contiguous()
    bodies = [png(img) for img in x]
    levels = [int(c) for c in ns.clients.split(",")]

    def server_call(state: dict[str, Any], i: int) -> bool:
        s = state.get("session") or state.setdefault("session", requests.Session())
        r = s.post(url, data=bodies[i], headers={"Content-Type": "image/png"}, timeout=120)
        return r.status_code == 200

    def direct_call(state: dict[str, Any], i: int) -> bool:
        model(x[i : i + 1])
        return True

    log = tmp / "server.log"
    proc, base = start_server(ckpt, ns, log)
    url = f"{base}/predict"
    try:
        check = check_answers(base, model, x, bodies)
        out: dict[str, Any] = {
            "checkpoint": {"path": str(ckpt), "sha256": sha256_file(ckpt)},
            "detectors": detectors,
            "server": {
                "max_batch_size": ns.max_batch_size,
                "batch_timeout": ns.batch_timeout,
                "workers_per_device": 1,
                "request_form": "raw image/png body (28x28 grayscale)",
            },
            "bounds": {
                "requests_per_round": ns.requests,
                "seconds_per_round": ns.seconds,
                "rounds": ns.repeats,
                "warmup": ns.warmup,
            },
            "answers_checked": check,
            "levels": {},
        }
        for c in levels:
            rounds: dict[str, list[dict[str, Any]]] = {"server": [], "direct": []}
            for _ in range(ns.repeats):  # alternately, so a busy spell hits both modes
                rounds["server"].append(run_level(c, server_call, len(x), ns))
                rounds["direct"].append(run_level(c, direct_call, len(x), ns))
            srv = max(rounds["server"], key=lambda r: r["requests_per_s"])
            dct = max(rounds["direct"], key=lambda r: r["requests_per_s"])
            out["levels"][str(c)] = {
                "server": srv,
                "direct": dct,
                "ratio_requests_per_s": srv["requests_per_s"] / dct["requests_per_s"],
                "ratio_p50": srv["p50_ms"] / dct["p50_ms"],
                "ratio_p99": srv["p99_ms"] / dct["p99_ms"],
                "rounds": rounds,
            }
            print(c, {k: v for k, v in out["levels"][str(c)].items() if k != "rounds"}, flush=True)
    finally:
        stop_server(proc)
    # the module's ceiling: full batches, one call each (best of --repeats)
    b = ns.max_batch_size
    for _ in range(ns.warmup):
        model(x[:b])
    rates = []
    for _ in range(ns.repeats):
        calls = 0
        t0 = time.perf_counter()
        while calls * b < ns.requests and time.perf_counter() - t0 < ns.seconds:
            i = (calls * b) % (len(x) - b + 1)
            model(x[i : i + b])
            calls += 1
        rates.append(calls * b / (time.perf_counter() - t0))
    batched = {"batch": b, "images_per_s": max(rates), "rounds_images_per_s": rates}
    out["direct_batched"] = batched
    md = [
        f"Checkpoint `{ckpt}` (sha256 `{out['checkpoint']['sha256'][:16]}…`), detectors "
        f"{', '.join(detectors)}; {len(x)} FashionMNIST test images cycled. Server: "
        f"`lightning-ood serve`, one worker, max_batch_size {b}, batch_timeout "
        f"{ns.batch_timeout} s, raw PNG bodies over keep-alive HTTP on 127.0.0.1; direct: "
        "`lightning_ood.load(ckpt)(x)` on one uint8 image per call, in this process. Clients "
        "are threads of this process (they share the machine's cores with the server). Each "
        f"level and mode: {ns.repeats} rounds, alternately server and direct, each at most "
        f"{ns.requests} timed requests or {ns.seconds:g} s after {ns.warmup} untimed "
        "requests per client; the table shows each mode's best round (by requests/s). "
        "Answers on 16 images checked first: "
        f"max relative |Δscore| {check['max_rel_score_diff']:.2g}, same predictions and decisions.",
        "",
        "| clients | server req/s | direct calls/s | ratio | server p50 / p99 ms | "
        "direct p50 / p99 ms | p50 ratio | p99 ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, lv in out["levels"].items():
        s, d = lv["server"], lv["direct"]
        md.append(
            f"| {c} | {s['requests_per_s']:.0f} | {d['requests_per_s']:.0f} | "
            f"{lv['ratio_requests_per_s']:.3f} | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} | "
            f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f} | {lv['ratio_p50']:.1f} | "
            f"{lv['ratio_p99']:.1f} |"
        )
    errors = sum(r["errors"] for lv in out["levels"].values() for r in lv["rounds"]["server"])
    md += [
        "",
        f"Server errors (non-200) in all rounds: {errors}. The module on full batches of "
        f"{b} (one call each): {batched['images_per_s']:.0f} images/s, the ceiling dynamic "
        "batching approaches.",
        "",
        "Reading: with one client every request waits up to batch_timeout for a batch to "
        "fill (LitServe's dynamic batching), which is most of its latency; with more clients "
        "the server stacks their images into one module call, while direct calls from many "
        "threads of one process contend for the same cores one image at a time.",
        "",
        "Other processes may have been running on this shared machine: see the load averages.",
    ]
    body = "\n".join(md)
    print(body)
    rec.write(out, body, ns.out)


if __name__ == "__main__":
    main()
