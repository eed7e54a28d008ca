"""Named OOD test sets: a registry ``name -> how to find, read and (maybe) download it``.

A config names a set (``ood_sets: [mnist, lsun_crop]``) or overrides its location / kind::

    ood_sets:
      - svhn_1k
      - {name: lsun_crop, path: /data/LSUN}
      - {name: my_textures, kind: folder, path: /data/my_textures}
      - {name: my_photos, kind: folder, path: /data/photos, skip_corrupt: true}
      - {name: mnist_half, kind: mnist, every: 2}
      - {name: fmnist_c_gauss3, kind: corrupted, base: fashionmnist,
         corruption: gaussian_noise, severity: 3}
      - {name: fashionmnist_c, kind: corrupted, base: fashionmnist,
         corruption: all, severity: all}   # one set per type x severity: fashionmnist_c/fog/2

Reported sets take two more keys. ``group`` (``near``, ``far`` or any name) puts the set in a
group whose per-metric mean is reported beside the overall average, as OpenOOD v1.5 reports
near-OOD and far-OOD (:func:`lightning_ood.metrics.group_averages`; the datamodule's
``groups()``). ``missing: skip`` lets a run go on without a set whose files are not under the
data root (:func:`missing_reason` says why), with a warning that names the set, where it was
looked for and what its group then averages over; the datamodule's ``skipped_ood_sets()``
keeps the list for the results. The default, ``missing: error``, fails naming the set::

    ood_sets:
      - {name: cifar100, group: near, missing: skip}
      - {name: mnist, group: far}

A ``corrupted`` set (the FSSD paper's ImageNet-C benchmark, Hendrycks & Dietterich 2019) is a
registered image set (``base``) with one :mod:`~lightning_ood.data.corruptions` corruption at
severity 1..5 (``seed`` optional), applied at the model's input size before normalisation.
It holds only the corrupted half of the base's test set (:func:`corruption_halves`, seeded by
``split_seed``, default 0); when the base is the ID set, the datamodule scores the other half
as ID (:func:`id_test_view`), so no image is scored both clean and corrupted. ``corruption``
may be a name, a list or a group (all, common, extra, noise) and ``severity`` an integer, a
list or ``all``: :func:`parse_ood_specs` expands such an entry into one set per pair, named
``<name>/<corruption>/<severity>``. Its ``path``, if given, replaces the data root the base is
found under.

Every OOD set is adapted to the ID model's input (channels, then ``Resize``+``CenterCrop``)
and normalised with the ID set's constants (:func:`~lightning_ood.data.transforms.eval_transform`),
and yields label -1. Default locations are relative to the data root:

============================  =========================================================
name                          default location (under the data root)
============================  =========================================================
mnist, fashionmnist, kmnist   ``MNIST/raw``, ``FashionMNIST/raw``, ``KMNIST/raw`` (test idx)
svhn, svhn_1k                 ``svhn/test_32x32.mat``
lsun_crop, lsun_resize        ``LSUN``, ``LSUN_resize``
isun, textures, places365     ``iSUN``, ``dtd/images``, ``places365``
tinyimagenet_crop/_resize     ``tiny-imagenet-200/test/images``
cifar10, cifar100             the data root (pickles or ``cifar10-jpeg-q75``), test split
folder                        no default: needs ``path``
genome_ood                    ``genome/ood_test.tsv`` (``genome/ood_val.tsv`` as a val set)
corrupted                     its ``base`` set's location
============================  =========================================================

Files that exist but cannot be read raise :class:`~lightning_ood.data.readers.CorruptDataError`
naming the file: idx files are checked against their headers before they are read, image
files when they are decoded (PIL's decompression-bomb refusals and 32-bit images of no known
full scale included; 16-bit images are scaled to 8 bits by
:func:`~lightning_ood.data.readers.to_rgb`).
Image-folder sets (``folder``, the LSUN/iSUN/Textures/Places/Tiny-ImageNet sets, CIFAR as
JPEGs) take ``skip_corrupt: true`` to decode every file once when the set is built and leave
out those that fail, with a warning that counts and names them (about 1.3 s per 10,000 small
JPEGs, 2 ms per 512x512 one). A folder holding images in a format that is not read
(``.gif``, ...) is an error that lists them.

Every set is registered here except ``genome_ood``, which :mod:`lightning_ood.data.genome`
registers beside its reader and datamodule (the genome module imports this one, so this one
cannot import it back). Importing :mod:`lightning_ood.data` registers them all.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset, Subset
from torchvision import datasets as tvd

from lightning_ood.data.corruptions import (
    CORRUPTIONS,
    Corrupted,
    CorruptionSpec,
    check_corruption,
    corruption_halves,
    expand_corruptions,
)
from lightning_ood.data.paths import guarded_download
from lightning_ood.data.readers import (
    CIFAR_PICKLES,
    CIFARPickles,
    FixedCrops,
    IdxImages,
    ImageFiles,
    SVHNMat,
    Transformed,
    drop_corrupt,
    first_per_class,
    list_images,
    load_rgb,
    take_every,
)
from lightning_ood.data.transforms import Normalization, eval_transform

Builder = Callable[..., Dataset]
IDX_TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class OODSetInfo:
    """How to find and read one named OOD set.

    Attributes:
        builder: ``builder(location, input_shape, **options) -> Dataset`` of raw
            ``(PIL image or tokens, label)`` samples.
        subpath: default location relative to the data root (None: a path is required).
        expects: what belongs at the location, for error messages.
        download: ``download(root)`` fetching the set into its default location, if possible.
        val_subpath: a separate location for the validation variant (``val_ood_sets``); None
            means the val variant reads the same samples as the test variant.
        kind: "image" sets feed (C, H, W) models, "tokens" sets feed sequence models.
        present: ``present(location) -> bool``, whether the set is complete there (default:
            the location exists); decides whether ``prepare_data`` downloads it.
        validate: ``validate(options)`` checks an entry's builder options when it is parsed
            (before any file is read); raises ValueError naming what to fix.
    """

    builder: Builder
    subpath: str | None
    expects: str
    download: Callable[[Path], None] | None = None
    val_subpath: str | None = None
    kind: Literal["image", "tokens"] = "image"
    present: Callable[[Path], bool] | None = None
    validate: Callable[[Mapping[str, Any]], None] | None = None


Missing = Literal["error", "skip"]
#: Row name of the mean over every reported OOD set; no group may take it.
RESERVED_GROUP_NAMES = ("average",)


@dataclass(frozen=True)
class OODSpec:
    """One parsed ``ood_sets`` entry: the reported ``name``, the registry ``kind`` it is read
    with, an optional location override, subset step and builder options; for a reported set
    also its ``group`` (None: in no group) and what a ``missing`` set does (error or skip)."""

    name: str
    kind: str
    path: Path | None = None
    every: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    missing: Missing = "error"


OOD_SETS: dict[str, OODSetInfo] = {}


def register_ood_set(name: str, info: OODSetInfo) -> None:
    """Add a named OOD set to :data:`OOD_SETS` (names are unique)."""
    if name in OOD_SETS:
        raise ValueError(f"OOD set {name!r} is already registered")
    OOD_SETS[name] = info


def parse_ood_spec(item: str | Mapping[str, Any]) -> OODSpec:
    """Validate one ``ood_sets`` entry (a registry name or a dict) without touching the disk."""
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, Mapping):
        raise TypeError(f"an ood_sets entry must be a name or a dict, got {item!r}")
    spec = dict(item)
    name = spec.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"ood_sets entry {dict(item)} needs a 'name'")
    kind = spec.pop("kind", name)
    if kind not in OOD_SETS:
        raise ValueError(
            f"unknown OOD set {kind!r} (entry {dict(item)}); known: {sorted(OOD_SETS)}. For "
            "any folder of images use {name: <your name>, kind: folder, path: <folder>}"
        )
    path = spec.pop("path", None)
    every = spec.pop("every", None)
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ValueError(f"ood_sets entry {name!r}: 'every' must be an integer >= 1, got {every}")
    group = spec.pop("group", None)
    if group is not None and (not isinstance(group, str) or not group.strip()):
        raise ValueError(
            f"ood_sets entry {name!r}: 'group' must be a name such as near or far, got {group!r}"
        )
    if group in RESERVED_GROUP_NAMES:
        raise ValueError(
            f"ood_sets entry {name!r}: group {group!r} is the name of the overall row; use "
            "another group name"
        )
    missing = spec.pop("missing", "error")
    if missing not in ("error", "skip"):
        raise ValueError(
            f"ood_sets entry {name!r}: 'missing' must be error (default: a missing set stops "
            f"the run) or skip (it is left out, with a warning), got {missing!r}"
        )
    info = OOD_SETS[kind]
    accepted = [
        p.name
        for p in list(inspect.signature(info.builder).parameters.values())[2:]
        if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(spec) - set(accepted))
    if unknown:
        raise ValueError(
            f"ood_sets entry {name!r}: unknown keys {unknown}; allowed: name, kind, path, "
            "every, group, missing" + (f", {', '.join(accepted)}" if accepted else "")
        )
    if path is None and info.subpath is None:
        raise ValueError(f"ood_sets entry {name!r} of kind {kind!r} needs a 'path'")
    if info.validate is not None:
        try:
            info.validate(spec)
        except ValueError as err:
            raise ValueError(f"ood_sets entry {name!r}: {err}") from err
    location = Path(path).expanduser() if path else None
    return OODSpec(name, kind, location, every, spec, group, missing)


def _expands(options: Mapping[str, Any]) -> bool:
    corruption, severity = options.get("corruption"), options.get("severity")
    many = isinstance(corruption, list | tuple) or (
        isinstance(corruption, str) and corruption not in CORRUPTIONS
    )
    return many or severity == "all" or isinstance(severity, list | tuple)


def parse_ood_specs(items: Sequence[str | Mapping[str, Any]] | None) -> list[OODSpec]:
    """Parse ``ood_sets`` entries, expanding a ``corrupted`` entry whose ``corruption`` is a
    group/list or whose ``severity`` is ``all``/a list into one set per (corruption, severity),
    named ``<name>/<corruption>/<severity>`` (e.g. ``fashionmnist_c/gaussian_noise/3``)."""
    specs: list[OODSpec] = []
    for item in items or []:
        if isinstance(item, Mapping) and item.get("kind") == "corrupted" and _expands(item):
            name = item.get("name")
            try:
                pairs = expand_corruptions(item.get("corruption"), item.get("severity"))
            except ValueError as err:
                raise ValueError(f"ood_sets entry {name!r}: {err}") from err
            for corruption, severity in pairs:
                one = {**item, "corruption": corruption, "severity": severity}
                specs.append(parse_ood_spec({**one, "name": f"{name}/{corruption}/{severity}"}))
        else:
            specs.append(parse_ood_spec(item))
    return specs


def ood_location(spec: OODSpec, root: Path, split: Literal["test", "val"] = "test") -> Path:
    """Where a set is read from: its ``path`` override, else its default under ``root``."""
    if spec.path is not None:
        return spec.path
    info = OOD_SETS[spec.kind]
    sub = info.val_subpath if split == "val" and info.val_subpath else info.subpath
    return root / sub if sub else root


def missing_reason(spec: OODSpec, root: Path, split: Literal["test", "val"] = "test") -> str | None:
    """Why ``spec``'s files are not under ``root`` (None: they are there); reads no file.

    A set is missing when its location does not exist or, for a registered set that knows
    its files (``OODSetInfo.present``: the idx files, CIFAR's pickles or JPEG copy), they are
    not complete there; a ``corrupted`` set when its base set is missing. Files that are there
    but unreadable are not "missing": building the set still fails, naming the file.
    """
    info = OOD_SETS[spec.kind]
    if spec.kind == "corrupted":
        base = OOD_SETS[str(spec.options["base"])]
        location = (spec.path if spec.path is not None else root) / (base.subpath or "")
        info = base
    else:
        location = ood_location(spec, root, split)
    if not location.exists():
        return f"{location} does not exist; expected {info.expects}"
    if info.present is not None and not info.present(location):
        return f"{location} does not hold the set; expected {info.expects}"
    return None


def download_ood_set(spec: OODSpec, root: Path) -> bool:
    """Download a missing, downloadable set into its default location; True if it tried."""
    info = OOD_SETS[spec.kind]
    location = ood_location(spec, root)
    present = info.present(location) if info.present else location.exists()
    if info.download is None or spec.path is not None or present:
        return False
    guarded_download(f"OOD set {spec.name!r}", root, lambda: info.download(root))  # type: ignore[misc]
    return True


def build_ood_dataset(
    spec: str | Mapping[str, Any] | OODSpec,
    root: str | Path,
    input_shape: Sequence[int],
    normalization: Normalization | None,
    every: int = 1,
    split: Literal["test", "val"] = "test",
    corruption: CorruptionSpec | None = None,
) -> Dataset:
    """Build a ready-to-load OOD dataset: samples ``(x, -1)`` in the ID model's input format.

    Args:
        spec: a registry name, an ``ood_sets`` dict or a parsed :class:`OODSpec`.
        root: the data root the default locations are relative to.
        input_shape: the ID model's input, (C, H, W) for images or (seq_len,) for tokens.
        normalization: the ID set's (mean, std); ignored for token sets.
        every: take every n-th sample in file order (the entry's own ``every`` wins).
        split: "val" reads a set's separate validation location where it has one.
        corruption: corrupt every image (the datamodule's ``test_corruption``, FSSD Figure 5),
            seeded per sample with the stream ``test_corruption/<name>``.

    Raises:
        FileNotFoundError: the set's location is missing.
        ValueError: the set (or its every-n subset) is empty, or it does not fit the model.
    """
    if not isinstance(spec, OODSpec):
        spec = parse_ood_spec(spec)
    info = OOD_SETS[spec.kind]
    location = ood_location(spec, Path(root), split)
    shape = tuple(int(v) for v in input_shape)
    if info.kind == "image" and len(shape) != 3:
        raise ValueError(
            f"OOD set {spec.name!r} holds images but the model's input_shape is {shape}"
        )
    if info.kind == "tokens" and len(shape) != 1:
        raise ValueError(
            f"OOD set {spec.name!r} holds token sequences but the model's input_shape is {shape}"
        )
    if not location.exists():
        hint = " or set download: true" if info.download is not None else ""
        raise FileNotFoundError(
            f"OOD set {spec.name!r} not found: {location} does not exist; expected "
            f"{info.expects}. Put it there, give its location with "
            f"{{name: {spec.name}, path: /your/path}} in ood_sets, or change --data.root{hint}."
        )
    raw = info.builder(location, shape, **spec.options)
    if len(raw) == 0:  # type: ignore[arg-type]
        raise ValueError(f"OOD set {spec.name!r} at {location} holds no samples ({info.expects})")
    if corruption is not None and info.kind == "image":
        raw = Corrupted(raw, corruption, shape, stream=f"test_corruption/{spec.name}")
    step = spec.every or every
    subset = take_every(raw, step)
    if len(subset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"OOD set {spec.name!r} at {location}: every-{step} subset is empty")
    if info.kind == "tokens":
        return Transformed(subset, None, label=-1)
    if normalization is None:
        raise ValueError(f"OOD set {spec.name!r} is an image set and needs the ID normalisation")
    mean, std = normalization
    return Transformed(subset, eval_transform(shape, mean, std), label=-1)


# -- builders ---------------------------------------------------------------------------------
def _require_files(set_name: str, folder: Path, names: Sequence[str], expects: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{set_name} not found under {folder}: expected {', '.join(names)} "
            f"(missing: {', '.join(missing)}); {expects}"
        )


def _idx_builder(display: str) -> Builder:
    def build(location: Path, input_shape: tuple[int, ...]) -> Dataset:
        _require_files(display, location, IDX_TEST_FILES, "the uncompressed test idx files")
        return IdxImages(location / IDX_TEST_FILES[0], location / IDX_TEST_FILES[1])

    return build


def _tv_download(cls: type, train: bool = False) -> Callable[[Path], None]:
    def fetch(root: Path) -> None:
        cls(str(root), train=train, download=True)

    return fetch


def _svhn_file(location: Path) -> Path:
    return location / "test_32x32.mat" if location.is_dir() else location


def _build_svhn(location: Path, input_shape: tuple[int, ...]) -> Dataset:
    return SVHNMat(_svhn_file(location))


def _build_svhn_1k(
    location: Path, input_shape: tuple[int, ...], *, per_class: int = 1000
) -> Dataset:
    """The first ``per_class`` test images of each digit in file order (10,000 for SVHN)."""
    ds = SVHNMat(_svhn_file(location))
    return Subset(ds, first_per_class(ds.labels, per_class).tolist())


def _download_svhn(root: Path) -> None:
    tvd.SVHN(str(root / "svhn"), split="test", download=True)


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _build_folder(
    location: Path, input_shape: tuple[int, ...], *, skip_corrupt: bool = False
) -> Dataset:
    _check_flag("skip_corrupt", skip_corrupt)
    ds = ImageFiles(list_images(location))
    return drop_corrupt(ds, ds.files, location) if skip_corrupt else ds


def _build_tin_crop(
    location: Path,
    input_shape: tuple[int, ...],
    *,
    seed: int = 0,
    crop: int = 32,
    skip_corrupt: bool = False,
) -> Dataset:
    _check_flag("skip_corrupt", skip_corrupt)
    # Offsets are drawn over the full list, so skipping a file leaves the others' crops alone.
    ds = FixedCrops(list_images(location), crop=crop, image_size=64, seed=seed)
    return drop_corrupt(ds, ds.files, location) if skip_corrupt else ds


def _build_cifar_test(variant: str) -> Builder:
    def build(
        location: Path, input_shape: tuple[int, ...], *, skip_corrupt: bool = False
    ) -> Dataset:
        """``skip_corrupt`` applies to the JPEG copy; a damaged pickle always fails."""
        _check_flag("skip_corrupt", skip_corrupt)
        folder, _, test_files, key = CIFAR_PICKLES[variant]
        if (location / folder).is_dir():
            _require_files(variant, location / folder, test_files, "the original CIFAR pickles")
            return CIFARPickles(location / folder, test_files, key)
        jpeg = location / f"{variant}-jpeg-q75" / "test"
        if jpeg.is_dir():
            ds = tvd.ImageFolder(str(jpeg), loader=load_rgb)  # decode errors name the file
            files = [Path(p) for p, _ in ds.samples]
            return drop_corrupt(ds, files, jpeg) if skip_corrupt else ds
        raise FileNotFoundError(
            f"{variant} (as an OOD set) not found under {location}: expected {folder}/ "
            f"(the original pickles) or {variant}-jpeg-q75/test/<class>/*.jpg"
        )

    return build


_IDX: dict[str, tuple[str, type[tvd.MNIST]]] = {
    "mnist": ("MNIST", tvd.MNIST),
    "fashionmnist": ("FashionMNIST", tvd.FashionMNIST),
    "kmnist": ("KMNIST", tvd.KMNIST),  # test split only here: read directly, not via KMNIST
}
for _name, (_folder, _cls) in _IDX.items():
    register_ood_set(
        _name,
        OODSetInfo(
            _idx_builder(_folder),
            f"{_folder}/raw",
            f"the {_folder} test idx files ({', '.join(IDX_TEST_FILES)}), 10,000 28x28 images",
            download=_tv_download(_cls),
            present=lambda loc: all((loc / n).is_file() for n in IDX_TEST_FILES),
        ),
    )
_SVHN_EXPECTS = "SVHN's test_32x32.mat (26,032 32x32 digits; torchvision layout)"
register_ood_set(
    "svhn", OODSetInfo(_build_svhn, "svhn/test_32x32.mat", _SVHN_EXPECTS, _download_svhn)
)
register_ood_set(
    "svhn_1k",
    OODSetInfo(_build_svhn_1k, "svhn/test_32x32.mat", _SVHN_EXPECTS, _download_svhn),
)
_FOLDERS = {
    "lsun_crop": ("LSUN", "LSUN (crop): 10,000 32x32 image crops (ODIN's LSUN.tar.gz)"),
    "lsun_resize": ("LSUN_resize", "LSUN (resize): 10,000 32x32 images (LSUN_resize.tar.gz)"),
    "isun": ("iSUN", "iSUN: 8,925 32x32 images (iSUN.tar.gz)"),
    "textures": ("dtd/images", "the DTD textures: 5,640 images in 47 class folders"),
    "places365": ("places365", "the Places365 OOD images (class folders of JPEGs)"),
    "tinyimagenet_resize": (
        "tiny-imagenet-200/test/images",
        "Tiny-ImageNet's 10,000 64x64 test JPEGs (downscaled to the model's size)",
    ),
}
for _name, (_sub, _expects) in _FOLDERS.items():
    register_ood_set(_name, OODSetInfo(_build_folder, _sub, f"a folder of images: {_expects}"))
register_ood_set(
    "tinyimagenet_crop",
    OODSetInfo(
        _build_tin_crop,
        "tiny-imagenet-200/test/images",
        "Tiny-ImageNet's 10,000 64x64 test JPEGs (one fixed random 32x32 crop each, seed 0)",
    ),
)
register_ood_set("folder", OODSetInfo(_build_folder, None, "a folder of images (recursive)"))
register_ood_set(
    "cifar10",
    OODSetInfo(
        _build_cifar_test("cifar10"),
        "",
        "cifar-10-batches-py/ or cifar10-jpeg-q75/test/ (CIFAR-10 test split)",
        download=lambda root: tvd.CIFAR10(str(root), train=False, download=True),
        present=lambda loc: (
            (loc / "cifar-10-batches-py").is_dir() or (loc / "cifar10-jpeg-q75").is_dir()
        ),
    ),
)
register_ood_set(
    "cifar100",
    OODSetInfo(
        _build_cifar_test("cifar100"),
        "",
        "cifar-100-python/ or cifar100-jpeg-q75/test/ (CIFAR-100 test split)",
        download=lambda root: tvd.CIFAR100(str(root), train=False, download=True),
        present=lambda loc: (
            (loc / "cifar-100-python").is_dir() or (loc / "cifar100-jpeg-q75").is_dir()
        ),
    ),
)


# -- corrupted sets (FSSD benchmark D: ImageNet-C-style shift) -------------------------------
def _corrupted_base(base: object) -> OODSetInfo:
    info = OOD_SETS.get(base) if isinstance(base, str) else None
    if info is None or base == "corrupted" or info.kind != "image" or info.subpath is None:
        usable = sorted(
            n
            for n, i in OOD_SETS.items()
            if i.kind == "image" and i.subpath is not None and n != "corrupted"
        )
        raise ValueError(
            f"'base' must name a registered image set with a default location, got {base!r}; "
            f"usable: {usable}"
        )
    return info


def _validate_corrupted(options: Mapping[str, Any]) -> None:
    missing = [k for k in ("base", "corruption", "severity") if k not in options]
    if missing:
        raise ValueError(
            f"a corrupted set needs {missing}: {{kind: corrupted, base: SET, corruption: NAME, "
            f"severity: 1..5}}; corruptions: {', '.join(CORRUPTIONS)}"
        )
    _corrupted_base(options["base"])
    check_corruption(options["corruption"], options["severity"])
    if options["severity"] == 0:
        raise ValueError("a corrupted set needs severity 1..5 (0 would be the clean base set)")
    for key in ("seed", "split_seed"):
        value = options.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")


def _build_corrupted(
    location: Path,
    input_shape: tuple[int, ...],
    *,
    base: str,
    corruption: str,
    severity: int,
    seed: int = 0,
    split_seed: int = 0,
) -> Dataset:
    """The corrupted half of ``base``'s test set; ``location`` is the data root of the base."""
    info = _corrupted_base(base)
    base_location = location / info.subpath  # type: ignore[operator]
    if not base_location.exists():
        raise FileNotFoundError(
            f"base set {base!r} of a corrupted set not found: {base_location} does not exist; "
            f"expected {info.expects}. Change --data.root or give the entry a path (the data "
            f"root {base} is found under)"
        )
    raw = info.builder(base_location, input_shape)
    spec = CorruptionSpec(corruption, severity, seed)
    corrupted = Corrupted(raw, spec, input_shape, stream=f"{base}/{corruption}/{severity}")
    return Subset(corrupted, corruption_halves(len(raw), split_seed)[1])


def id_test_view(
    raw_test: Dataset,
    id_name: str,
    ood_specs: Sequence[OODSpec],
    input_shape: Sequence[int],
    corruption: CorruptionSpec | None = None,
) -> Dataset:
    """The ID test reader the datamodule scores: with ``corruption`` (``test_corruption``),
    every image corrupted (stream ``test_corruption/<id_name>``); when a ``corrupted`` OOD set
    is built from the ID set itself, only the ID half (:func:`corruption_halves`).

    Raises:
        ValueError: corrupted sets of the ID set use different ``split_seed`` values.
    """
    ds = raw_test
    if corruption is not None:
        ds = Corrupted(ds, corruption, input_shape, stream=f"test_corruption/{id_name}")
    seeds = {
        s.options.get("split_seed", 0)
        for s in ood_specs
        if s.kind == "corrupted" and s.options.get("base") == id_name
    }
    if len(seeds) > 1:
        raise ValueError(
            f"corrupted sets of the ID set {id_name!r} use split_seed values {sorted(seeds)}: "
            "the ID half would overlap some corrupted half; use one split_seed"
        )
    if seeds:
        return Subset(ds, corruption_halves(len(raw_test), seeds.pop())[0])  # type: ignore[arg-type]
    return ds


register_ood_set(
    "corrupted",
    OODSetInfo(
        _build_corrupted,
        "",
        "a data root holding the base set (kind: corrupted, base: SET)",
        validate=_validate_corrupted,
    ),
)
