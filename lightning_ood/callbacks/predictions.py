"""``lightning-ood predict``: per-sample scores and ID/OOD decisions to one CSV file."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from lightning_ood.data.readers import locate
from lightning_ood.io import atomic_write_text


class PredictionCSVWriter(BasePredictionWriter):
    """Write ``set, position, index, path, target, pred, class, <det>_score, <det>_is_ood...``.

    ``position`` is the row's rank among the samples scored from its set (the loaders shard
    without padding, so each sample appears once whatever the number of ranks); ``index`` is
    the sample's position in the *full* set, so a thinned set (``ood_every``/``test_every``:
    every k-th sample) still maps back to its source; ``path`` is the image file for
    folder-based sets (empty for array files such as idx). Each rank streams its rows to a
    hidden part file; after the last batch rank 0 merges them in (set, position) order into
    ``output`` atomically, so a killed run never leaves a partial CSV under that name.

    Args:
        output: the CSV path; default ``predictions.csv`` in the run's log directory
            (``<log_root>/<experiment>/version_N/`` under the CLI), so every run writes its own.
        overwrite: replace an existing ``output``; otherwise the run is refused before any
            prediction, so an earlier run's file is never lost.
    """

    def __init__(self, output: str | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self._requested = output
        self.output = Path(output) if output else None
        self.overwrite = overwrite
        self._writer: Any = None
        self._file: Any = None
        self._seen: dict[int, int] = {}
        self._columns: list[str] | None = None

    @staticmethod
    def refuse_existing(output: str | Path | None, overwrite: bool) -> None:
        """The one rule that keeps an earlier run's predictions: an existing ``output`` is
        refused unless ``overwrite`` (checked again at predict start, and by the CLI before
        the trainer is built)."""
        if output is not None and Path(output).exists() and not overwrite:
            raise FileExistsError(
                f"{output} already exists and holds the predictions of an earlier run; write "
                "this run's elsewhere (--predictions NEW.csv, or leave it out for a new file in "
                "the run's log folder) or pass --overwrite true to replace it."
            )

    def _part(self, rank: int) -> Path:
        assert self.output is not None, "the output path is resolved in on_predict_start"
        return self.output.parent / f".{self.output.name}.rank{rank}.part"

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # trainer.log_dir broadcasts under DDP: every rank asks for it
        self.output = Path(self._requested or default_prediction_path(trainer))
        self.refuse_existing(self.output, self.overwrite)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._part(trainer.global_rank), "w", newline="")  # noqa: SIM115
        self._writer = csv.writer(self._file)
        self._seen = {}
        self._columns = ["set", "position", "index", "path", "target", "pred", "class"]
        for name, det in pl_module.detectors.items():
            if det.is_fitted and det.is_calibrated:
                self._columns += [f"{name}_score", f"{name}_is_ood"]

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        names = _set_names(trainer)
        set_name = names[dataloader_idx] if dataloader_idx < len(names) else str(dataloader_idx)
        classes = list(getattr(pl_module, "data_meta", {}).get("class_names") or [])
        dets = list(prediction["scores"])
        rank, world = trainer.global_rank, trainer.world_size
        start = self._seen.get(dataloader_idx, 0)
        pred = prediction["pred"].tolist()
        self._seen[dataloader_idx] = start + len(pred)
        target = batch[1].tolist() if isinstance(batch, list | tuple) and len(batch) > 1 else None
        scores = {d: prediction["scores"][d].tolist() for d in dets}
        flags = {d: prediction["is_ood"][d].tolist() for d in dets}
        loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, list | tuple) else loaders
        for i, p in enumerate(pred):
            position = rank + (start + i) * world  # EvalShardedSampler: rank r reads r, r+w, ...
            index, path = locate(loader.dataset, position)
            row: list[Any] = [
                set_name,
                position,
                index,
                path,
                "" if target is None else target[i],
                p,
                classes[p] if p < len(classes) else p,
            ]
            for d in dets:
                row += [repr(scores[d][i]), int(flags[d][i])]
            self._writer.writerow(row)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._file.close()
        trainer.strategy.barrier("prediction parts written")
        if trainer.is_global_zero:
            order = {n: i for i, n in enumerate(_set_names(trainer))}
            rows: list[list[str]] = []
            parts = [self._part(r) for r in range(trainer.world_size)]
            for part in parts:
                with open(part, newline="") as f:
                    rows.extend(csv.reader(f))
            rows.sort(key=lambda r: (order.get(r[0], len(order)), int(r[1])))
            atomic_write_text(self.output, _rows_to_csv([self._columns or [], *rows]))
            for part in parts:
                part.unlink(missing_ok=True)
            rank_zero_info(f"[lightning_ood] wrote {len(rows)} predictions to {self.output}")
        trainer.strategy.barrier("predictions merged")


def _rows_to_csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _set_names(trainer: Trainer) -> list[str]:
    dm = trainer.datamodule
    return list(getattr(dm, "predict_set_names", None) or [])


def default_prediction_path(trainer: Trainer) -> str:
    """``predictions.csv`` in the run's own log directory (a new ``version_N`` per run under the
    CLI's TensorBoard logger), so a second ``predict`` never replaces the first one's file."""
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions.csv")
