"""``lightning-ood serve``: the hand-off module behind an HTTP endpoint (LitServe).

The server is a thin adapter around the module the tests score (STYLE habit 13): each worker
loads ``lightning_ood.load(ckpt, detectors=..., allow_modules=...)`` once (:meth:`OODLitAPI.setup`),
then per request *decode → module → encode*:

- :meth:`OODLitAPI.decode_request` turns one request into one image tensor of the model's
  recorded input shape and runs the module's own input checks on it
  (:meth:`~lightning_ood.predictor.OODPredictor.check_input`), so a refusal carries the module's
  message;
- :meth:`OODLitAPI.predict` stacks the decoded images of a dynamic batch (LitServe's
  ``max_batch_size``/``batch_timeout``) and calls the module once (it scores in chunks);
- :meth:`OODLitAPI.encode_response` returns the predicted class, its softmax confidence, each
  detector's score, threshold and ``is_ood``, and the checkpoint's path and sha256.

Request forms on ``POST /predict`` (one image per request):

- a raw PNG or JPEG body (``Content-Type: image/png``, ``image/jpeg`` or
  ``application/octet-stream``);
- JSON ``{"image": "<base64 PNG/JPEG>"}`` (a ``data:image/png;base64,`` prefix is allowed);
- JSON ``{"image": [[[...]]]}``: a nested list in the model's input shape (C, H, W); floats in
  [0, 1], or integers 0..255 (a list whose numbers are all JSON integers is read as uint8).

JSON may add ``"detectors": ["energy", ...]`` (raw bodies: ``?detectors=energy,msp``) to answer
with a subset of the served detectors. Encoded images are never resized: a wrong size is
refused with the size the model takes. Channels are converted only without loss (a grayscale
image for an RGB model is replicated to three channels; an RGB image whose channels are equal
becomes grayscale; an alpha channel is dropped only when fully opaque); anything else is
refused.

Refusals are JSON ``{"detail": "<message>"}`` with a 4xx status: 400 malformed (undecodable
image, bad base64, invalid JSON, missing or unknown fields), 413 body over ``--max_body_mb``,
415 unsupported ``Content-Type``, 422 well-formed but not what the model takes (size, channels,
NaN/Inf, values out of range, unknown detector). A refused request does not affect the other
requests of its batch, and the server keeps serving.

``GET /health`` answers 200 once every worker has loaded the module; ``GET /info`` gives the
checkpoint's identity, metadata and detector thresholds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import torch
from torch import Tensor

try:
    import litserve as ls
    from fastapi.responses import JSONResponse
except ImportError as _err:  # pragma: no cover - the optional extra is missing
    raise ImportError(
        "`lightning-ood serve` needs LitServe: pip install 'lightning_ood[serve]' "
        f"(or pip install litserve) ({_err})"
    ) from _err

from lightning_ood.predictor import OODPredictor, load

__all__ = [
    "OODLitAPI",
    "RequestBody",
    "build_server",
    "decode_image_bytes",
    "decode_nested_list",
    "serve_main",
    "sha256_file",
]

#: Default most bytes of one request body.
DEFAULT_MAX_BODY_MB = 4.0
#: Content types read as an encoded image / as JSON.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "application/octet-stream")
JSON_TYPES = ("application/json",)
#: The fields a JSON request may carry.
JSON_FIELDS = ("image", "detectors")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (the checkpoint's identity in every response)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_safe(value: Any) -> Any:
    """``value`` as plain JSON (tuples → lists, tensors → lists, other objects → str)."""
    return json.loads(
        json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


# -- refusals ---------------------------------------------------------------------------------
class Refused(Exception):
    """A request the server will not score: its HTTP status and the message for the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Refusal:
    """What :meth:`OODLitAPI.decode_request` returns for a refused request.

    LitServe's batched loop answers *every* request of a batch with the error when
    ``decode_request`` raises, so a bad request would fail the good ones batched with it.
    The refusal travels through the batch instead, and :meth:`OODLitAPI.encode_response`
    turns it into this request's 4xx response alone.
    """

    status: int
    detail: str


