"""Common image corruptions (Hendrycks & Dietterich, ICLR 2019, "ImageNet-C"), seeded.

A numpy/scipy/PIL port, written for this project, of the corruptions of the CIFAR-10-C
generator (``ImageNet-C/create_c/make_cifar_c.py`` in hendrycks/robustness) with its severity
constants (:data:`SEVERITY_PARAMS`). The maintained package ``imagecorruptions`` (1.1.2) was
tried and is not used: it refuses images under 32 px (FashionMNIST is 28x28), turns grayscale
into RGB, uses only the ImageNet-C (224 px) constants, does not import with setuptools >= 81
(``pkg_resources``) and three of its corruptions fail on numpy 2 / scikit-image 0.26.

Conventions:

- **Constants**: the CIFAR-10-C table for every image size, 28x28 grayscale included (the
  ImageNet-C table is tuned for 224 px and would erase a 28 px image); size-dependent steps
  (elastic, pixelate, glass-blur sweep, fog map) scale with the actual height and width.
- **Pixels**: uint8 in, uint8 out, same shape; the work is on ``x / 255`` in float64 and the
  result is ``uint8(clip(y, 0, 1) * 255)`` (truncation, as the reference's ``np.uint8``).
  Corrupt before normalisation: :class:`Corrupted` does it on the reader's PIL images.
- **Grayscale** (one channel) is corrupted as one channel (noise is drawn per pixel, not per
  replicated channel); ``saturate`` alone works on the replicated RGB image and returns its
  ITU-R 601 luma (a gray pixel has no saturation, only the additive term tints it).
- **Seeding**: every random draw comes from ``numpy.random.default_rng`` seeded with
  ``(seed, crc32(stream), index)`` (:func:`sample_rng`), never the global RNG, so DataLoader
  workers, re-runs and ``every``-subsets give the same image for the same sample.
- **Severity 0** is the identity. Not ported: ``frost`` (needs the reference's frost photos)
  and ``spatter`` (needs OpenCV's Canny edges and distance transform). ``motion_blur`` (and the
  streaks of ``snow``) approximate ImageMagick's one-sided motion blur, which the reference
  called through Wand, with a Gaussian-weighted line kernel; the others follow the reference's
  formulas, with scipy in place of OpenCV/scikit-image (the same border modes).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

from lightning_ood.data.transforms import ChannelAdapter, FitSize
from lightning_ood.splits import seeded_parts

Array = np.ndarray
#: ``fn(x, param, rng)``: x is float64 (H, W, C) in [0, 1]; returns float (H, W, C).
CorruptionFn = Callable[[Array, Any, np.random.Generator], Array]

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: The 15 ImageNet-C benchmark corruptions, in the paper's order.
IMAGENET_C_COMMON: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
#: The 4 extra ("validation") corruptions of ImageNet-C.
IMAGENET_C_EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
#: Corruptions of the two tables that are not ported, with the reason (see the module doc).
NOT_PORTED: dict[str, str] = {
    "frost": "needs the reference's frost photographs",
    "spatter": "needs OpenCV's Canny edges and distance transform",
}

#: Severity 1..5 parameters: the CIFAR-10-C table of ``make_cifar_c.py`` (hendrycks/robustness).
#: ``elastic_transform`` is in units of the image side (the reference multiplies by 32).
SEVERITY_PARAMS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    # (sigma, max shift, iterations)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    # (disk radius, alias blur sigma)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    # (radius, sigma) of the motion kernel
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    # stop of the zoom factors np.arange(1, stop, 0.01), as the reference (float rounding
    # makes them 7, 12, 16, 21, 26 factors)
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),
    # (loc, scale, zoom, threshold, blur radius, blur sigma, image weight)
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    # (fog strength, plasma wibble decay)
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # (saturation factor, saturation offset)
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    # (displacement scale, displacement smoothing sigma, affine jitter), x the image side
    "elastic_transform": (
        (0.0, 0.0, 0.08),
        (0.05, 0.2, 0.07),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.05),
        (0.1, 0.03, 0.03),
    ),
}

_LUMA = np.array([0.299, 0.587, 0.114])


# -- helpers ------------------------------------------------------------------------------------
def _to_uint8(y: Array) -> Array:
    return (np.clip(y, 0.0, 1.0) * 255).astype(np.uint8)


def _pil(x: Array) -> Image.Image:
    """Float (H, W, C) in [0, 1] that came from uint8 -> the PIL image it came from."""
    arr = np.round(x * 255).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def _from_pil(img: Image.Image) -> Array:
    arr = np.asarray(img, dtype=np.float64) / 255
    return arr[..., None] if arr.ndim == 2 else arr


def _gaussian(x: Array, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> Array:
    """Per-channel Gaussian blur, as ``skimage.filters.gaussian`` (mode nearest, truncate 4)."""
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode=mode, truncate=truncate)


def _clipped_zoom(x: Array, factor: float) -> Array:
    """Zoom the centre by ``factor`` (bilinear) and crop back to the input's size."""
    h, w = x.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    zoomed = ndimage.zoom(x[top : top + ch, left : left + cw], (factor, factor, 1), order=1)
    th, tw = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[th : th + h, tw : tw + w]


