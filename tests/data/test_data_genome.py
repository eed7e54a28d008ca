"""Genome TSV format: synthetic generator, reader, errors, and the GenomeDataModule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_ood.data import GenomeDataModule, read_genome_tsv, write_synthetic_genome
from lightning_ood.data.genome import GENOME_FILES
from lightning_ood.models.lstm import GENOME_VOCAB

SMALL = {"n_train": 400, "n_val": 100, "n_test": 200, "n_ood_test": 150, "n_ood_val": 50}


@pytest.fixture(scope="module")
def genome_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("genome_root")
    write_synthetic_genome(root, seed=0, **SMALL)
    return root


def test_round_trip(genome_root: Path) -> None:
    folder = genome_root / "genome"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*GENOME_FILES.values(), "VERSION"])
    sizes = {"train": 400, "val": 100, "test": 200, "ood_test": 150, "ood_val": 50}
    for split, n in sizes.items():
        tokens, labels = read_genome_tsv(folder / GENOME_FILES[split])
        assert tokens.shape == (n, 250) and tokens.dtype == torch.long
        assert tokens.min() == 0 and tokens.max() == 3
        lo, hi = (0, 9) if not split.startswith("ood") else (10, 14)
        assert labels.min() == lo and labels.max() == hi
        counts = torch.bincount(labels - lo)
        assert counts.max() - counts.min() <= 1  # balanced classes
        # Decoding the tokens gives back the file's text exactly.
        lines = (folder / GENOME_FILES[split]).read_text().splitlines()
        decoded = ["".join(GENOME_VOCAB[t] for t in row) for row in tokens[:3].tolist()]
        assert [line.split("\t") for line in lines[:3]] == [
            [s, str(int(y))] for s, y in zip(decoded, labels[:3], strict=True)
        ]
    assert "seed=0" in (folder / "VERSION").read_text()


def test_seed_determinism(tmp_path: Path, genome_root: Path) -> None:
    a = write_synthetic_genome(tmp_path / "a", seed=0, **SMALL)
    b = write_synthetic_genome(tmp_path / "b", seed=1, **SMALL)
    for name in GENOME_FILES.values():
        assert (a / name).read_bytes() == (genome_root / "genome" / name).read_bytes()
        assert (b / name).read_bytes() != (a / name).read_bytes()


def _composition(tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens, 4).float().mean(1)


def test_classes_are_learnable_and_ood_differs(genome_root: Path) -> None:
    folder = genome_root / "genome"
    x, y = read_genome_tsv(folder / "train.tsv")
    xt, yt = read_genome_tsv(folder / "test.tsv")
    xo, _ = read_genome_tsv(folder / "ood_test.tsv")
    centroids = torch.stack([_composition(x[y == c]).mean(0) for c in range(10)])
    dist_id = torch.cdist(_composition(xt), centroids)
    accuracy = (dist_id.argmin(1) == yt).float().mean().item()
    assert accuracy > 0.6  # chance is 0.1; composition alone measured ~0.9 at n_train=5000
    dist_ood = torch.cdist(_composition(xo), centroids).min(1).values
    assert dist_ood.median() > dist_id.min(1).values.median()


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_letter_names_file_line_column(tmp_path: Path) -> None:
    good = "ACGT" * 62 + "AC"
    bad = good[:4] + "N" + good[5:]
    path = _write(tmp_path / "x.tsv", [f"{good}\t0", f"{bad}\t1"])
    with pytest.raises(ValueError) as exc:
        read_genome_tsv(path)
    assert str(exc.value) == (f"{path}, line 2, column 5: letter 'N' is not one of A, C, G, T")
    lower = _write(tmp_path / "y.tsv", [f"{good.lower()}\t0"])
    with pytest.raises(ValueError, match="line 1, column 1: letter 'a'"):
        read_genome_tsv(lower)


def test_malformed_lines(tmp_path: Path) -> None:
    good = "A" * 250
    with pytest.raises(ValueError, match=r"line 2: expected '<250 letters"):
        read_genome_tsv(_write(tmp_path / "a.tsv", [f"{good}\t0", f"{good[:-1]}\t0"]))
    with pytest.raises(ValueError, match=r"line 1: expected"):
        read_genome_tsv(_write(tmp_path / "b.tsv", [good]))
    with pytest.raises(ValueError, match=r"line 2: label 'x' is not an integer"):
        read_genome_tsv(_write(tmp_path / "c.tsv", [f"{good}\t-1", f"{good}\tx"]))
    with pytest.raises(ValueError, match="holds no sequences"):
        read_genome_tsv(_write(tmp_path / "d.tsv", [""]))
    with pytest.raises(FileNotFoundError, match=r"genome file .*missing.tsv not found"):
        read_genome_tsv(tmp_path / "missing.tsv")
    tokens, labels = read_genome_tsv(_write(tmp_path / "e.tsv", ["ACGT\t3", "TTGA\t-1"]), 4)
    assert tokens.tolist() == [[0, 1, 2, 3], [3, 3, 2, 0]] and labels.tolist() == [3, -1]


def test_datamodule(genome_root: Path) -> None:
    dm = GenomeDataModule(
        root=str(genome_root),
        batch_size=32,
        eval_batch_size=64,
        num_workers=0,
        ood_sets=["genome_ood"],
        val_ood_sets=["genome_ood"],
    )
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.num_classes, dm.input_shape, dm.id_name) == (10, (250,), "genome")
    assert dm.test_set_names == ["genome", "genome_ood"]
    assert dm.data_version.startswith("synthetic genome (write_synthetic_genome seed=0")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 250) and x.dtype == torch.long and y.dtype == torch.long
    folder = genome_root / "genome"
    val_tokens, val_labels = read_genome_tsv(folder / "val.tsv")
    vx, vy = next(iter(dm.val_dataloader()))
    assert torch.equal(vx, val_tokens[:64]) and torch.equal(vy, val_labels[:64])
    test_loader, ood_loader = dm.test_dataloader()
    assert (len(test_loader.dataset), len(ood_loader.dataset)) == (200, 150)
    ox, oy = next(iter(ood_loader))
    assert torch.equal(ox, read_genome_tsv(folder / "ood_test.tsv")[0][:64])
    assert torch.all(oy == -1)
    vox, voy = next(iter(dm.val_ood_dataloaders()["genome_ood"]))  # ood_val.tsv, not ood_test
    assert len(dm.val_ood_dataloaders()["genome_ood"].dataset) == 50
    assert torch.equal(vox, read_genome_tsv(folder / "ood_val.tsv")[0][:50])
    assert torch.all(voy == -1)
    fx = torch.cat([b[0] for b in dm.train_eval_dataloader()])
    assert torch.equal(fx, read_genome_tsv(folder / "train.tsv")[0])


def test_synthetic_flag_and_errors(tmp_path: Path) -> None:
    dm = GenomeDataModule(root=str(tmp_path), num_workers=0, seq_len=50, train_every=1000)
    with pytest.raises(FileNotFoundError, match=r"Genome data not found .*set synthetic: true"):
        dm.setup()
    dm = GenomeDataModule(root=str(tmp_path), num_workers=0, seq_len=50, synthetic=True)
    dm.prepare_data()
    dm.setup()
    assert next(iter(dm.train_dataloader()))[0].shape == (64, 50)
    # Refuse to overwrite a partly filled folder.
    (tmp_path / "genome" / "train.tsv").unlink()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        GenomeDataModule(root=str(tmp_path), num_workers=0, synthetic=True).prepare_data()


def test_id_label_range_checked(tmp_path: Path) -> None:
    write_synthetic_genome(tmp_path, seed=3, **SMALL)
    dm = GenomeDataModule(root=str(tmp_path), num_workers=0, num_classes=5)
    with pytest.raises(ValueError, match=r"train.tsv: ID labels span 0..9, expected 0..4"):
        dm.setup()
    with pytest.raises(ValueError, match="need seq_len >= 1"):
        GenomeDataModule(seq_len=0)
