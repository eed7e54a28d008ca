"""Plain torch Datasets that read the on-disk formats; they return ``(PIL image, label)``.

Transforms are applied by :class:`Transformed`, so one reader (one copy of the pixels in
memory) serves several views: the augmented training view, the eval-transform view the
detectors are fitted on, and a held-out validation view.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.mnist import read_image_file, read_label_file

Sample = tuple[Any, int]


class CorruptDataError(RuntimeError):
    """A dataset file exists but cannot be parsed (truncated download, wrong format).

    Attributes:
        path: the file to blame, when one is (the message names it too).
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        # One positional argument, so DataLoader workers can re-raise it in the main process.
        super().__init__(message)
        self.path = None if path is None else Path(path)


#: Hint appended to errors about one file that exists but cannot be read.
_RECOPY = "copy it again, or delete it and download it again (download: true)"
#: Errors PIL and the format parsers raise for a file that is truncated or not what it claims.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError)

#: CIFAR pickle layout as torchvision downloads it: folder, train files, test files, label key.
CIFAR_PICKLES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]] = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels"),
}
#: CIFAR-10 class names in label order (0 = airplane ... 9 = truck).
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class Transformed(Dataset):
    """Apply ``transform`` to the image of each sample and optionally replace its label.

    OOD sets use ``label=-1`` so every OOD batch is ``(x, -1)``.
    """

    def __init__(
        self, dataset: Dataset, transform: Callable[[Any], Any] | None, label: int | None = None
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.label = label

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample:
        x, y = self.dataset[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(y) if self.label is None else self.label


def take_every(dataset: Dataset, every: int) -> Dataset:
    """Every ``every``-th sample in file order (0, n, 2n, ...), for fast runs."""
    if every < 1:
        raise ValueError(f"subset step must be >= 1, got {every}")
    if every == 1:
        return dataset
    return Subset(dataset, range(0, len(dataset), every))  # type: ignore[arg-type]


def locate(dataset: Dataset, index: int) -> tuple[int, str]:
    """Where sample ``index`` of ``dataset`` comes from: ``(position in the full set, file)``.

    Unwraps :class:`Transformed` and ``Subset`` (``take_every`` slices, skipped corrupt files)
    down to the reader; ``file`` is the image's path for folder-based readers (``files`` or
    ``ImageFolder.samples``), else the reader's data file (idx, .mat) when it records one, else
    ``""``.
    """
    ds: Any = dataset
    i = int(index)
    for _ in range(16):  # wrappers nest a few levels at most
        if isinstance(ds, Subset):
            i, ds = int(ds.indices[i]), ds.dataset
        elif isinstance(ds, Transformed):
            ds = ds.dataset
        else:
            break
    if isinstance(getattr(ds, "files", None), list):
        return i, str(ds.files[i])
    samples = getattr(ds, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
        return i, str(samples[i][0])
    source = getattr(ds, "images_file", None) or getattr(ds, "path", None)
    return i, "" if source is None else str(source)


#: idx element type byte -> bytes per element (the idx format of the MNIST files).
_IDX_ITEMSIZE = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def check_idx_file(path: Path, ndim: int) -> tuple[int, ...]:
    """Check an idx file's header (magic number, dims) against its size, before reading it.

    torch only notices a short file when it reshapes the bytes, with a message that names no
    file; this names the file and says what is wrong with it.

    Args:
        path: the uncompressed idx file.
        ndim: dimensions it must have (images: 3, labels: 1).

    Returns:
        The dims from the header, e.g. (10000, 28, 28).

    Raises:
        CorruptDataError: gzip-compressed, not an idx file, wrong ndim, or a size that does
            not match the header (truncated or with trailing bytes).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic[:2] == b"\x1f\x8b":
            raise CorruptDataError(
                f"{path} is gzip-compressed; decompress it in place (mv {path.name} "
                f"{path.name}.gz && gunzip {path.name}.gz)",
                path,
            )
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_ITEMSIZE:
            raise CorruptDataError(
                f"{path} is not an idx file (it starts with {magic.hex() or 'nothing'}, "
                f"expected 0000080{ndim}); {_RECOPY}",
                path,
            )
        if magic[3] != ndim:
            raise CorruptDataError(
                f"{path} holds a {magic[3]}-d idx array, expected {ndim}-d (images 3, labels "
                "1): is it the right file?",
                path,
            )
        head = f.read(4 * ndim)
    if len(head) < 4 * ndim:
        raise CorruptDataError(f"{path} is truncated inside its idx header; {_RECOPY}", path)
    dims = tuple(int.from_bytes(head[4 * i : 4 * i + 4], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + _IDX_ITEMSIZE[magic[2]] * int(np.prod(dims, dtype=np.int64))
    if size != expected:
        raise CorruptDataError(
            f"{path} is truncated or corrupt: its idx header says "
            f"{' x '.join(map(str, dims))} ({expected} bytes), the file holds {size} bytes; "
            + _RECOPY,
            path,
        )
    return dims


def check_idx_pair(images_file: Path, labels_file: Path) -> int:
    """Check an idx image file and its label file (headers, sizes, counts); return the count.

    Raises:
        CorruptDataError: either file is damaged, or they hold different numbers of samples.
    """
    n_images = check_idx_file(images_file, 3)[0]
    n_labels = check_idx_file(labels_file, 1)[0]
    if n_images != n_labels:
        raise CorruptDataError(
            f"{images_file} holds {n_images} images but {labels_file} holds {n_labels} labels: "
            "the two files come from different sets or splits",
            labels_file,
        )
    return n_images


class IdxImages(Dataset):
    """An idx (MNIST-family) image file with an optional label file.

    Reads the uncompressed idx files with torchvision's own parsers, after checking their
    headers against their sizes (:func:`check_idx_file`); used for sets where only the test
    split is present (KMNIST here), which torchvision's dataset classes refuse.
    """

    def __init__(self, images_file: Path, labels_file: Path | None = None) -> None:
        if labels_file is None:
            check_idx_file(images_file, 3)
        else:
            check_idx_pair(images_file, labels_file)
        self.images = read_image_file(str(images_file))
        if labels_file is None:
            self.labels = torch.full((len(self.images),), -1, dtype=torch.long)
        else:
            self.labels = read_label_file(str(labels_file)).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        return Image.fromarray(self.images[index].numpy()), int(self.labels[index])


#: The only globals a CIFAR python pickle needs: numpy arrays (the images), written by numpy 1
#: or 2, and ``_codecs.encode`` (how protocol-2 pickles store bytes). Anything else in a data
#: file would be code, and is refused (:class:`DataUnpickler`).
_CIFAR_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class DataUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, containers and primitives only: a dataset file is data, so a
    pickled class or function in it (a ``__reduce__`` payload) is refused, never called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the file asks to load the Python object {module}.{name}; a dataset pickle holds "
            "only numpy arrays and lists, so this one is refused (it could run code)"
        )


class CIFARPickles(Dataset):
    """The original CIFAR-10/100 python pickles (torchvision's download layout).

    Read directly (not through ``torchvision.datasets.CIFAR10``) so that the reader does not
    depend on the md5 of the published files and can be tested on small pickles.
    """

    def __init__(self, folder: Path, files: Sequence[str], label_key: str) -> None:
        data, labels = [], []
        for name in files:
            path = folder / name
            try:
                with open(path, "rb") as f:
                    entry = DataUnpickler(f, encoding="latin1").load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
                raise CorruptDataError(
                    f"{path} cannot be unpickled ({type(err).__name__}: {err}): it is "
                    f"probably truncated or corrupt; {_RECOPY}",
                    path,
                ) from err
            if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
                found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise ValueError(
                    f"{path} is not a CIFAR pickle: expected keys 'data' and "
                    f"{label_key!r}, found {found}"
                )
            pixels = np.asarray(entry["data"], dtype=np.uint8)
            n_labels = len(entry[label_key])
            if pixels.size != n_labels * 3 * 32 * 32:
                raise CorruptDataError(
                    f"{path}: 'data' has shape {pixels.shape} but there are {n_labels} labels "
                    f"(expected {n_labels} x 3072 bytes of 32x32 RGB images); {_RECOPY}",
                    path,
                )
            data.append(pixels.reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in entry[label_key])
        self.data = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))  # NHWC
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Sample:
        return Image.fromarray(self.data[index]), int(self.labels[index])


#: Image formats in a folder set that are refused rather than read: PIL may open some of them,
#: but torchvision's ``ImageFolder`` (which the reference code used) does not list them, so
#: reading them would silently change a set's samples; converting them is the user's call.
UNREAD_IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".gif",
    ".jfif",
    ".heic",
    ".heif",
    ".avif",
    ".jxl",
    ".jp2",
    ".j2k",
    ".ico",
    ".svg",
    ".psd",
    ".tga",
    ".exr",
    ".hdr",
    ".dng",
    ".cr2",
    ".nef",
    ".arw",
)
#: How many paths an error or warning lists before "... and N more".
_SHOWN = 5


def _some(paths: Sequence[Any], total: int | None = None) -> str:
    total = len(paths) if total is None else total
    shown = ", ".join(str(p) for p in paths[:_SHOWN])
    return shown + (f" ... and {total - _SHOWN} more" if total > _SHOWN else "")


def list_images(folder: Path) -> list[Path]:
    """All image files below ``folder``, recursively, in sorted path order.

    Sorting by path components reproduces the order of ``ImageFolder`` (class folders sorted,
    files sorted within them), which the reference code used for these sets. Other files are
    never dropped silently: image formats that are not read
    (:data:`UNREAD_IMAGE_EXTENSIONS`, e.g. ``.gif``) are an error naming them; anything else
    (``README.txt``, hidden files such as ``.DS_Store`` or macOS ``._x.jpg`` forks) is left
    out with a warning that counts them.

    Raises:
        ValueError: the folder holds images in a format that is not read.
    """
    found: list[Path] = []
    refused: list[Path] = []
    ignored: list[Path] = []
    for dirpath, _, filenames in os.walk(folder, followlinks=True):
        for name in filenames:
            path = Path(dirpath) / name
            lower = name.lower()
            if name.startswith("."):
                ignored.append(path)
            elif lower.endswith(IMG_EXTENSIONS):
                found.append(path)
            elif lower.endswith(UNREAD_IMAGE_EXTENSIONS):
                refused.append(path)
            else:
                ignored.append(path)
    if refused:
        refused.sort()
        kinds = sorted({p.suffix.lower() for p in refused})
        raise ValueError(
            f"{folder} holds {len(refused)} image file(s) in a format this reader does not "
            f"read ({', '.join(kinds)}): {_some(refused)}. Convert them to PNG or JPEG "
            f"(e.g. with PIL: Image.open(p).convert('RGB').save(p.with_suffix('.png'))) or "
            f"move them out of the folder; read formats: {', '.join(IMG_EXTENSIONS)}"
        )
    if ignored:
        ignored.sort()
        warnings.warn(
            f"{folder}: left out {len(ignored)} file(s) that are not images (or are hidden): "
            f"{_some(ignored)}",
            stacklevel=2,
        )
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


#: Where ``skip_corrupt`` is set, for the hints of errors about one image file.
_SKIP_HINT = (
    "set skip_corrupt: true in the set's ood_sets (or predict_sets) entry to leave such files "
    "out (they are counted and reported)"
)


def _skip_hint(path: Path, err: BaseException) -> str:
    return (
        f"cannot decode image {path} ({type(err).__name__}: {err}): the file is probably "
        f"truncated or corrupt. Replace or remove it, or {_SKIP_HINT}"
    )


def _bomb_hint(path: Path, err: BaseException) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    cap = f"{2 * limit:,} pixels (2 x PIL.Image.MAX_IMAGE_PIXELS)" if limit else "PIL's limit"
    return (
        f"image {path} is refused as a possible decompression bomb ({err}): PIL opens images "
        f"of at most {cap}, since decoding a larger one can exhaust memory. If the image is "
        "genuine, downscale it (the model reads every image resized to its input size anyway) "
        f"or remove it; or {_SKIP_HINT}"
    )


def open_image(fp: Any, path: Path) -> Image.Image:
    """``Image.open(fp)`` (lazy: nothing decoded yet) with PIL's decompression-bomb checks
    naming the file.

    An image above ``PIL.Image.MAX_IMAGE_PIXELS`` is opened with a
    ``DecompressionBombWarning`` that names the file (PIL's own names none); above twice that,
    PIL refuses it with ``DecompressionBombError``, which the callers turn into an error that
    names the file (or a skipped file under ``skip_corrupt``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(fp)
    limit = Image.MAX_IMAGE_PIXELS
    pixels = img.width * img.height
    if limit and pixels > limit:
        warnings.warn(
            f"image {path} is {img.width}x{img.height} = {pixels:,} pixels, above "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit:,} (a possible decompression bomb); it is "
            f"read, but decoding it costs memory and time: downscale it (above {2 * limit:,} "
            "pixels it is refused)",
            Image.DecompressionBombWarning,
            stacklevel=2,
        )
    return img


def _unscaled(img: Image.Image) -> str | None:
    """Why ``img``'s pixels have no known full scale (32-bit integer or float), or None."""
    if img.mode == "F" or (img.mode == "I" and img.format != "PNG"):
        kind = "32-bit float" if img.mode == "F" else "32-bit integer"
        fmt = img.format or "unknown"
        return f"{kind} pixels (PIL mode {img.mode}, {fmt} format) of no known full scale"
    return None


#: PIL modes of 16-bit integer images (16-bit grayscale PNG and TIFF): full scale 65535.
MODES_16BIT: tuple[str, ...] = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """``img`` as 8-bit RGB, high-bit-depth grayscale scaled rather than clipped.

    PIL's ``convert("RGB")`` (and ``convert("L")``) clips a 16-bit value to 255, so every pixel
    of a 16-bit PNG above 255/65535 of full scale would turn white. Here a 16-bit value v
    becomes ``round(v / 257)`` (65535 -> 255, the 8-bit value with the same fraction of full
    scale), replicated to three channels. (16-bit RGB PNGs already come out of PIL as 8-bit
    RGB, scaled.) 32-bit integer and float images (mode ``I`` or ``F``, e.g. from a TIFF)
    have no known full scale and are refused; a mode ``I`` PNG is 16-bit (older PIL reads
    16-bit PNGs so).

    Raises:
        CorruptDataError: a 32-bit integer or float image, or a mode ``I`` PNG with values
            outside 0..65535; the message names the file and how to convert it.
    """
    if img.mode in MODES_16BIT or (img.mode == "I" and img.format == "PNG"):
        values = np.asarray(img, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise CorruptDataError(
                f"image {path} is a mode-I PNG with values {values.min():g}..{values.max():g}, "
                "outside the 16-bit range 0..65535; save it as an 8-bit or 16-bit PNG",
                path,
            )
        return Image.fromarray(np.rint(values / 257.0).astype(np.uint8)).convert("RGB")
    reason = _unscaled(img)
    if reason is not None:
        raise CorruptDataError(
            f"image {path} holds {reason}, so its pixels cannot be brought to 8 bits without "
            "guessing; convert it to an 8-bit or 16-bit PNG scaled to that type's full range "
            f"(0..255 or 0..65535), or remove it; or {_SKIP_HINT}",
            path,
        )
    return img.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB, like ``ImageFolder``'s default loader, except that 16-bit
    images are scaled (:func:`to_rgb`) and decompression bombs are refused naming the file.

    Raises:
        CorruptDataError: the file does not decode, is too large for PIL, or holds pixels
            of no known range; the message names it.
    """
    try:
        with open(path, "rb") as f:
            return to_rgb(open_image(f, path), path)
    except (FileNotFoundError, PermissionError):
        raise  # these name the file already, and re-copying would not help
    except CorruptDataError:
        raise
    except Image.DecompressionBombError as err:
        raise CorruptDataError(_bomb_hint(path, err), path) from err
    except _DECODE_ERRORS as err:
        raise CorruptDataError(_skip_hint(path, err), path) from err


def find_corrupt(files: Sequence[Path]) -> list[tuple[int, str]]:
    """``(index, reason)`` of every file in ``files`` that cannot be read: it does not decode,
    PIL refuses it as a decompression bomb, or its pixels have no known range (:func:`to_rgb`).

    Each file is decoded in full once (JPEGs at 1/8 scale through ``Image.draft``, which
    still reads the whole stream): ``Image.verify()`` alone does not notice a truncated JPEG.
    Measured on one CPU core with the files cached: 1.3 s for Tiny-ImageNet's 10,000 64x64
    test JPEGs (1.1 s for CIFAR-10's 32x32 ones), about 2 ms per 512x512 JPEG; every rank of
    a multi-device run scans on its own.
    """
    bad: list[tuple[int, str]] = []
    for i, path in enumerate(files):
        try:
            with open(path, "rb") as f, open_image(f, path) as img:
                reason = _unscaled(img)
                if reason is not None:  # to_rgb refuses it
                    bad.append((i, reason))
                    continue
                img.draft(img.mode, (1, 1))
                img.load()
        except (FileNotFoundError, PermissionError):
            raise
        except Image.DecompressionBombError as err:
            bad.append((i, f"decompression bomb refused by PIL: {err}"))
        except _DECODE_ERRORS as err:
            bad.append((i, f"{type(err).__name__}: {err}"))
    return bad


class SkippedCorrupt(Subset):
    """A dataset without the samples whose files do not decode.

    Attributes:
        skipped: ``(path, reason)`` of every file left out.
    """

    def __init__(
        self, dataset: Dataset, indices: Sequence[int], skipped: list[tuple[Path, str]]
    ) -> None:
        super().__init__(dataset, indices)
        self.skipped = skipped


def drop_corrupt(dataset: Dataset, files: Sequence[Path], where: Path) -> Dataset:
    """``dataset`` without the samples whose file (``files[i]`` is sample i's) does not decode.

    Never silent: when files are left out, a warning counts them and names the first few
    (the list is on the result's ``skipped``). Sample i keeps everything drawn for it over
    the full list (e.g. :class:`FixedCrops` offsets); only the indices change.
    """
    bad = find_corrupt(files)
    if not bad:
        return dataset
    skipped = [(files[i], reason) for i, reason in bad]
    warnings.warn(
        f"skip_corrupt: left out {len(bad)} of {len(files)} image files under {where} that "
        f"cannot be read: {_some([f'{p} ({r})' for p, r in skipped])}",
        stacklevel=2,
    )
    drop = {i for i, _ in bad}
    return SkippedCorrupt(dataset, [i for i in range(len(files)) if i not in drop], skipped)


class ImageFiles(Dataset):
    """A flat list of image files with one constant label (OOD folders: -1)."""

    def __init__(self, files: Sequence[Path], label: int = -1) -> None:
        self.files = list(files)
        self.label = label

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        return load_rgb(self.files[index]), self.label


class FixedCrops(ImageFiles):
    """Random crops whose offsets are drawn ONCE, for the whole sorted file list.

    Offsets come from ``torch.Generator().manual_seed(seed)`` over all files, so the crop of
    file i does not depend on subsetting, worker processes or the epoch (the classic
    "TinyImageNet (crop)" set: one random 32x32 crop of each 64x64 test image).

    Attributes:
        offsets: (N, 2) long tensor of (top, left) per file.
    """

    def __init__(
        self,
        files: Sequence[Path],
        crop: int = 32,
        image_size: int = 64,
        seed: int = 0,
        label: int = -1,
    ) -> None:
        super().__init__(files, label)
        if not 0 < crop <= image_size:
            raise ValueError(f"crop must be in (0, image_size={image_size}], got {crop}")
        self.crop = crop
        self.image_size = image_size
        gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, image_size - crop + 1, (len(self.files), 2), generator=gen)

    def __getitem__(self, index: int) -> Sample:
        img = load_rgb(self.files[index])
        if img.size != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.files[index]} is {img.size[0]}x{img.size[1]}; the fixed-crop set expects "
                f"{self.image_size}x{self.image_size} images"
            )
        top, left = (int(v) for v in self.offsets[index])
        return img.crop((left, top, left + self.crop, top + self.crop)), self.label


class SVHNMat(Dataset):
    """An SVHN ``.mat`` split (``X``: (32, 32, 3, N) uint8, ``y``: (N, 1), 10 = digit 0)."""

    def __init__(self, mat_file: Path) -> None:
        from scipy.io import loadmat  # scipy comes with scikit-learn; only SVHN needs it

        try:
            mat = loadmat(str(mat_file))
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as err:  # scipy raises OSError, ValueError, IndexError, MatReadError
            raise CorruptDataError(
                f"{mat_file} cannot be read as a .mat file ({type(err).__name__}: {err}): it is "
                f"probably truncated or corrupt; {_RECOPY}",
                mat_file,
            ) from err
        x, y = mat.get("X"), mat.get("y")
        if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise ValueError(
                f"{mat_file} is not an SVHN .mat file: expected 'X' of shape (32, 32, 3, N) "
                f"and 'y' of shape (N, 1), found {sorted(k for k in mat if not k.startswith('_'))}"
            )
        if np.size(y) != x.shape[3]:
            raise CorruptDataError(
                f"{mat_file} holds {x.shape[3]} images ('X' {x.shape}) but {np.size(y)} labels "
                f"('y' {np.shape(y)}); {_RECOPY}",
                mat_file,
            )
        self.data = np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)).astype(np.uint8))
        labels = np.asarray(y, dtype=np.int64).reshape(-1)
        labels[labels == 10] = 0
        self.labels = labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Sample:
        return Image.fromarray(self.data[index]), int(self.labels[index])


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of each class, in file order.

    A class with fewer samples contributes all of them.
    """
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    ranked = labels[order]
    rank = np.arange(len(labels)) - np.searchsorted(ranked, ranked, side="left")
    return np.sort(order[rank < per_class])