@dataclass(frozen=True)
class Decoded:
    """One request's image (the model's input shape; uint8 or float) and detector subset."""

    image: Tensor
    detectors: tuple[str, ...] | None


# -- the transport: every /predict body reaches decode_request ------------------------------
class RequestBody:
    """ASGI middleware: hands each ``POST <path>`` body to ``decode_request`` as JSON.

    LitServe reads a request body with ``request.json()``, so a raw PNG body, or malformed
    JSON, would end as its generic 500. This middleware reads the body (refusing one over
    ``max_bytes`` with 413 before reading it, from ``Content-Length`` when given) and forwards
    ``{"content_type", "body" (base64), "query"}``, which :meth:`OODLitAPI.decode_request`
    parses, so every malformed request gets its own 4xx message.
    """

    def __init__(self, app: Any, *, path: str, max_bytes: int) -> None:
        self.app = app
        self.path = path
        self.max_bytes = int(max_bytes)

    def _too_large(self, size: int | None) -> JSONResponse:
        got = f"{size} bytes" if size is not None else "more"
        return JSONResponse(
            status_code=413,
            content={
                "detail": f"request body too large: {got}; this server accepts at most "
                f"{self.max_bytes} bytes per request (--max_body_mb). Send one image per "
                "request, as PNG/JPEG bytes or JSON."
            },
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(int(declared))(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(None)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        payload = json.dumps(
            {
                "content_type": headers.get(b"content-type", b"").decode("latin-1"),
                "body": base64.b64encode(b"".join(chunks)).decode("ascii"),
                "query": scope.get("query_string", b"").decode("latin-1"),
            }
        ).encode()
        new_headers = [
            (k, v)
            for k, v in scope.get("headers", [])
            if k.lower() not in (b"content-type", b"content-length")
        ]
        new_headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": new_headers}, replay, send)


# -- decoding ---------------------------------------------------------------------------------
def _model_error(model: OODPredictor, batch: Tensor) -> str | None:
    """The module's own refusal of a one-image batch, or None when it would score it."""
    try:
        model.check_input(batch)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def _shape_refusal(model: OODPredictor, shape: tuple[int, ...], hint: str = "") -> Refused:
    """422 with the module's message for an image of ``shape`` (C, H, W); nothing allocated."""
    probe = torch.zeros((), dtype=torch.uint8).expand(1, *shape)
    message = _model_error(model, probe) or f"image has shape {tuple(shape)}"
    return Refused(422, message + hint)


def _opaque(alpha: np.ndarray) -> bool:
    return bool((alpha == 255).all())


def decode_image_bytes(model: OODPredictor, data: bytes) -> Tensor:
    """PNG/JPEG bytes → a uint8 (C, H, W) tensor of the model's input shape, or :class:`Refused`.

    The size comes from the file's header and is checked before any pixel is decoded; channels
    are converted only where no information is lost (see the module docstring).
    """
    from PIL import Image, UnidentifiedImageError

    if not model.normalizes:
        raise Refused(422, "this model takes token ids (a JSON list of integers), not images")
    want_c, want_h, want_w = model.input_shape
    try:
        img = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
    except UnidentifiedImageError:
        raise Refused(400, "could not decode the image: not a PNG or JPEG file") from None
    except Image.DecompressionBombError as err:
        raise Refused(422, f"image refused: {err}") from None
    except (OSError, ValueError) as err:
        raise Refused(400, f"could not decode the image: not a PNG or JPEG file ({err})") from None
    w, h = img.size
    if (h, w) != (want_h, want_w):
        channels = 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
        raise _shape_refusal(
            model,
            (channels, h, w),
            f" The image is {w}x{h} pixels (width x height); this server does not resize.",
        )
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise Refused(400, f"could not decode the image: corrupt or truncated ({err})") from None
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode == "PA":
        img = img.convert("RGBA")
    mode = img.mode
    if mode not in ("L", "LA", "RGB", "RGBA"):
        raise Refused(
            422,
            f"image mode {mode!r} is not accepted: send an 8-bit grayscale or RGB PNG/JPEG "
            "(16-bit, float and CMYK images are not converted here, as the conversion would "
            "change the pixel values the model sees)",
        )
    arr = np.asarray(img)
    if mode in ("LA", "RGBA"):
        if not _opaque(arr[..., -1]):
            raise Refused(
                422,
                "image has transparent pixels (an alpha channel below 255); flatten it onto the "
                "background you intend (e.g. PIL Image.alpha_composite) and send it without alpha",
            )
        arr = arr[..., :-1]
    x = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True))
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
    if x.shape[0] == 3 and want_c == 1:
        if not (torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])):
            raise _shape_refusal(
                model,
                tuple(x.shape),
                " The image is in colour; this model takes grayscale images, and a colour "
                "image is not converted here (choose the conversion yourself).",
            )
        x = x[:1]
    elif x.shape[0] == 1 and want_c == 3:
        x = x.expand(3, -1, -1)
    return x.contiguous()


