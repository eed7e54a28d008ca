"""OODEvaluation on a toy datamodule: fitting at test start, reporting, and bad input."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood.callbacks import OODEvaluation
from lightning_ood.detectors import DETECTORS, Energy
from lightning_ood.distributed import ProcessGroupOwnership
from lightning_ood.metrics import ood_metrics
from lightning_ood.protocol import Protocol
from lightning_ood.report import format_markdown
from lightning_ood.task import ClassificationTask


class ToyData(LightningDataModule):
    """Random 1x28x28 images: 'toy' (ID) and a shifted 'far' OOD set."""

    id_name = "toy"
    data_version = "toy random tensors"

    def __init__(self, n_ood: int = 48) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.train = TensorDataset(torch.rand(96, 1, 28, 28, generator=g), torch.arange(96) % 10)
        self.test = TensorDataset(torch.rand(40, 1, 28, 28, generator=g), torch.arange(40) % 10)
        self.ood = TensorDataset(
            3 + torch.rand(n_ood, 1, 28, 28, generator=g), torch.full((n_ood,), -1)
        )
        self.test_set_names = ["toy", "far"]

    def fit_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=32)

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.test, batch_size=16), DataLoader(self.ood, batch_size=16)]


def _trainer(tmp_path: Path, cb: OODEvaluation, **kw: object) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=kw.pop("inference_mode", False),
        **kw,
    )


def test_fits_at_test_start_and_reports_exact_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cb = OODEvaluation(
        detectors={"energy": {}, "line": {}}, results_dir=str(tmp_path), progress=False
    )
    task = ClassificationTask(model="lenet", num_classes=10)
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, cb).test(task, datamodule=ToyData())
    assert "holds no fitted state for detectors ['line']" in caplog.text
    assert task.detectors["line"].is_fitted
    # the reported energy metrics equal the functional metrics on the scores computed directly
    dm = ToyData()
    task.eval()
    with torch.no_grad():
        s_id = Energy().score(task.extract(dm.test.tensors[0]))
        s_ood = Energy().score(task.extract(dm.ood.tensors[0]))
    expected = ood_metrics(s_id.double(), s_ood.double())
    got = cb.results["metrics"]["energy"]["far"]
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
    assert (got["n_id"], got["n_ood"]) == (40, 48)
    assert (tmp_path / "ood_results.md").read_text() == format_markdown(cb.results)
    assert not list(tmp_path.glob(".ood_results*"))  # no temp files left behind


class NaNDetector(Energy):
    kind: ClassVar[str] = "nan_test"

    def score(self, out, model=None, inputs=None):  # type: ignore[no-untyped-def]
        s = super().score(out).clone()
        s[:2] = math.nan
        return s


def test_non_finite_scores_are_reported_not_folded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # registered for this test only (the registry is read-only to library code)
    monkeypatch.setitem(DETECTORS._classes, "nan_test", NaNDetector)  # type: ignore[attr-defined]
    monkeypatch.setitem(DETECTORS._origin, "nan_test", __name__)  # type: ignore[attr-defined]
    cb = OODEvaluation(
        detectors={"nan_test": {}, "energy": {}}, results_dir=str(tmp_path), progress=False
    )
    task = ClassificationTask(model="lenet", num_classes=10)
    with pytest.warns(UserWarning, match="non-finite scores on 'far'"):
        _trainer(tmp_path, cb).test(task, datamodule=ToyData())
    bad = cb.results["metrics"]["nan_test"]["far"]
    assert math.isnan(bad["auroc"]) and math.isnan(bad["fpr95"])
    assert (bad["nonfinite_id"], bad["nonfinite_ood"]) == (6, 6)  # 2 per batch of 16/8
    assert not math.isnan(cb.results["metrics"]["energy"]["far"]["auroc"])


def test_unknown_detector_name_is_rejected_at_config_time() -> None:
    with pytest.raises(ValueError, match=r"unknown detector 'lien'.*known detectors: \[.*'line'"):
        OODEvaluation(detectors={"lien": {}})
    with pytest.raises(ValueError, match="unknown detector 'nope' \\(config entry 'x'\\)"):
        OODEvaluation(detectors={"x": {"type": "nope"}})


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        ({"line": {"p_a": 100}}, "p_a"),
        ({"line": {"p_w": -1}}, "p_w"),
        ({"line": {"delta": 0.0}}, "delta"),
        ({"odin": {"epsilon": -0.1}}, "epsilon"),
        ({"odin": {"temperature": 0.0}}, "temperature"),
        ({"dice": {"p": 100.0}}, "p"),
        ({"fssd": {"epsilon": -1.0}}, "epsilon"),
    ],
)
def test_out_of_range_hyperparameters_fail_at_config_time(spec: dict, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        OODEvaluation(detectors=spec)


def test_empty_ood_set_is_an_error(tmp_path: Path) -> None:
    cb = OODEvaluation(detectors={"energy": {}}, results_dir=str(tmp_path), progress=False)
    task = ClassificationTask(model="lenet", num_classes=10)
    with pytest.raises(ValueError, match="test set 'far' produced no samples"):
        _trainer(tmp_path, cb).test(task, datamodule=ToyData(n_ood=0))


def test_gradient_detectors_refuse_inference_mode(tmp_path: Path) -> None:
    cb = OODEvaluation(detectors={"odin": {}}, results_dir=str(tmp_path), progress=False)
    task = ClassificationTask(model="lenet", num_classes=10)
    with pytest.raises(RuntimeError, match="inference_mode: false"):
        _trainer(tmp_path, cb, inference_mode=True).test(task, datamodule=ToyData())


def test_holdout_only_for_multi_tap_ensembles_and_never_moves_other_rows(
    tmp_path: Path,
) -> None:
    """Only a layer ensemble with more than one tap is reported on the hold-out's remainder;
    every other detector keeps every sample, so adding FSSD (or a single-tap Mahalanobis, which
    fits no combiner) leaves Energy's numbers exactly as they were."""
    results = {}
    for name, dets in {
        "alone": {"energy": {}},
        "with_ensembles": {
            "energy": {},
            "fssd": {"taps": ["conv2", "fc1"], "n_noise": 8},
            "maha1": {"type": "mahalanobis", "taps": ["fc1"]},
        },
    }.items():
        cb = OODEvaluation(
            detectors=dets, per_set_holdout=10, results_dir=str(tmp_path / name), progress=False
        )
        torch.manual_seed(0)
        task = ClassificationTask(model="lenet", num_classes=10)
        _trainer(tmp_path / name, cb).test(task, datamodule=ToyData())
        results[name] = cb.results
    got = results["with_ensembles"]
    far = {d: (m["far"]["n_id"], m["far"]["n_ood"]) for d, m in got["metrics"].items()}
    # the shipped FSSD on every sample; the papers' per-set protocol as its own row
    assert far == {
        "energy": (40, 48), "fssd": (40, 48), "fssd[per-set]": (30, 38), "maha1": (40, 48)
    }  # fmt: skip
    assert got["metrics"]["energy"] == results["alone"]["metrics"]["energy"]
    assert got["validation"]["held_out_for"] == ["fssd"]
    assert set(got["combiners"]["fssd"]["far"]) >= {"combiner_coef", "combiner_intercept"}
    assert "maha1" not in got["combiners"]


