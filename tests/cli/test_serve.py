"""`lightning-ood serve`: a real LitServe server in a subprocess on 127.0.0.1, called over HTTP.

One server per module (the session's fitted LeNet checkpoint, started from a YAML ``--config``
plus a ``--port`` flag); its answers are compared with ``lightning_ood.load(ckpt)`` on the same
FashionMNIST/MNIST test images, across the three request forms, sequential and concurrent
clients, and every kind of bad request (4xx with the module's message, then a good request).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import yaml
from _cli import ROOT
from PIL import Image
from torchvision.datasets import MNIST, FashionMNIST

import lightning_ood
from lightning_ood.serve import stop_server

#: Detectors that score without input gradients (fast), served by the module's server.
SERVED = ["energy", "msp", "mahalanobis", "line"]
HOST = "127.0.0.1"
MAX_BODY_MB = 0.25
#: Scores are float32 sums over a batch that LitServe composes differently from the reference.
TOL = {"rel": 1e-5, "abs": 1e-5}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, lenet_fitted: dict) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("serve")
    ckpt = Path(lenet_fitted["ckpt"])
    config = tmp / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "ckpt_path": str(ckpt),
                "detectors": SERVED,
                "host": HOST,
                "port": 1,  # replaced by the --port flag after --config
                "max_batch_size": 8,
                "batch_timeout": 0.02,
                "max_body_mb": MAX_BODY_MB,
                "log_level": "warning",
            }
        )
    )
    port = _free_port()
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "lightning_ood", "serve", "--config", str(config)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            cwd=ROOT,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown stops every worker
        )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after 240 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield {"url": url, "ckpt": ckpt, "log": log, "proc": proc}
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def model(lenet_fitted: dict) -> lightning_ood.OODPredictor:
    return lightning_ood.load(lenet_fitted["ckpt"], detectors=SERVED)


@pytest.fixture(scope="module")
def images(shared_data: Path) -> torch.Tensor:
    """24 FashionMNIST (ID) and 24 MNIST (OOD) test images, uint8 (48, 1, 28, 28)."""
    fmnist = FashionMNIST(str(shared_data), train=False).data[::400][:24]
    mnist = MNIST(str(shared_data), train=False).data[::400][:24]
    return torch.cat([fmnist, mnist]).unsqueeze(1)


@pytest.fixture(scope="module")
def expected(model: lightning_ood.OODPredictor, images: torch.Tensor) -> list[dict]:
    return _reference(model, images)


def _reference(model: lightning_ood.OODPredictor, x: torch.Tensor) -> list[dict]:
    """``load(ckpt)`` on a batch, as one answer per image in the server's format."""
    out = model(x)
    conf = torch.softmax(out["logits"], -1).amax(-1)
    return [
        {
            "pred": int(out["pred"][i]),
            "class_name": model.class_names[int(out["pred"][i])],
            "confidence": float(conf[i]),
            "detectors": {
                n: {
                    "score": float(out["scores"][n][i]),
                    "threshold": model.thresholds[n],
                    "is_ood": bool(out["is_ood"][n][i]),
                }
                for n in SERVED
            },
        }
        for i in range(len(x))
    ]