def decode_nested_list(model: OODPredictor, value: Any) -> Tensor:
    """A JSON nested list → a tensor in the model's input shape, or :class:`Refused`.

    All JSON integers → uint8 0..255 (token ids for token models); any float → float32 in
    [0, 1]. Shape, NaN/Inf and range are the module's checks.
    """
    try:
        x = torch.tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise Refused(400, f'"image" is not a rectangular nested list of numbers ({err})') from None
    if x.dtype == torch.bool:
        raise Refused(422, '"image" holds booleans; send numbers (floats in [0, 1] or ints 0..255)')
    if not x.is_floating_point() and model.normalizes:
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > 255):
            raise Refused(
                422,
                f"integer pixel values must lie in 0..255 (uint8); got min {int(x.min())}, max "
                f"{int(x.max())}. Send integers 0..255 or floats in [0, 1].",
            )
        x = x.to(torch.uint8)
    elif x.is_floating_point():
        x = x.float()
    return x


def _names(value: Any, where: str) -> tuple[str, ...]:
    """Detector names from a list of strings or a comma-separated string."""
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",") if n.strip()]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = [n.strip() for n in value]
    else:
        raise Refused(400, f"{where} must be a list of detector names or a comma-separated string")
    if not names:
        raise Refused(400, f"{where} names no detector")
    return tuple(dict.fromkeys(names))