class NoisyToyData(ToyData):
    """ToyData with both test sets corrupted by seeded Gaussian noise (FSSD Figure 5), the OOD
    set moved near the ID one so that no detector separates them perfectly."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        for ds, shift in ((self.test, 0.0), (self.ood, -2.9)):
            x = ds.tensors[0] + shift
            ds.tensors = (x + torch.randn(x.shape, generator=g), ds.tensors[1])


def test_combiners_from_a_clean_run_are_loaded_under_corruption(tmp_path: Path) -> None:
    fssd = {"fssd": {"taps": ["conv2", "fc1"], "n_noise": 8}, "energy": {}}

    def run(name: str, data: ToyData, **kw: object) -> dict:
        kw = {"detectors": fssd, **kw}
        cb = OODEvaluation(
            per_set_holdout=10, results_dir=str(tmp_path / name), progress=False, **kw
        )
        torch.manual_seed(0)
        task = ClassificationTask(model="lenet", num_classes=10)
        _trainer(tmp_path / name, cb).test(task, datamodule=data)
        return cb.results

    clean = run("clean", ToyData())
    source = str(tmp_path / "clean" / "ood_results.json")
    refit = run("refit", NoisyToyData())
    fixed = run("fixed", NoisyToyData(), combiners_from=source)
    assert fixed["combiners"] == clean["combiners"] != refit["combiners"]
    assert fixed["validation"]["combiners_from"] == source
    assert refit["validation"]["combiners_from"] is None
    # Same reported samples as the refit run; only the combined detector's numbers move.
    assert fixed["metrics"]["energy"] == refit["metrics"]["energy"]
    # combiners_from replaces the per-set protocol's combiners; the shipped row is unchanged
    per_set = "fssd[per-set]"
    assert fixed["metrics"][per_set]["far"]["n_ood"] == refit["metrics"][per_set]["far"]["n_ood"]
    assert fixed["metrics"][per_set]["far"]["auroc"] != refit["metrics"][per_set]["far"]["auroc"]
    assert fixed["metrics"]["fssd"] == refit["metrics"]["fssd"]
    other_taps = {"fssd": {"taps": ["conv1", "conv2", "fc1"], "n_noise": 8}}
    for kw, match in [
        ({"combiners_from": str(tmp_path / "nope.json")}, r"nope.json' does not exist"),
        ({"combiners_from": source, "detectors": other_taps}, r"has 2 weights, but 'fssd' has 3"),
        ({"combiners_from": source, "per_set_seed": 3}, r"held out 10 samples per set with"
         r" seed 42, this run per_set_holdout=10, per_set_seed=3"),
    ]:  # fmt: skip
        where = "lightning_ood.callbacks.evaluation"
        with (
            mock.patch(f"{where}.fit_with_trainer") as fit,
            pytest.raises((FileNotFoundError, ValueError), match=match),
        ):
            run("bad", NoisyToyData(), **kw)
        assert fit.call_count == 0  # refused at setup: no pass ran


def test_holdout_sizes_are_checked_before_any_pass(tmp_path: Path) -> None:
    fssd = {"fssd": {"taps": ["conv2", "fc1"], "n_noise": 8}}
    for size, match in [
        (3, r"per_set_holdout=3 is too small for detector 'fssd'.*at least 5"),
        (40, r"test set 'toy' has 40 samples but per_set_holdout=40"),
    ]:
        cb = OODEvaluation(detectors=fssd, per_set_holdout=size, progress=False)
        task = ClassificationTask(model="lenet", num_classes=10)
        where = "lightning_ood.callbacks.evaluation"
        with (
            mock.patch(f"{where}.fit_with_trainer") as fit,
            mock.patch(f"{where}.engine.score_batch") as score,
            pytest.raises(ValueError, match=match),
        ):
            _trainer(tmp_path, cb).test(task, datamodule=ToyData())
        assert fit.call_count == score.call_count == 0  # refused at setup: no pass ran


class ProcessGroupSpy(Callback):
    """Whether a default process group exists while the test loop runs, and once the callbacks
    listed before this one have torn down; also written to ``<out>/pg_rank<r>.json``, since a
    ``ddp_spawn`` worker's attributes do not come back to the launching process."""

    def __init__(self, out: Path | None = None) -> None:
        self.out = out
        self.during: bool | None = None
        self.after: bool | None = None

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.during = dist.is_initialized()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.after = dist.is_initialized()
        if self.out is not None:
            path = self.out / f"pg_rank{trainer.global_rank}.json"
            path.write_text(json.dumps([self.during, self.after]))


