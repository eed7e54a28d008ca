"""Genome sequences (the FSSD paper's bacteria-genome benchmark; Ren et al. 2019) on disk.

Format: ``<root>/genome/{train,val,test,ood_test,ood_val}.tsv``, one sample per line::

    <sequence>\\t<label>

* ``sequence``: exactly ``seq_len`` (250) upper-case letters over A, C, G, T, mapped to
  tokens A=0, C=1, G=2, T=3 (vocabulary size 4). Any other letter is an error that names
  the file, line and column.
* ``label``: an integer; 0..num_classes-1 in the ID files (train/val/test). The OOD files
  (``ood_test``/``ood_val``) keep their original class ids (e.g. 10..14); the datamodule
  yields -1 for every OOD sample.
* An optional ``VERSION`` file holds one line naming the data (reported as ``data_version``).

The real dataset is not distributed here; :func:`write_synthetic_genome` writes a seeded,
class-conditional stand-in in this format so that the pipeline can be exercised end to end.

This module holds the whole genome family: the format and reader, the synthetic writer, the
``genome_ood`` OOD set (registered here, beside its reader) and :class:`GenomeDataModule`.
The letters and their token order are the model's :data:`~lightning_ood.models.lstm.GENOME_VOCAB`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_ood.data.base import OODDataModule
from lightning_ood.data.ood_sets import OODSetInfo, register_ood_set
from lightning_ood.models.lstm import GENOME_VOCAB

#: Sequence length of the bacteria-genome benchmark.
SEQ_LEN = 250
#: Split name -> file name under ``<root>/genome``.
GENOME_FILES: dict[str, str] = {
    "train": "train.tsv",
    "val": "val.tsv",
    "test": "test.tsv",
    "ood_test": "ood_test.tsv",
    "ood_val": "ood_val.tsv",
}
GENOME_DIR = "genome"

#: The vocabulary's letters as bytes, in token order (A=0, C=1, G=2, T=3).
_LETTERS = "".join(GENOME_VOCAB).encode()
_LOOKUP = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(_LETTERS):
    _LOOKUP[_c] = _i


def read_genome_tsv(path: str | Path, seq_len: int = SEQ_LEN) -> tuple[Tensor, Tensor]:
    """Parse one TSV file into tokens (N, seq_len) long and labels (N,) long.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a malformed line or a letter outside A/C/G/T (file, line and column named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"genome file {path} not found: expected lines '<{seq_len} letters ACGT>\\t<label>' "
            "(see lightning_ood.data.genome; write_synthetic_genome() writes a stand-in)"
        )
    lines = path.read_bytes().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"genome file {path} holds no sequences")
    fields = [line.rstrip(b"\r").split(b"\t") for line in lines]
    for i, parts in enumerate(fields):
        if len(parts) != 2 or len(parts[0]) != seq_len:
            got = line_preview(lines[i])
            raise ValueError(
                f"{path}, line {i + 1}: expected '<{seq_len} letters over ACGT><TAB><label>', "
                f"got {got}"
            )
    seqs = np.frombuffer(b"".join(p[0] for p in fields), dtype=np.uint8).reshape(-1, seq_len)
    tokens = _LOOKUP[seqs]
    bad = np.flatnonzero(tokens == 255)
    if bad.size:
        row, col = divmod(int(bad[0]), seq_len)
        letter = chr(seqs[row, col])
        raise ValueError(
            f"{path}, line {row + 1}, column {col + 1}: letter {letter!r} is not one of A, C, G, T"
        )
    try:
        labels = [int(p[1]) for p in fields]
    except ValueError:
        row = next(i for i, p in enumerate(fields) if not p[1].strip().lstrip(b"-").isdigit())
        raise ValueError(
            f"{path}, line {row + 1}: label {fields[row][1].decode(errors='replace')!r} is not "
            "an integer"
        ) from None
    return torch.from_numpy(tokens.astype(np.int64)), torch.tensor(labels, dtype=torch.long)