# -- the LitAPI -------------------------------------------------------------------------------
class OODLitAPI(ls.LitAPI):
    """LitServe API of :func:`lightning_ood.load`: decode one image → the module → encode.

    Args:
        ckpt_path: a fitted lightning-ood checkpoint.
        detectors: detectors to serve (default: every fitted, calibrated one, as ``load``).
        allow_modules: import paths a ``wrap`` checkpoint may name (see ``load``).
        sha256: the checkpoint's expected sha256 (computed once by the launcher); a worker whose
            file hashes differently refuses to start, so every response names the file scored.
        max_batch_size / batch_timeout: LitServe's dynamic batching.
    """

    def __init__(
        self,
        ckpt_path: str | os.PathLike[str],
        detectors: Sequence[str] | None = None,
        allow_modules: Sequence[str] = (),
        sha256: str | None = None,
        max_batch_size: int = 16,
        batch_timeout: float = 0.01,
        api_path: str = "/predict",
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path
        )
        self.ckpt_path = str(ckpt_path)
        self.detectors = list(detectors) if detectors is not None else None
        self.allow_modules = list(allow_modules)
        self.sha256 = sha256
        self.model: OODPredictor | None = None
        self.checkpoint: dict[str, str] = {}

    # -- setup -----------------------------------------------------------------------------
    def setup(self, device: str) -> None:
        digest = sha256_file(self.ckpt_path)
        if self.sha256 is not None and digest != self.sha256:
            raise RuntimeError(
                f"checkpoint {self.ckpt_path!r} changed on disk since the server started "
                f"(sha256 {digest}, expected {self.sha256}); restart the server"
            )
        with warnings.catch_warnings():  # the launcher already reported left-out detectors
            warnings.simplefilter("ignore", UserWarning)
            self.model = load(
                self.ckpt_path,
                detectors=self.detectors,
                map_location=device,
                allow_modules=self.allow_modules,
            )
        self.checkpoint = {"path": self.ckpt_path, "sha256": digest}

    # -- decode ----------------------------------------------------------------------------
    # `request` and encode_response's return stay unannotated: LitServe builds its FastAPI
    # route from these annotations (none = the raw request, read as JSON; a plain response).
    def decode_request(self, request) -> Decoded | Refusal:  # type: ignore[no-untyped-def]
        try:
            return self._decode(request)
        except Refused as r:
            return Refusal(r.status, r.detail)

    def _decode(self, request: Any) -> Decoded:
        model = self.model
        assert model is not None, "setup() has not run"
        if not isinstance(request, dict) or not {"content_type", "body"} <= request.keys():
            raise Refused(400, "request did not come through the server's body middleware")
        content_type = str(request["content_type"]).split(";")[0].strip().lower()
        body = base64.b64decode(request["body"])
        query = parse_qs(str(request.get("query") or ""))
        detectors = (
            _names(",".join(query["detectors"]), "?detectors") if "detectors" in query else None
        )
        if content_type in IMAGE_TYPES:
            x = decode_image_bytes(model, body)
        elif content_type in JSON_TYPES or content_type.endswith("+json"):
            x, from_json = self._decode_json(model, body)
            if from_json is not None:
                if detectors is not None:
                    raise Refused(
                        400, 'give the detectors either as "detectors" or ?detectors, not both'
                    )
                detectors = from_json
        else:
            shown = content_type or "none"
            raise Refused(
                415,
                f"unsupported Content-Type {shown!r}: send one image as image/png or image/jpeg "
                'bytes, or application/json {"image": "<base64 PNG/JPEG>"} or {"image": '
                f"<nested list of shape {list(model.input_shape)}>}}",
            )
        error = _model_error(model, x.unsqueeze(0))
        if error is not None:
            raise Refused(422, error)
        if detectors is not None:
            unknown = [n for n in detectors if n not in model.detector_names]
            if unknown:
                raise Refused(
                    422,
                    f"unknown detector(s) {unknown}: this server scores with "
                    f"{model.detector_names} (checkpoint {self.ckpt_path!r}); start it with "
                    "--detectors to serve other fitted detectors of the checkpoint",
                )
        return Decoded(x, detectors)

    def _decode_json(
        self, model: OODPredictor, body: bytes
    ) -> tuple[Tensor, tuple[str, ...] | None]:
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, ValueError) as err:
            raise Refused(400, f"request body is not valid JSON ({err})") from None
        if not isinstance(obj, dict) or "image" not in obj:
            raise Refused(
                400,
                'expected a JSON object {"image": ...} with the image as a base64 PNG/JPEG '
                f"string or a nested list of shape {list(model.input_shape)}",
            )
        extra = sorted(set(obj) - set(JSON_FIELDS))
        if extra:
            raise Refused(400, f"unknown field(s) {extra}; a request takes {list(JSON_FIELDS)}")
        detectors = _names(obj["detectors"], '"detectors"') if "detectors" in obj else None
        image = obj["image"]
        if isinstance(image, str):
            text = image.strip()
            if text.startswith("data:"):
                text = text.split(",", 1)[-1]
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as err:
                raise Refused(400, f'"image" is not valid base64 ({err})') from None
            return decode_image_bytes(model, data), detectors
        if isinstance(image, list):
            return decode_nested_list(model, image), detectors
        raise Refused(
            400,
            f'"image" must be a base64 PNG/JPEG string or a nested list of shape '
            f"{list(model.input_shape)}, got {type(image).__name__}",
        )

    # -- predict ---------------------------------------------------------------------------
    def batch(self, inputs: list[Decoded | Refusal]) -> list[Decoded | Refusal]:
        return list(inputs)  # stacked in predict, around the refusals

    def unbatch(self, output: list[Any]) -> list[Any]:
        return list(output)

    def predict(self, x: Any) -> Any:
        items = x if isinstance(x, list) else [x]
        out = self._predict(items)
        return out if isinstance(x, list) else out[0]

    def _predict(self, items: list[Decoded | Refusal]) -> list[dict[str, Any] | Refusal]:
        model = self.model
        assert model is not None, "setup() has not run"
        results: list[dict[str, Any] | Refusal] = list(items)  # refusals stay in place
        ok = [i for i, item in enumerate(items) if isinstance(item, Decoded)]
        # one module call per input dtype (uint8 and float requests in one batch: two calls)
        for dtype in dict.fromkeys(items[i].image.dtype for i in ok):
            rows = [i for i in ok if items[i].image.dtype == dtype]
            batch = torch.stack([items[i].image for i in rows]).to(model.mean.device)
            out = model(batch)
            conf = torch.softmax(out["logits"].float(), dim=-1).amax(dim=-1).cpu().tolist()
            pred = out["pred"].cpu().tolist()
            scores = {n: s.float().cpu().tolist() for n, s in out["scores"].items()}
            flags = {n: f.cpu().tolist() for n, f in out["is_ood"].items()}
            for j, i in enumerate(rows):
                wanted = items[i].detectors or tuple(model.detector_names)
                results[i] = {
                    "pred": int(pred[j]),
                    "class_name": model.class_names[pred[j]]
                    if pred[j] < len(model.class_names)
                    else None,
                    "confidence": float(conf[j]),
                    "detectors": {
                        n: {
                            "score": float(scores[n][j]),
                            "threshold": model.thresholds[n],
                            "is_ood": bool(flags[n][j]),
                        }
                        for n in wanted
                    },
                    "checkpoint": dict(self.checkpoint),
                }
        return results

    # -- encode ----------------------------------------------------------------------------
    def encode_response(self, output: dict[str, Any] | Refusal):  # type: ignore[no-untyped-def]
        if isinstance(output, Refusal):
            return JSONResponse(status_code=output.status, content={"detail": output.detail})
        return output