@pytest.mark.integration  # ~40 s of ddp_spawn workers; the default suite keeps to 8 minutes
def test_ddp_fit_and_scores_match_single_process(tmp_path: Path) -> None:
    """Two CPU ranks (gloo): sharded fitting pass + all-reduced sums + gathered scores give
    the single-process metrics. Each worker's group, which Lightning created, is gone after
    the callback's teardown, so a worker cannot abort at exit (SIGABRT, "terminate called
    without an active exception": a gloo group left to interpreter shutdown, ~1 in 6 runs
    before), and an abort would fail the run here."""
    results = {}
    for name, kw in {"single": {}, "ddp": {"strategy": "ddp_spawn", "devices": 2}}.items():
        out = tmp_path / name
        torch.manual_seed(0)
        task = ClassificationTask(model="lenet", num_classes=10)
        cb = OODEvaluation(
            detectors={"energy": {}, "line": {}, "dice": {}, "mahalanobis": {}},
            results_dir=str(out),
            progress=False,
            per_set_holdout=0,
        )
        trainer = _trainer(out, cb, accelerator="cpu", **kw)
        trainer.callbacks.append(ProcessGroupSpy(out))  # after cb: sees its teardown's work
        trainer.test(task, datamodule=ToyData())
        results[name] = json.loads((out / "ood_results.json").read_text())["metrics"]
    for name, ranks in {"single": [0], "ddp": [0, 1]}.items():
        seen = [json.loads((tmp_path / name / f"pg_rank{r}.json").read_text()) for r in ranks]
        # [during the test loop, after the teardown]
        assert seen == ([[False, False]] if name == "single" else [[True, False]] * 2), name
    for det, per_set in results["single"].items():
        for metric, value in per_set["far"].items():
            assert results["ddp"][det]["far"][metric] == pytest.approx(value, abs=1e-6), (
                det,
                metric,
            )