def line_preview(line: bytes, width: int = 40) -> str:
    """A short printable view of a bad line for error messages."""
    text = line.decode(errors="replace")
    return repr(text if len(text) <= width else f"{text[:width]}... ({len(text)} chars)")


class GenomeSequences(Dataset):
    """Token sequences from one TSV file: samples are ``(tokens (seq_len,) long, label)``."""

    def __init__(self, path: str | Path, seq_len: int = SEQ_LEN) -> None:
        self.path = Path(path)
        self.tokens, self.labels = read_genome_tsv(self.path, seq_len)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.tokens[index], int(self.labels[index])


def write_synthetic_genome(
    root: str | Path,
    n_train: int = 5000,
    n_val: int = 1000,
    n_test: int = 1000,
    n_ood_test: int = 1000,
    n_ood_val: int = 1000,
    num_classes: int = 10,
    num_ood_classes: int = 5,
    seq_len: int = SEQ_LEN,
    motif_len: int = 8,
    motifs_per_seq: int = 4,
    concentration: float = 4.0,
    seed: int = 0,
) -> Path:
    """Write a seeded, class-conditional synthetic genome set in the documented TSV format.

    Every class c (ID 0..num_classes-1, OOD num_classes..num_classes+num_ood_classes-1) has
    its own base composition p_c ~ Dirichlet(concentration·1) and its own motif of
    ``motif_len`` bases; a sequence draws its bases i.i.d. from p_c and carries its class's
    motif at ``motifs_per_seq`` random positions. Composition and motif make the classes
    learnable (a BiLSTM or even a composition centroid separates them), and OOD classes
    differ from every ID class in both. The same seed writes byte-identical files.

    Returns:
        The folder ``<root>/genome`` that now holds the five TSV files and ``VERSION``.
    """
    counts = {
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "n_ood_test": n_ood_test,
        "n_ood_val": n_ood_val,
    }
    for name, n in counts.items():
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    if not 0 < motif_len <= seq_len:
        raise ValueError(f"motif_len must be in (0, seq_len={seq_len}], got {motif_len}")
    if num_classes < 1 or num_ood_classes < 1:
        raise ValueError("num_classes and num_ood_classes must be >= 1")
    rng = np.random.default_rng(seed)
    total = num_classes + num_ood_classes
    compositions = rng.dirichlet(np.full(4, concentration), size=total)
    cdf = np.cumsum(compositions, axis=1)
    motifs = rng.integers(0, 4, size=(total, motif_len))

    def sample(classes: np.ndarray) -> np.ndarray:
        u = rng.random((len(classes), seq_len))
        # Inverse-CDF sampling of each base from its class composition.
        tokens = (u[..., None] > cdf[classes][:, None, :3]).sum(-1)
        starts = rng.integers(0, seq_len - motif_len + 1, size=(len(classes), motifs_per_seq))
        cols = starts[..., None] + np.arange(motif_len)
        rows = np.arange(len(classes))[:, None, None]
        tokens[rows, cols] = motifs[classes][:, None, :]
        return tokens

    def balanced(n: int, first: int, count: int) -> np.ndarray:
        return first + rng.permutation(np.arange(n) % count)

    out = Path(root) / GENOME_DIR
    out.mkdir(parents=True, exist_ok=True)
    letters = np.frombuffer(_LETTERS, dtype=np.uint8)
    plan = {
        "train": balanced(n_train, 0, num_classes),
        "val": balanced(n_val, 0, num_classes),
        "test": balanced(n_test, 0, num_classes),
        "ood_test": balanced(n_ood_test, num_classes, num_ood_classes),
        "ood_val": balanced(n_ood_val, num_classes, num_ood_classes),
    }
    for split, classes in plan.items():
        seqs = letters[sample(classes)]
        text = b"".join(
            row.tobytes() + b"\t" + str(int(c)).encode() + b"\n"
            for row, c in zip(seqs, classes, strict=True)
        )
        (out / GENOME_FILES[split]).write_bytes(text)
    (out / "VERSION").write_text(
        f"synthetic genome (write_synthetic_genome seed={seed}, {num_classes} ID + "
        f"{num_ood_classes} OOD classes, seq_len={seq_len}, n_train={n_train})\n"
    )
    return out


