"""``combiners_from`` (issue 21, item 10): an earlier run's per-set combiners are checked
completely when the test run is set up, before any pass over the data; every refusal names
the file, the detector/set key and the fix."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood.callbacks import OODEvaluation
from lightning_ood.detectors import build_detector
from lightning_ood.detectors.layer_ensemble import LayerEnsembleDetector
from lightning_ood.protocol import COMBINER_FIELDS
from lightning_ood.task import ClassificationTask

FSSD = {"fssd": {"taps": ["conv2", "fc1"], "n_noise": 8}}
#: A fitted two-component combiner, as ood_results.json holds it.
GOOD = {
    "combiner_coef": [0.5, -0.25],
    "combiner_intercept": 0.125,
    "combiner_mean": [0.0, 1.0],
    "combiner_scale": [1.0, 2.0],
    "combiner_fitted": True,
}


class Toy(LightningDataModule):
    """Random 1x28x28 images: 'toy' (ID, 40) and a shifted 'far' OOD set (48)."""

    id_name = "toy"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.train = TensorDataset(torch.rand(64, 1, 28, 28, generator=g), torch.arange(64) % 10)
        self.test = TensorDataset(torch.rand(40, 1, 28, 28, generator=g), torch.arange(40) % 10)
        self.ood = TensorDataset(3 + torch.rand(48, 1, 28, 28, generator=g), torch.full((48,), -1))
        self.test_set_names = ["toy", "far"]

    def train_eval_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=32)

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.test, batch_size=16), DataLoader(self.ood, batch_size=16)]


class CountingTask(ClassificationTask):
    """Counts its test steps: a refusal must come before the first."""

    steps = 0

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        self.steps += 1
        return super().test_step(*args, **kwargs)


def _record(combiner: Any = None, **top: Any) -> dict[str, Any]:
    record = {
        "combiners": {"fssd": {"far": GOOD if combiner is None else combiner}},
        "validation": {"held_out_per_set": 10, "seed": 42},
    }
    return {**record, **top}


def _run(tmp_path: Path, record: Any, task: CountingTask) -> OODEvaluation:
    source = tmp_path / "ood_results.json"
    if isinstance(record, bytes):
        source.write_bytes(record)
    else:
        source.write_text(json.dumps(record))  # NaN and Infinity as Python's json writes them
    cb = OODEvaluation(
        detectors=FSSD,
        per_set_holdout=10,
        results_dir=str(tmp_path / "out"),
        progress=False,
        figures=False,
        combiners_from=str(source),
    )
    trainer = Trainer(
        default_root_dir=tmp_path,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
    )
    trainer.test(task, datamodule=Toy())
    return cb


def _task() -> CountingTask:
    torch.manual_seed(0)
    return CountingTask(model="lenet", num_classes=10)


def test_the_record_holds_exactly_the_combiner_buffers() -> None:
    det = build_detector("mahalanobis", {"taps": ["a", "b"]})
    assert isinstance(det, LayerEnsembleDetector)
    assert sorted(det.combiner_state()) == sorted(COMBINER_FIELDS)


def test_an_intact_fitted_record_is_loaded_and_applied(tmp_path: Path) -> None:
    task = _task()
    cb = _run(tmp_path, _record(), task)
    assert task.steps == 40 // 16 + 1 + 48 // 16  # every batch of both sets was scored
    assert cb.results["combiners"]["fssd"]["far"] == GOOD  # loaded as written, not refitted
    assert cb.results["validation"]["combiners_from"] == str(tmp_path / "ood_results.json")
    n = cb.results["metrics"]["fssd[per-set]"]["far"]  # the per-set protocol's row
    assert (n["n_id"], n["n_ood"]) == (30, 38)  # the same 10 per set held out as the source run


BAD: list[tuple[str, Any, str]] = [
    (
        "not fitted",
        _record({**GOOD, "combiner_fitted": False}),
        r"combiners\['fssd'\]\['far'\]\.combiner_fitted is false: that run fitted no combiner",
    ),
    (
        "fitted flag a string",
        _record({**GOOD, "combiner_fitted": "true"}),
        r"\['far'\]\.combiner_fitted must be true, got 'true'",
    ),
    (
        "a field missing",
        _record({k: v for k, v in GOOD.items() if k != "combiner_mean"}),
        r"combiners\['fssd'\]\['far'\] lacks \['combiner_mean'\]",
    ),
    (
        "an unknown field",
        _record({**GOOD, "combiner_bias": 1.0}),
        r"combiners\['fssd'\]\['far'\] has unknown fields \['combiner_bias'\]",
    ),
    (
        "a weight that is text",
        _record({**GOOD, "combiner_coef": [0.5, "x"]}),
        r"\['far'\]\.combiner_coef must be a list of 2 finite numbers .*got \[0\.5, 'x'\]",
    ),
    (
        "a NaN weight",
        _record({**GOOD, "combiner_coef": [math.nan, 1.0]}),
        r"\['far'\]\.combiner_coef must be a list of 2 finite numbers .*got \[nan, 1\.0\]",
    ),
    (
        "a boolean weight",
        _record({**GOOD, "combiner_coef": [True, 1.0]}),
        r"\['far'\]\.combiner_coef must be a list of 2 finite numbers",
    ),
    (
        "weights a number",
        _record({**GOOD, "combiner_coef": 0.5}),
        r"\['far'\]\.combiner_coef must be a list of 2 finite numbers .*got 0\.5",
    ),
    (
        "an intercept list",
        _record({**GOOD, "combiner_intercept": [0.1]}),
        r"\['far'\]\.combiner_intercept must be a finite number, got \[0\.1\]",
    ),
    (
        "means of another length",
        _record({**GOOD, "combiner_mean": [0.0, 1.0, 2.0]}),
        r"combiner_mean of 'fssd' for 'far' has 3 values, but 'fssd' has 2 components",
    ),
    (
        "a zero scale",
        _record({**GOOD, "combiner_scale": [1.0, 0.0]}),
        r"\['far'\]\.combiner_scale must be positive",
    ),
    (
        "a set record that is a list",
        _record([0.5, -0.25]),
        r"combiners\['fssd'\]\['far'\] must be a mapping of \['combiner_coef'",
    ),
    (
        "a detector record that is a list",
        {**_record(), "combiners": {"fssd": [GOOD]}},
        r"combiners\['fssd'\] must map OOD set names to combiner records, got list",
    ),
    (
        "validation a list",
        _record(validation=[10, 42]),
        r"is not an ood_results\.json .*needs a 'combiners' and a 'validation' mapping",
    ),
    (
        "a held-out size that is text",
        _record(validation={"held_out_per_set": "10", "seed": 42}),
        r"validation\.held_out_per_set must be an integer >= 0, got '10'",
    ),
    ("not JSON", b"\x80\x81 binary", r"is not JSON"),
]


@pytest.mark.parametrize(("record", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_malformed_record_is_refused_at_setup(tmp_path: Path, record: Any, match: str) -> None:
    source = str(tmp_path / "ood_results.json")
    task = _task()
    with pytest.raises(ValueError, match=match) as err:
        _run(tmp_path, copy.deepcopy(record), task)
    message = str(err.value)
    assert f"combiners_from={source!r}" in message  # names the file
    assert "give the ood_results.json" in message or "use a run with the same" in message  # fix
    assert task.steps == 0 and not (tmp_path / "out").exists()  # refused before any pass