def _assert_same(got: dict, want: dict, ckpt: Path | None = None) -> None:
    assert got["pred"] == want["pred"] and got["class_name"] == want["class_name"]
    assert got["confidence"] == pytest.approx(want["confidence"], **TOL)
    assert list(got["detectors"]) == list(want["detectors"])
    for name, w in want["detectors"].items():
        g = got["detectors"][name]
        assert g["score"] == pytest.approx(w["score"], **TOL), name
        assert g["threshold"] == w["threshold"], name
        if abs(w["score"] - w["threshold"]) > 1e-4 * max(1.0, abs(w["threshold"])):
            assert g["is_ood"] == w["is_ood"], name  # (a tie at the threshold may round either way)
    if ckpt is not None:
        assert got["checkpoint"]["path"] == str(ckpt)
        assert got["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def _png(image: torch.Tensor | np.ndarray) -> bytes:
    arr = image.numpy() if isinstance(image, torch.Tensor) else image
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _post_png(url: str, data: bytes, session: Any = requests, query: str = "") -> Any:
    return session.post(
        f"{url}/predict{query}", data=data, headers={"Content-Type": "image/png"}, timeout=60
    )


def _check_good(server: dict, images: torch.Tensor, expected: list[dict], i: int = 0) -> None:
    r = _post_png(server["url"], _png(images[i]))
    assert r.status_code == 200, r.text
    _assert_same(r.json(), expected[i], server["ckpt"])


# -- the happy path ---------------------------------------------------------------------------
def test_health_and_info_name_the_checkpoint(server: dict, model: Any) -> None:
    r = requests.get(f"{server['url']}/health", timeout=10)
    assert (r.status_code, r.text) == (200, "ok")
    info = requests.get(f"{server['url']}/info", timeout=10).json()["model"]
    ckpt = server["ckpt"]
    assert info["checkpoint"] == {
        "path": str(ckpt),
        "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
    }
    assert info["input_shape"] == [1, 28, 28]
    assert info["class_names"] == model.class_names
    assert info["detectors"] == {n: {"threshold": t} for n, t in model.thresholds.items()}
    assert list(info["detectors"]) == SERVED


def test_png_responses_equal_the_module(server: dict, images: torch.Tensor, expected: list) -> None:
    with requests.Session() as s:
        got = [_post_png(server["url"], _png(x), s) for x in images]
    assert [r.status_code for r in got] == [200] * len(images), got[0].text
    for r, want in zip(got, expected, strict=True):
        _assert_same(r.json(), want, server["ckpt"])
    # both decisions occur on these images, so is_ood is compared in both directions
    flags = [r.json()["detectors"]["energy"]["is_ood"] for r in got]
    assert any(flags) and not all(flags)


def test_request_forms_give_the_same_answer(
    server: dict, model: Any, images: torch.Tensor, expected: list
) -> None:
    url = f"{server['url']}/predict"
    for i in (0, 5, 30, 41):
        x, png = images[i], _png(images[i])
        answers = {
            "raw png": _post_png(server["url"], png),
            "base64 json": requests.post(url, json={"image": base64.b64encode(png).decode()}),
            "data url": requests.post(
                url, json={"image": "data:image/png;base64," + base64.b64encode(png).decode()}
            ),
            "int list": requests.post(url, json={"image": x.tolist()}),
            "float list": requests.post(url, json={"image": (x.float() / 255).tolist()}),
            "gray as rgb png": _post_png(server["url"], _png(x.expand(3, -1, -1))),
        }
        for form, r in answers.items():
            assert r.status_code == 200, (form, r.text)
            _assert_same(r.json(), expected[i], server["ckpt"])
        first = answers["raw png"].json()
        assert all(r.json() == first for r in answers.values())  # identical, not just close
    # a JPEG body is scored as the module scores PIL's decoding of the same file
    buf = io.BytesIO()
    Image.fromarray(images[3, 0].numpy()).save(buf, format="JPEG", quality=90)
    decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue()))))
    r = requests.post(url, data=buf.getvalue(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    _assert_same(r.json(), _reference(model, decoded[None, None])[0], server["ckpt"])


def test_detectors_subset_per_request(server: dict, images: torch.Tensor, expected: list) -> None:
    url = f"{server['url']}/predict"
    r = requests.post(url, json={"image": images[2].tolist(), "detectors": ["msp", "energy"]})
    assert r.status_code == 200, r.text
    assert list(r.json()["detectors"]) == ["msp", "energy"]
    for n in ("msp", "energy"):
        assert r.json()["detectors"][n]["score"] == pytest.approx(
            expected[2]["detectors"][n]["score"], **TOL
        )
    r = _post_png(server["url"], _png(images[2]), query="?detectors=line")
    assert r.status_code == 200 and list(r.json()["detectors"]) == ["line"], r.text


def _in_threads(n: int, work: Any) -> list[Any]:
    """``work(k)`` for k in 0..n-1, each in its own thread, released together."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(k: int) -> None:
        barrier.wait(timeout=60)
        try:
            results[k] = work(k)
        except BaseException as err:  # reported below, in the test's thread
            results[k] = err

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[0]
    return results


def test_16_concurrent_clients_get_the_sequential_answers(
    server: dict, images: torch.Tensor
) -> None:
    pngs = [_png(x) for x in images]
    with requests.Session() as s:
        sequential = [_post_png(server["url"], p, s).json() for p in pngs]

    def client(k: int) -> list[tuple[int, dict]]:
        with requests.Session() as s:  # 3 images each: 48 requests in flight together
            return [(i, _post_png(server["url"], pngs[i], s).json()) for i in range(k, 48, 16)]

    for answers in _in_threads(16, client):
        for i, got in answers:
            _assert_same(got, sequential[i], server["ckpt"])


# -- bad requests -----------------------------------------------------------------------------
def _module_message(model: Any, x: torch.Tensor) -> str:
    with pytest.raises(ValueError) as err:
        model(x)
    return str(err.value)


def _bad_requests(model: Any, images: torch.Tensor) -> dict[str, tuple[dict, int, str]]:
    """name → (requests.post kwargs, status, the message the response carries)."""
    x = images[0]
    nan = (x.float() / 255).clone()
    nan[0, 3, 4] = math.nan
    big = x.float() / 255 * 2
    colour = torch.stack([x[0], x[0].flip(0), x[0].flip(1)])
    png32 = _png(np.zeros((32, 32), np.uint8))
    over = int(MAX_BODY_MB * 2**20) + 1
    as_json = {"headers": {"Content-Type": "application/json"}}
    return {
        "undecodable bytes": (
            {"data": b"\x89PNG not really", "headers": {"Content-Type": "image/png"}},
            400,
            "could not decode the image: not a PNG or JPEG file",
        ),
        "truncated png": (
            {"data": _png(x)[:120], "headers": {"Content-Type": "image/png"}},
            400,
            "could not decode the image",
        ),
        "invalid json": (
            {"data": b'{"image": [', **as_json},
            400,
            "request body is not valid JSON",
        ),
        "bad base64": ({"json": {"image": "not*base64"}}, 400, '"image" is not valid base64'),
        "missing image field": (
            {"json": {"img": x.tolist()}},
            400,
            'expected a JSON object {"image"',
        ),
        "ragged list": (
            {"json": {"image": [[[0] * 28] * 27 + [[0] * 5]]}},
            400,
            '"image" is not a rectangular nested list',
        ),
        "wrong size png": (
            {"data": png32, "headers": {"Content-Type": "image/png"}},
            422,
            _module_message(model, torch.zeros(1, 1, 32, 32, dtype=torch.uint8)),
        ),
        "wrong size list": (
            {"json": {"image": x[:, :, :27].tolist()}},
            422,
            _module_message(model, x[None, :, :, :27]),
        ),
        "wrong channels list": (
            {"json": {"image": x.expand(3, -1, -1).tolist()}},
            422,
            _module_message(model, x.expand(3, -1, -1)[None]),
        ),
        "colour png": (
            {"data": _png(colour), "headers": {"Content-Type": "image/png"}},
            422,
            _module_message(model, colour[None]),
        ),
        "nan in list": (
            {"data": json.dumps({"image": nan.tolist()}), **as_json},
            422,
            _module_message(model, nan[None]),
        ),
        "floats out of range": (
            {"json": {"image": big.tolist()}},
            422,
            _module_message(model, big[None]),
        ),
        "ints out of range": (
            {"json": {"image": (x.long() + 256).tolist()}},
            422,
            "integer pixel values must lie in 0..255",
        ),
        "oversized body": (
            {"data": b"\0" * over, "headers": {"Content-Type": "image/png"}},
            413,
            f"this server accepts at most {int(MAX_BODY_MB * 2**20)} bytes",
        ),
        "unknown detector": (
            {"json": {"image": x.tolist(), "detectors": ["energy", "fssd"]}},
            422,
            "unknown detector(s) ['fssd']: this server scores with "
            "['energy', 'msp', 'mahalanobis', 'line']",
        ),
        "unsupported content type": (
            {"data": _png(x), "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported Content-Type 'text/plain'",
        ),
    }


BAD_KINDS = [
    "undecodable bytes", "truncated png", "invalid json", "bad base64", "missing image field",
    "ragged list", "wrong size png", "wrong size list", "wrong channels list", "colour png",
    "nan in list", "floats out of range", "ints out of range", "oversized body",
    "unknown detector", "unsupported content type",
]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_request_gets_its_4xx_and_the_server_keeps_serving(
    kind: str, server: dict, model: Any, images: torch.Tensor, expected: list
) -> None:
    kwargs, status, message = _bad_requests(model, images)[kind]
    r = requests.post(f"{server['url']}/predict", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert detail.startswith(message) if status == 422 else message in detail, detail
    _check_good(server, images, expected, i=BAD_KINDS.index(kind))


def test_bad_requests_do_not_fail_the_good_ones_batched_with_them(
    server: dict, model: Any, images: torch.Tensor, expected: list
) -> None:
    bad = _bad_requests(model, images)
    kinds = ["nan in list", "wrong size png", "undecodable bytes", "unknown detector"] * 2

    def client(k: int) -> tuple[int, Any]:
        if k % 2:  # odd clients send a bad request, even ones a good image
            kwargs, status, _ = bad[kinds[k // 2]]
            return status, requests.post(f"{server['url']}/predict", timeout=60, **kwargs)
        return 200, _post_png(server["url"], _png(images[k]))

    for k, (status, r) in enumerate(_in_threads(16, client)):
        assert r.status_code == status, (k, r.text)
        if status == 200:
            _assert_same(r.json(), expected[k], server["ckpt"])


def test_unknown_detector_at_startup_is_refused_before_serving(lenet_fitted: dict) -> None:
    """``load``'s refusal is the command's last line; no server or worker is started."""
    from lightning_ood.serve import serve_main

    ckpt = str(lenet_fitted["ckpt"])
    with pytest.raises(ValueError) as err:
        lightning_ood.load(ckpt, detectors=["energy", "nope"])
    with pytest.raises(SystemExit) as stop:
        serve_main(["--ckpt_path", ckpt, "--detectors", "energy,nope", "--port", "1"])
    assert stop.value.code == f"lightning-ood serve: {err.value}"