@pytest.fixture
def launcher_env() -> Iterator[None]:
    """Lightning's DDP launcher writes MASTER_ADDR/PORT, LOCAL_RANK, WORLD_SIZE, NODE_RANK and
    OMP_NUM_THREADS into ``os.environ`` and sets torch's thread count; both restored so that
    later tests see a process no launcher has touched. A group a failing test left behind is
    destroyed, so it cannot leak into the next test."""
    threads = torch.get_num_threads()
    with mock.patch.dict(os.environ):
        yield
    torch.set_num_threads(threads)
    if dist.is_initialized():
        dist.destroy_process_group()


def _ddp_run(tmp_path: Path) -> tuple[OODEvaluation, ProcessGroupSpy]:
    """One-rank ``ddp`` in this process: the launching process is rank 0 (no children)."""
    cb = OODEvaluation(detectors={"energy": {}}, results_dir=str(tmp_path), progress=False)
    spy = ProcessGroupSpy()
    task = ClassificationTask(model="lenet", num_classes=10)
    trainer = _trainer(tmp_path, cb, accelerator="cpu", devices=1, strategy="ddp")
    trainer.callbacks.append(spy)
    trainer.test(task, datamodule=ToyData())
    return cb, spy


def test_the_process_group_lightning_created_for_the_run_ends_with_it(
    tmp_path: Path, launcher_env: None
) -> None:
    assert not dist.is_initialized()
    cb, spy = _ddp_run(tmp_path)
    assert spy.during is True  # Lightning's DDPStrategy created it for the run
    assert not dist.is_initialized()  # the callback's teardown destroyed it
    far = cb.results["metrics"]["energy"]["far"]
    assert (far["n_id"], far["n_ood"]) == (40, 48)  # every sample, counted once
    # a second run in the same process gets a fresh group from Lightning, and ends it too
    cb, spy = _ddp_run(tmp_path / "again")
    assert (spy.during, dist.is_initialized()) == (True, False)


class _Boom(Callback):
    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom in the test loop")


@pytest.mark.parametrize("users", [False, True])
def test_a_failed_run_ends_its_process_group_too(
    tmp_path: Path, launcher_env: None, users: bool
) -> None:
    """Lightning skips callback teardown when a run raises; ``on_exception`` ends the group
    Lightning created (and leaves a user's own group alone)."""
    if users:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cb = OODEvaluation(detectors={"energy": {}}, results_dir=str(tmp_path), progress=False)
    spy = ProcessGroupSpy()
    trainer = _trainer(tmp_path, cb, accelerator="cpu", devices=1, strategy="ddp")
    trainer.callbacks += [spy, _Boom()]
    with pytest.raises(RuntimeError, match="boom in the test loop"):
        trainer.test(ClassificationTask(model="lenet", num_classes=10), datamodule=ToyData())
    assert spy.during is True
    assert dist.is_initialized() is users


def test_a_process_group_the_user_initialised_is_left_alone(
    tmp_path: Path, launcher_env: None
) -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    world = dist.group.WORLD
    _, spy = _ddp_run(tmp_path)
    assert spy.during is True
    assert dist.is_initialized() and dist.group.WORLD is world  # the user's group, still usable
    t = torch.full((2,), 3.0)
    dist.all_reduce(t)
    assert t.tolist() == [3.0, 3.0]


def test_release_ends_only_a_group_created_after_the_observation(launcher_env: None) -> None:
    """The barrier runs before the group goes (no rank leaves a collective half done); the
    observation survives pickling, as ``ddp_spawn`` sends the callback to its workers."""
    calls: list[bool] = []
    ours = pickle.loads(pickle.dumps(ProcessGroupOwnership.observe()))
    assert ours == ProcessGroupOwnership(preexisting=False)
    assert ours.release(barrier=lambda: calls.append(True)) is False  # no group: nothing to do
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    theirs = ProcessGroupOwnership.observe()
    assert theirs.release(barrier=lambda: calls.append(True)) is False
    assert dist.is_initialized() and calls == []
    assert ours.release(barrier=lambda: calls.append(dist.is_initialized())) is True
    assert calls == [True] and not dist.is_initialized()


def test_validation_size_is_a_deprecated_name_of_per_set_holdout() -> None:
    """Configs written before the rename keep working: the old keys warn and set the new ones
    (the hold-out is of the test sets, for the [per-set] rows, never validation data)."""
    with pytest.warns(DeprecationWarning, match="validation_size is deprecated; call it per_s"):
        cb = OODEvaluation(detectors={"energy": {}}, validation_size=7, validation_seed=3)
    assert (cb.per_set_holdout, cb.per_set_seed) == (7, 3)
    assert (cb.protocol.per_set_holdout, cb.protocol.per_set_seed) == (7, 3)
    old = Protocol.from_options({"validation_size": 5, "validation_seed": 1})
    assert (old.per_set_holdout, old.per_set_seed) == (5, 1)