# -- launching --------------------------------------------------------------------------------
def describe(model: OODPredictor, ckpt_path: str, digest: str) -> dict[str, Any]:
    """What ``GET /info`` reports under ``model``: the checkpoint, its data, the detectors."""
    info: dict[str, Any] = {
        "checkpoint": {"path": ckpt_path, "sha256": digest},
        "input_shape": list(model.input_shape),
        "class_names": list(model.class_names),
        "detectors": {n: {"threshold": t} for n, t in model.thresholds.items()},
        "meta": _json_safe(model.meta),
        "request_forms": [
            "raw image/png or image/jpeg body",
            '{"image": "<base64 PNG/JPEG>"}',
            '{"image": <nested list of shape C x H x W: floats in [0, 1] or ints 0..255>}',
        ],
    }
    card = getattr(model, "card", None)
    if card is not None:
        info["card"] = _json_safe(card)
    return info


def build_server(
    ckpt_path: str | os.PathLike[str],
    detectors: Sequence[str] | None = None,
    allow_modules: Sequence[str] = (),
    max_batch_size: int = 16,
    batch_timeout: float = 0.01,
    workers_per_device: int = 1,
    accelerator: str = "auto",
    devices: int | str = "auto",
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    timeout: float = 30.0,
) -> ls.LitServer:
    """A :class:`litserve.LitServer` of the checkpoint (not started: call ``.run(...)``).

    The checkpoint is loaded here once, so that a missing file, an unknown detector or an
    untrusted module is refused before any worker starts, with ``load``'s message.
    """
    if max_body_mb <= 0:
        raise ValueError(f"--max_body_mb must be > 0, got {max_body_mb}")
    ckpt_path = str(ckpt_path)
    digest = sha256_file(ckpt_path)
    model = load(ckpt_path, detectors=detectors, allow_modules=allow_modules)
    info = describe(model, ckpt_path, digest)
    served = model.detector_names
    del model
    api = OODLitAPI(
        ckpt_path,
        detectors=served,
        allow_modules=allow_modules,
        sha256=digest,
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout,
    )
    return ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers_per_device,
        timeout=timeout,
        model_metadata=info,
        middlewares=[(RequestBody, {"path": api.api_path, "max_bytes": int(max_body_mb * 2**20)})],
    )