def _motion_blur(x: Array, radius: int, sigma: float, angle: float) -> Array:
    """One-sided motion blur along ``angle`` (degrees): a Gaussian-weighted line kernel of
    ``2 * radius + 1`` taps starting at the pixel, edges replicated (ImageMagick's
    ``MotionBlurImage`` with its offsets rounded to whole pixels)."""
    taps = np.arange(2 * int(radius) + 1)
    weights = np.exp(-(taps**2) / (2 * sigma**2))
    weights /= weights.sum()
    rad = np.deg2rad(angle)
    dx = np.round(taps * np.cos(rad)).astype(int)
    dy = np.round(taps * np.sin(rad)).astype(int)
    pad = int(np.abs(np.concatenate([dx, dy])).max())
    h, w = x.shape[:2]
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.zeros_like(x)
    for wt, ox, oy in zip(weights, dx, dy, strict=True):
        out += wt * padded[pad + oy : pad + oy + h, pad + ox : pad + ox + w]
    return out


def _plasma(size: int, decay: float, rng: np.random.Generator) -> Array:
    """Diamond-square height map of side ``size`` (a power of two), scaled to [0, 1]; the
    fog layer of ImageNet-C (random offsets start at +-100^2 and shrink by ``decay``)."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def jitter(avg: Array) -> Array:
        return avg / 4 + wibble * rng.uniform(-wibble, wibble, avg.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        grid[half:size:step, half:size:step] = jitter(square)
        centres = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        down = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0:size:step, half:size:step] = jitter(down)
        right = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half:size:step, 0:size:step] = jitter(right)
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def _gray(x: Array) -> Array:
    return x if x.shape[2] == 1 else (x @ _LUMA)[..., None]


# -- the corruptions ----------------------------------------------------------------------------
def gaussian_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    """Additive N(0, c^2) noise per pixel and channel."""
    return x + rng.normal(scale=c, size=x.shape)


def shot_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    """Poisson photon noise: Poisson(c * x) / c."""
    return rng.poisson(x * c) / c


def impulse_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    """Salt-and-pepper: each value is replaced with probability c, by 1 or 0 with equal odds
    (``skimage.util.random_noise(mode="s&p", amount=c)``)."""
    flip = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    return np.where(flip, salt.astype(np.float64), x)


def speckle_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    """Multiplicative noise: x + x * N(0, c^2)."""
    return x + x * rng.normal(scale=c, size=x.shape)


def gaussian_blur(x: Array, c: float, rng: np.random.Generator) -> Array:
    """Gaussian blur of standard deviation c pixels."""
    return _gaussian(x, c)


def glass_blur(x: Array, c: tuple[float, int, int], rng: np.random.Generator) -> Array:
    """Blur, locally shuffle pixels (each swapped with a neighbour up to c[1] away, sweeping
    from the bottom-right, c[2] times), blur again. A true swap: the reference's tuple swap
    of numpy views copies the neighbour over the pixel for RGB images instead."""
    sigma, delta, iterations = c
    img = np.floor(np.clip(_gaussian(x, sigma), 0, 1) * 255)  # the reference's uint8 step
    h, w = img.shape[:2]
    rows, cols = range(h - delta, delta, -1), range(w - delta, delta, -1)
    shifts = rng.integers(-delta, delta, size=(iterations, len(rows), len(cols), 2))
    for it in range(iterations):
        for i, r in enumerate(rows):
            for j, col in enumerate(cols):
                dx, dy = shifts[it, i, j]
                r2, c2 = r + dy, col + dx
                img[[r, r2], [col, c2]] = img[[r2, r], [c2, col]]
    return _gaussian(img / 255, sigma)


def defocus_blur(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    """Convolution with an anti-aliased disk of radius c[0] (a 17x17 disk smoothed by a 3x3
    Gaussian of sigma c[1]; borders mirrored, as OpenCV's default)."""
    radius, alias = c
    half = 8 if radius <= 8 else int(np.ceil(radius))
    grid = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.arange(-1, 2) if half == 8 else np.arange(-2, 3)
    g = np.exp(-(taps**2) / (2 * alias**2))
    g /= g.sum()
    kernel = ndimage.correlate(disk, np.outer(g, g), mode="mirror")
    return np.stack(
        [ndimage.correlate(x[..., k], kernel, mode="mirror") for k in range(x.shape[2])], -1
    )


def motion_blur(x: Array, c: tuple[int, float], rng: np.random.Generator) -> Array:
    """Motion blur of radius c[0], sigma c[1], at an angle drawn from U(-45, 45) degrees."""
    return _motion_blur(x, c[0], c[1], rng.uniform(-45, 45))


def zoom_blur(x: Array, c: float, rng: np.random.Generator) -> Array:
    """Mean of the image and its centre zooms by ``np.arange(1, c, 0.01)``."""
    factors = np.arange(1, c, 0.01)
    total = x.copy()
    for f in factors:
        total += _clipped_zoom(x, float(f))
    return total / (len(factors) + 1)


def snow(x: Array, c: tuple[float, ...], rng: np.random.Generator) -> Array:
    """Snowflakes: a thresholded, zoomed noise layer streaked by motion blur (angle drawn
    from U(-135, -45)), added twice (once rotated 180 degrees) to a whitened image."""
    loc, scale, zoom, threshold, radius, sigma, keep = c
    h, w = x.shape[:2]
    layer = rng.normal(loc=loc, scale=scale, size=(h, w, 1))
    layer = _clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = np.floor(np.clip(layer, 0, 1) * 255) / 255  # the reference's 8-bit layer
    layer = _motion_blur(layer, radius, sigma, rng.uniform(-135, -45))
    whitened = keep * x + (1 - keep) * np.maximum(x, _gray(x) * 1.5 + 0.5)
    return whitened + layer + np.rot90(layer, k=2)


def fog(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    """Add a plasma-fractal haze of strength c[0] and renormalise by the image's maximum."""
    strength, decay = c
    h, w = x.shape[:2]
    size = 1 << int(np.ceil(np.log2(max(h, w, 2))))
    top = x.max()
    hazy = x + strength * _plasma(size, decay, rng)[:h, :w, None]
    return hazy * top / (top + strength)


def brightness(x: Array, c: float, rng: np.random.Generator) -> Array:
    """Add c to the HSV value: hue and saturation kept, i.e. every channel scaled by
    clip(V + c, 0, 1) / V (a black pixel becomes gray c)."""
    v = x.max(axis=2, keepdims=True)
    new_v = np.clip(v + c, 0, 1)
    return np.where(v > 0, x * new_v / np.where(v > 0, v, 1), new_v)


def contrast(x: Array, c: float, rng: np.random.Generator) -> Array:
    """Shrink each channel towards its mean by the factor c."""
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * c + mean


def saturate(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    """HSV saturation S -> clip(c[0] * S + c[1], 0, 1), hue and value kept (closed form of
    rgb -> hsv -> rgb; a gray pixel has hue 0, red). Grayscale: on the replicated RGB image,
    returning its luma."""
    rgb = np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x
    v = rgb.max(axis=2, keepdims=True)
    s = np.where(v > 0, (v - rgb.min(axis=2, keepdims=True)) / np.where(v > 0, v, 1), 0)
    s_new = np.clip(s * c[0] + c[1], 0, 1)
    scaled = v - s_new / np.where(s > 0, s, 1) * (v - rgb)
    red = np.concatenate([v, v * (1 - s_new), v * (1 - s_new)], axis=2)
    out = np.where(s > 0, scaled, red)
    return _gray(out) if x.shape[2] == 1 else out


def jpeg_compression(x: Array, c: int, rng: np.random.Generator) -> Array:
    """Re-encode as JPEG (PIL/libjpeg) at quality c."""
    buf = io.BytesIO()
    _pil(x).save(buf, format="JPEG", quality=int(c))
    buf.seek(0)
    with Image.open(buf) as img:
        return _from_pil(img.convert("L" if x.shape[2] == 1 else "RGB"))


def pixelate(x: Array, c: float, rng: np.random.Generator) -> Array:
    """Box-downsample to int(c * side) and box-upsample back (PIL ``BOX``)."""
    h, w = x.shape[:2]
    img = _pil(x).resize((int(w * c), int(h * c)), Image.Resampling.BOX)
    return _from_pil(img.resize((w, h), Image.Resampling.BOX))


def elastic_transform(x: Array, c: tuple[float, float, float], rng: np.random.Generator) -> Array:
    """Random affine warp (three anchor points jittered by U(-c[2], c[2]) x side), then a
    smooth random displacement field (U(-1, 1), Gaussian-smoothed with sigma c[1] x side,
    scaled by c[0] x side); bilinear, borders reflected."""
    h, w = x.shape[:2]
    side = min(h, w)
    alpha, sigma, jitter = (v * side for v in c)
    centre = np.array([w, h], dtype=np.float64) // 2  # (x, y) as OpenCV
    sq = side // 3
    src = np.array([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
    dst = src + rng.uniform(-jitter, jitter, size=src.shape)
    # Affine map src -> dst in (x, y); the warp samples the input at its inverse.
    fwd = np.linalg.solve(np.c_[src, np.ones(3)], dst).T  # 2x3: dst = fwd @ [x, y, 1]
    inv = np.linalg.inv(np.vstack([fwd, [0, 0, 1]]))[:2]
    matrix = inv[::-1, 1::-1]  # (row, col) order
    offset = inv[::-1, 2]
    warped = np.stack(
        [
            ndimage.affine_transform(x[..., k], matrix, offset, order=1, mode="mirror")
            for k in range(x.shape[2])
        ],
        -1,
    )
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3)
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([rows + dy * alpha, cols + dx * alpha])
    return np.stack(
        [
            ndimage.map_coordinates(warped[..., k], coords, order=1, mode="reflect")
            for k in range(x.shape[2])
        ],
        -1,
    )


#: name -> corruption function; every name has its 5 parameters in :data:`SEVERITY_PARAMS`.
CORRUPTIONS: dict[str, CorruptionFn] = {
    fn.__name__: fn
    for fn in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        defocus_blur,
        glass_blur,
        motion_blur,
        zoom_blur,
        snow,
        fog,
        brightness,
        contrast,
        elastic_transform,
        pixelate,
        jpeg_compression,
        speckle_noise,
        gaussian_blur,
        saturate,
    )
}
#: Names ``corruption:`` groups expand to (``all`` = every ported corruption).
CORRUPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(CORRUPTIONS),
    "common": tuple(n for n in IMAGENET_C_COMMON if n in CORRUPTIONS),
    "extra": tuple(n for n in IMAGENET_C_EXTRA if n in CORRUPTIONS),
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
}


# -- validation and expansion ---------------------------------------------------------------
def check_corruption(name: object, severity: object, where: str = "corruption") -> None:
    """Raise a ValueError listing the valid values unless ``name`` is a ported corruption and
    ``severity`` an integer in 0..5 (0 = no corruption)."""
    if not isinstance(name, str) or name not in CORRUPTIONS:
        hint = f" ({name} is not ported: {NOT_PORTED[name]})" if name in NOT_PORTED else ""
        raise ValueError(
            f"{where}: unknown corruption {name!r}{hint}; valid: {', '.join(CORRUPTIONS)}"
        )
    if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= 5:
        raise ValueError(
            f"{where}: severity must be an integer in 1..5 (0 = none), got {severity!r}"
        )


def expand_corruptions(corruption: object, severity: object) -> list[tuple[str, int]]:
    """``(name, severity)`` pairs of a spec: ``corruption`` is a name, a group
    (:data:`CORRUPTION_GROUPS`: all, common, extra, noise) or a list of names; ``severity`` an
    integer, ``all`` (1..5) or a list. Every pair is checked (:func:`check_corruption`)."""
    if isinstance(corruption, str):
        names = list(CORRUPTION_GROUPS.get(corruption, (corruption,)))
    elif isinstance(corruption, Sequence) and corruption:
        names = list(corruption)
    else:
        raise ValueError(
            f"corruption must be a name, a list of names or one of {sorted(CORRUPTION_GROUPS)}, "
            f"got {corruption!r}; names: {', '.join(CORRUPTIONS)}"
        )
    if severity == "all":
        levels: list[Any] = list(SEVERITIES)
    elif isinstance(severity, Sequence) and not isinstance(severity, str) and severity:
        levels = list(severity)
    else:
        levels = [severity]
    pairs = [(n, s) for n in names for s in levels]
    for n, s in pairs:
        check_corruption(n, s)
    return pairs


def sample_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of one sample: seeded by ``(seed, crc32(stream), index)`` only, so the
    same sample gets the same corruption in any worker, run or subset."""
    key = [int(seed), zlib.crc32(stream.encode()), int(index)]
    return np.random.default_rng(np.random.SeedSequence(key))


def corrupt(
    image: Array | Image.Image,
    name: str,
    severity: int,
    rng: np.random.Generator | int = 0,
) -> Array | Image.Image:
    """Corrupt one uint8 image ((H, W), (H, W, 1), (H, W, 3) array, or an L/RGB PIL image).

    Returns the same type, shape and dtype; severity 0 returns the input unchanged. An int
    ``rng`` seeds a fresh generator.
    """
    check_corruption(name, severity)
    if severity == 0:
        return image
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            raise ValueError(f"corrupt: PIL image mode must be L or RGB, got {image.mode}")
        return Image.fromarray(corrupt(np.asarray(image), name, severity, rng))  # type: ignore[arg-type]
    arr = np.asarray(image)
    if (
        arr.dtype != np.uint8
        or arr.ndim not in (2, 3)
        or (arr.ndim == 3 and arr.shape[2] not in (1, 3))
    ):
        raise ValueError(
            f"corrupt: expected a uint8 (H, W), (H, W, 1) or (H, W, 3) image, got {arr.dtype} "
            f"{arr.shape}"
        )
    gen = np.random.default_rng(rng) if isinstance(rng, int) else rng
    x = arr.astype(np.float64).reshape(*arr.shape[:2], -1) / 255
    y = CORRUPTIONS[name](x, SEVERITY_PARAMS[name][severity - 1], gen)
    return _to_uint8(y).reshape(arr.shape)


@dataclass(frozen=True)
class CorruptionSpec:
    """One corruption at one severity, seeded: what a corrupted set or ``test_corruption``
    applies (``severity`` 0 = none)."""

    corruption: str
    severity: int
    seed: int = 0

    def __post_init__(self) -> None:
        check_corruption(self.corruption, self.severity)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"corruption seed must be an integer, got {self.seed!r}")

    def describe(self) -> str:
        """For data versions: names the corruption, severity, seed and constant table."""
        return (
            f"{self.corruption} severity {self.severity} (seed {self.seed}, CIFAR-10-C "
            "constants, lightning_ood port)"
        )


def parse_corruption_spec(value: object, where: str = "test_corruption") -> CorruptionSpec | None:
    """``None``, ``{corruption, severity, seed?}`` or a :class:`CorruptionSpec` -> spec or None
    (None also for severity 0)."""
    if value is None or isinstance(value, CorruptionSpec):
        spec = value
    elif isinstance(value, dict):
        unknown = sorted(set(value) - {"corruption", "severity", "seed"})
        if unknown or "corruption" not in value or "severity" not in value:
            raise ValueError(
                f"{where} must be {{corruption: NAME, severity: 1..5, seed: INT (optional)}}, "
                f"got {value!r}; corruptions: {', '.join(CORRUPTIONS)}"
            )
        check_corruption(value["corruption"], value["severity"], where)
        spec = CorruptionSpec(value["corruption"], value["severity"], value.get("seed", 0))
    else:
        raise ValueError(f"{where} must be a dict {{corruption, severity, seed?}}, got {value!r}")
    return None if spec is None or spec.severity == 0 else spec


class Corrupted(Dataset):
    """Corrupt each image of a raw ``(PIL image, label)`` dataset at the model's input size.

    The image is first brought to the model's channels and size (the eval pipeline's
    :class:`ChannelAdapter` + :class:`FitSize`, which then are no-ops), corrupted, and handed
    on as a PIL image, before any normalisation. Sample ``i`` uses :func:`sample_rng` with
    ``(spec.seed, stream, i)``: wrap the full reader and subset outside, so a sample's
    corruption does not depend on the subset.
    """

    def __init__(
        self, dataset: Dataset, spec: CorruptionSpec, input_shape: Sequence[int], stream: str
    ) -> None:
        if len(input_shape) != 3:
            raise ValueError(
                f"corruptions apply to images; the model's input_shape is {tuple(input_shape)} "
                "(token data takes no test_corruption or corrupted sets)"
            )
        c, h, w = (int(v) for v in input_shape)
        self.dataset = dataset
        self.spec = spec
        self.stream = stream
        self.adapt = ChannelAdapter(c)
        self.fit = FitSize(h, w)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.dataset[index]
        img = self.fit(self.adapt(img))
        if not isinstance(img, Image.Image):
            raise TypeError(f"Corrupted expects a reader of PIL images, got {type(img).__name__}")
        rng = sample_rng(self.spec.seed, self.stream, index)
        return corrupt(img, self.spec.corruption, self.spec.severity, rng), label


def corruption_halves(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(ID half, corrupted half)`` of a test set of ``n`` samples: disjoint, together all of
    ``range(n)``, sorted; the first ``n // 2`` of :func:`~lightning_ood.splits.seeded_parts`'s
    permutation go to the ID side, so no image is scored both clean (ID) and corrupted (OOD)."""
    id_half, rest = seeded_parts(n, [n // 2], seed, what="test set split into ID/corrupted halves")
    return sorted(id_half.tolist()), sorted(rest.tolist())