# -- the genome OOD set ----------------------------------------------------------------------
def _build_genome(location: Path, input_shape: tuple[int, ...]) -> Dataset:
    return GenomeSequences(location, seq_len=input_shape[0])


register_ood_set(
    "genome_ood",
    OODSetInfo(
        _build_genome,
        f"{GENOME_DIR}/{GENOME_FILES['ood_test']}",
        "OOD genome sequences, one '<sequence>\\t<label>' per line (lightning_ood.data.genome)",
        val_subpath=f"{GENOME_DIR}/{GENOME_FILES['ood_val']}",
        kind="tokens",
    ),
)


# -- the datamodule --------------------------------------------------------------------------
class GenomeDataModule(OODDataModule):
    """Bacteria-genome style sequences from ``<root>/genome/*.tsv`` (format:
    :mod:`lightning_ood.data.genome`); samples are ``(tokens (seq_len,) long, label)``.

    Validation uses ``val.tsv``; ``ood_sets: [genome_ood]`` reads ``ood_test.tsv`` and
    ``val_ood_sets: [genome_ood]`` reads ``ood_val.tsv``.

    Args:
        seq_len: sequence length (250 in the benchmark).
        num_classes: number of ID classes (10).
        synthetic: when the files are missing, write the seeded synthetic stand-in
            (:func:`~lightning_ood.data.write_synthetic_genome`) into ``<root>/genome`` in
            ``prepare_data`` (``root`` must then be writable).
        **kwargs: the :class:`OODDataModule` arguments.
    """

    id_name = "genome"
    display_name = "Genome"

    def __init__(
        self, seq_len: int = 250, num_classes: int = 10, synthetic: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if seq_len < 1 or num_classes < 2:
            raise ValueError(
                f"need seq_len >= 1 and num_classes >= 2, got {seq_len}, {num_classes}"
            )
        self.seq_len = seq_len
        self._num_classes = num_classes
        self.synthetic = synthetic

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    def _files(self, root: Path) -> dict[str, Path]:
        return {s: root / GENOME_DIR / GENOME_FILES[s] for s in ("train", "val", "test")}

    def _id_present(self, root: Path) -> bool:
        return all(p.is_file() for p in self._files(root).values())

    def prepare_data(self) -> None:
        root, _ = self.resolved_root()
        if self.synthetic and not self._id_present(root):
            folder = root / GENOME_DIR
            existing = [n for n in GENOME_FILES.values() if (folder / n).is_file()]
            if existing:
                raise FileExistsError(
                    f"{folder} already holds {existing} but not every ID file; refusing to "
                    "overwrite it with synthetic data (set synthetic: false or clear the folder)"
                )
            write_synthetic_genome(root, num_classes=self._num_classes, seq_len=self.seq_len)
        super().prepare_data()

    def _load_id(self, root: Path) -> dict[str, Dataset]:
        files = self._files(root)
        missing = [p.name for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Genome data not found under {root / GENOME_DIR}: expected "
                f"{', '.join(GENOME_FILES.values())} (missing: {', '.join(missing)}); see "
                "lightning_ood.data.genome for the format, or set synthetic: true to write a "
                "synthetic stand-in"
            )
        sets = {split: GenomeSequences(path, self.seq_len) for split, path in files.items()}
        for split, ds in sets.items():
            lo, hi = int(ds.labels.min()), int(ds.labels.max())
            if lo < 0 or hi >= self._num_classes:
                raise ValueError(
                    f"{files[split]}: ID labels span {lo}..{hi}, expected 0.."
                    f"{self._num_classes - 1} (num_classes={self._num_classes})"
                )
        version = root / GENOME_DIR / "VERSION"
        self._data_version = (
            version.read_text().strip()
            if version.is_file()
            else f"genome TSV ({root / GENOME_DIR})"
        )
        return dict(sets)