def _parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(
        prog="lightning-ood serve",
        description="Serve a fitted checkpoint over HTTP (LitServe): POST /predict with one "
        'image (raw PNG/JPEG body, or JSON {"image": base64 or nested list}); GET /health, '
        "GET /info. Every option can come from a YAML --config.",
        default_env=False,
    )
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with these options")
    p.add_argument("--ckpt_path", type=str, required=True, help="fitted lightning-ood checkpoint")
    p.add_argument(
        "--detectors",
        type=list[str] | str | None,
        default=None,
        help="detectors to serve, e.g. energy,fssd (default: every fitted, calibrated one)",
    )
    p.add_argument(
        "--allow_modules",
        type=list[str] | str,
        default=[],
        help="import paths a `wrap` checkpoint may name (comma-separated or a list)",
    )
    p.add_argument("--host", type=str, default="127.0.0.1", help="127.0.0.1, 0.0.0.0 or ::")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max_batch_size",
        type=int,
        default=16,
        help="dynamic batching: most requests per module call",
    )
    p.add_argument(
        "--batch_timeout",
        type=float,
        default=0.01,
        help="dynamic batching: seconds to wait for a batch to fill",
    )
    p.add_argument("--workers_per_device", type=int, default=1)
    p.add_argument("--accelerator", type=str, default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--devices", type=int | str, default="auto")
    p.add_argument(
        "--max_body_mb",
        type=float,
        default=DEFAULT_MAX_BODY_MB,
        help="largest request body (MiB); larger ones get 413",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a request may wait for a worker (then 504)",
    )
    p.add_argument("--log_level", type=str, default="info")
    return p


def _split(value: Sequence[str] | str | None) -> list[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s.strip()]


_MAIN_PID = os.getpid()


def stop_server(proc: Any) -> None:
    """Stop a ``lightning-ood serve`` started as ``subprocess.Popen(...,
    start_new_session=True)``: SIGTERM its process group (launcher and LitServe workers), then
    SIGKILL whatever is left (workers of a launcher that died first). Tests and benchmarks use
    it so no worker outlives them."""
    import contextlib
    import subprocess

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM in the launcher → KeyboardInterrupt, on which ``LitServer.run`` stops its
    workers (the default action would leave them running). Processes forked from the launcher
    (LitServe's HTTP servers) inherit this handler and get the default action back."""
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt


def serve_main(args: Sequence[str] | None = None) -> None:
    """``lightning-ood serve``: parse the options (flags or ``--config``), build, run."""
    cfg = _parser().parse_args(list(args) if args is not None else sys.argv[1:])
    if not (math.isfinite(cfg.batch_timeout) and cfg.batch_timeout >= 0):
        raise SystemExit(
            f"lightning-ood serve: --batch_timeout must be >= 0, got {cfg.batch_timeout}"
        )
    detectors = _split(cfg.detectors)
    try:
        server = build_server(
            cfg.ckpt_path,
            detectors=detectors or None,
            allow_modules=_split(cfg.allow_modules) or [],
            max_batch_size=cfg.max_batch_size,
            batch_timeout=cfg.batch_timeout,
            workers_per_device=cfg.workers_per_device,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            max_body_mb=cfg.max_body_mb,
            timeout=cfg.timeout,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise SystemExit(f"lightning-ood serve: {err}") from None
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    print(
        f"[lightning_ood] serving {cfg.ckpt_path} on http://{cfg.host}:{cfg.port}/predict "
        "(GET /health, GET /info)",
        flush=True,
    )
    try:
        server.run(
            host=cfg.host, port=cfg.port, log_level=cfg.log_level, generate_client_file=False
        )
    except ValueError as err:  # LitServer's refusals of host/port
        raise SystemExit(f"lightning-ood serve: {err}") from None


if __name__ == "__main__":
    serve_main()
