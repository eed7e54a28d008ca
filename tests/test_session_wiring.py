"""Issue 25 items 1-2 through the evaluation session: detectors fitted on the labelled ID
validation split (temperature scaling's T), CCR@FPR from the ID test set's predictions and
labels, and near/far group averages, through ``lightning-ood test``'s callback and
:meth:`EvaluationSession.run`.

The network is an untrained seeded LeNet; the labels of the ID images are its own predictions
with every fourth one moved to the next class, so the classifier is 75 % accurate and the NLL
of T has a finite minimum (neither every sample right nor the labels unrelated to the logits).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from toys import TensorSetsData

import lightning_ood
from lightning_ood import engine, report, tuning
from lightning_ood.callbacks import OODEvaluation
from lightning_ood.detectors import build_detector
from lightning_ood.detectors.temperature_scaling import TemperatureScaling
from lightning_ood.features import compute_features
from lightning_ood.grid import grid_search
from lightning_ood.metrics import CCR_NAMES, ccr_metrics, ood_metrics
from lightning_ood.models.base import OODBackbone
from lightning_ood.protocol import CONVENTION, Protocol
from lightning_ood.session import CachedSource, EvaluationSession, LoaderSource, Sets
from lightning_ood.task import ClassificationTask

BATCH = TensorSetsData.batch_size
GROUPS = {"near1": "near", "far1": "far", "far2": "far"}
SKIPPED = {"far3": "no files under /nowhere/far3"}


def _images(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return shift + scale * torch.rand(n, 1, 28, 28, generator=g)


def _labels(backbone: OODBackbone, x: Tensor) -> Tensor:
    """The network's own predictions, every fourth moved to the next class (75 % correct)."""
    with torch.no_grad(), engine.eval_mode(backbone):
        pred = backbone(x).argmax(1)
    moved = torch.arange(len(x)) % 4 == 0
    return torch.where(moved, (pred + 1) % backbone.num_classes, pred)


class GroupedData(TensorSetsData):
    """ID training, 32 labelled held-out validation images (val_size), the labelled ID test
    set and three reported OOD sets in two groups; a fourth declared set was skipped."""

    id_name = "toy"
    data_version = "toy random tensors (session wiring test)"
    val_size = 32

    def __init__(self, backbone: OODBackbone) -> None:
        super().__init__()
        train, val, test = _images(64, 1), _images(32, 2), _images(48, 3)
        self.train = TensorDataset(train, torch.arange(64) % 10)
        self.val = TensorDataset(val, _labels(backbone, val))
        self.test = TensorDataset(test, _labels(backbone, test))
        self.ood = {
            "near1": TensorDataset(_images(40, 4, 0.2, 1.2), torch.full((40,), -1)),
            "far1": TensorDataset(_images(40, 5, 1.0, 2.0), torch.full((40,), -1)),
            "far2": TensorDataset(_images(24, 6, -1.0, 0.5), torch.full((24,), -1)),
        }
        self.test_set_names = ["toy", *self.ood]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.test), *(self._loader(d) for d in self.ood.values())]

    def hand_off_meta(self) -> dict[str, Any]:
        """What `lightning_ood.load()` needs: the input shape, identity normalisation."""
        return {
            "id_set": self.id_name,
            "data_version": self.data_version,
            "num_classes": 10,
            "class_names": None,
            "input_shape": [1, 28, 28],
            "mean": [0.0],
            "std": [1.0],
            "input_range": "float in [0, 1]",
        }

    def groups(self) -> dict[str, str]:
        return dict(GROUPS)

    def skipped_ood_sets(self) -> dict[str, str]:
        return dict(SKIPPED)


class Scalars(Logger):
    """Keeps what the callback logs (the TensorBoard scalars go through the same call)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "scalars"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`lightning-ood test`'s callback in process: temperature scaling (T by NLL on the ID
    validation split) and energy, scored on the ID test set and three grouped OOD sets."""
    out = tmp_path_factory.mktemp("wiring")
    torch.manual_seed(0)
    task = ClassificationTask(model="lenet", num_classes=10)
    dm = GroupedData(task.backbone)
    cb = OODEvaluation(
        detectors={"temperature_scaling": {}, "energy": {}},
        per_set_holdout=0,
        results_dir=str(out / "results"),
        progress=False,
        figures=False,
        log_histograms=False,
        log_roc=False,
    )
    scalars = Scalars()
    trainer = Trainer(
        default_root_dir=out,
        callbacks=[cb, ModelCheckpoint(dirpath=out / "ckpt")],
        logger=scalars,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
    )
    trainer.test(task, datamodule=dm)
    return {"cb": cb, "task": task, "dm": dm, "out": out, "scalars": scalars.metrics}


def _outputs(backbone: OODBackbone, loader: DataLoader) -> tuple[Any, Tensor]:
    """Every batch's outputs (the eval pass's batches) and labels, concatenated."""
    passes = list(engine.eval_pass(backbone, loader))
    out = engine.cat_outputs([o for _, _, o in passes])
    return out, torch.cat([y for _, y, _ in passes])


def test_temperature_is_the_direct_validation_fit_and_ships(run: dict[str, Any]) -> None:
    task, dm = run["task"], run["dm"]
    det = task.detectors["temperature_scaling"]
    out, y = _outputs(task.backbone, dm.val_dataloader())
    direct = TemperatureScaling()
    direct.fit_validation(out, y)
    t = float(det.fitted_temperature)
    assert t == pytest.approx(float(direct.fitted_temperature), rel=1e-9)
    assert math.isfinite(t) and abs(t - 1.0) > 1e-3  # fitted, not a default
    # lightning_ood.load() of the checkpoint the run wrote scores with that T
    model = lightning_ood.load(run["out"] / "ckpt" / "fitted.ckpt")
    x = dm.test.tensors[0]
    got = model.score_normalized(x)
    logits = got["logits"].double()
    want = (logits / t).softmax(1).amax(1)
    assert torch.allclose(got["scores"]["temperature_scaling"].double(), want, atol=1e-6)
    assert torch.equal(got["pred"], logits.argmax(1))


def test_ccr_of_the_id_test_predictions_and_labels(run: dict[str, Any]) -> None:
    task, dm, results = run["task"], run["dm"], run["cb"].results
    ids, y = _outputs(task.backbone, dm.test_dataloader()[0])
    correct = ids.logits.argmax(1) == y
    assert float(correct.double().mean()) == 0.75  # every fourth label moved
    s_id = torch.logsumexp(ids.logits.double(), 1)  # energy's score
    for i, name in enumerate(dm.ood, start=1):
        ood, _ = _outputs(task.backbone, dm.test_dataloader()[i])
        want = ccr_metrics(s_id, torch.logsumexp(ood.logits.double(), 1), correct)
        got = results["metrics"]["energy"][name]
        assert {k: got[k] for k in CCR_NAMES} == pytest.approx(want, abs=1e-12)
        assert got["ccr_fpr1e-1"] <= 0.75
    avg = results["metrics"]["energy"]["average"]
    for k in CCR_NAMES:
        mean = sum(results["metrics"]["energy"][n][k] for n in dm.ood) / 3
        assert avg[k] == pytest.approx(mean, abs=1e-15)
    assert results["ccr"]["method"] == "roc" and "ccr" in CONVENTION


def test_group_rows_in_results_files_and_scalars(run: dict[str, Any]) -> None:
    results, out = run["cb"].results, run["out"] / "results"
    rows = results["metrics"]["temperature_scaling"]
    for key in ("auroc", "fpr95", "ccr_fpr1e-2"):
        far = (rows["far1"][key] + rows["far2"][key]) / 2
        assert rows["average[far]"][key] == pytest.approx(far, abs=1e-15)
        assert rows["average[near]"][key] == rows["near1"][key]
    assert results["groups"] == GROUPS and results["skipped_ood_sets"] == SKIPPED
    with (out / "ood_results.csv").open() as f:
        table = list(csv.DictReader(f))
    far_row = next(r for r in table if r["detector"] == "energy" and r["ood_set"] == "average[far]")
    far_want = results["metrics"]["energy"]["average[far]"]
    assert float(far_row["auroc"]) == far_want["auroc"]
    assert float(far_row["ccr_fpr1e-1"]) == far_want["ccr_fpr1e-1"]
    md = (out / "ood_results.md").read_text()
    assert "| energy | **average[far]** |" in md and "| energy | **average[near]** |" in md
    assert "CCR@0.0001↑" in md and "method `roc`" in md
    assert "near: near1; far: far1, far2" in md and "far3 (no files under /nowhere/far3)" in md
    scalars = run["scalars"]
    assert scalars["ood/energy/average[far]/auroc"] == far_want["auroc"]
    near = results["metrics"]["energy"]["near1"]["ccr_fpr1e-2"]
    assert scalars["ood/energy/average[near]/ccr_fpr1e-2"] == near


def _toy() -> tuple[OODBackbone, GroupedData]:
    torch.manual_seed(0)
    task = ClassificationTask(model="lenet", num_classes=10)
    return task.backbone.eval(), GroupedData(task.backbone)


def test_validation_fitted_detectors_share_one_pass_and_are_refused_without_it() -> None:
    backbone, dm = _toy()
    reads = []

    class Counting:
        def __iter__(self) -> Any:
            reads.append(1)
            return iter(dm.val_dataloader())

    session = EvaluationSession(backbone)
    a, b = TemperatureScaling(name="a"), TemperatureScaling(name="b", max_iter=50)
    energy = build_detector("energy", {})
    session.fit([a, b, energy], None, id_val=LoaderSource(Counting(), backbone))
    assert len(reads) == 1  # one pass over the validation split for both
    assert float(a.fitted_temperature) == pytest.approx(float(b.fitted_temperature), rel=1e-6)
    with pytest.raises(ValueError, match=r"\['c \(temperature_scaling\)'\].*data.val_size > 0"):
        session.fit([TemperatureScaling(name="c")], None)
    # stored features without labels (a loader of inputs only): refused by name
    unlabelled = compute_features(backbone, DataLoader(dm.val.tensors[0], batch_size=BATCH))
    with pytest.raises(ValueError, match=r"'d \(temperature_scaling\)'.*32 samples have no label"):
        session.fit([TemperatureScaling(name="d")], None, id_val=CachedSource(unlabelled))


def test_cached_test_sets_without_labels_leave_ccr_out_with_a_note() -> None:
    backbone, dm = _toy()
    inputs_only = {
        "toy": DataLoader(dm.test.tensors[0], batch_size=BATCH),
        "far1": DataLoader(dm.ood["far1"].tensors[0], batch_size=BATCH),
    }
    feats = {k: compute_features(backbone, ld) for k, ld in inputs_only.items()}
    sets = Sets(
        id_val=LoaderSource(dm.val_dataloader(), backbone),
        test={k: CachedSource(f, BATCH) for k, f in feats.items()},
    )
    session = EvaluationSession(backbone, Protocol(per_set_holdout=0))
    outcome = session.run({"energy": build_detector("energy", {})}, sets)
    row = outcome.results["metrics"]["energy"]["far1"]
    assert not any(k in row for k in CCR_NAMES)
    assert "left out" in outcome.results["ccr"]["omitted"]
    s = {k: torch.logsumexp(f.logits.double(), 1) for k, f in feats.items()}
    assert row["auroc"] == pytest.approx(ood_metrics(s["toy"], s["far1"])["auroc"], abs=1e-12)
    assert "CCR@FPR (open-set accuracy) is left out" in report.format_markdown(outcome.results)


def test_tuning_candidates_fit_on_one_validation_pass() -> None:
    """Every candidate of a temperature-scaling search gets its T from the same single pass
    over the ID validation split (and equals a direct fit on those outputs)."""
    backbone, dm = _toy()
    descs: list[str] = []

    class Recording(LoaderSource):
        def with_targets(self, *args: Any, **kwargs: Any) -> Any:
            descs.append(kwargs.get("desc", ""))
            return super().with_targets(*args, **kwargs)

    sets = Sets(
        id_val=Recording(dm.val_dataloader(), backbone),
        val_ood={"near_val": LoaderSource(DataLoader(dm.ood["near1"], batch_size=BATCH), backbone)},
    )
    search = tuning.plan("ts", "temperature_scaling", {"max_iter": [50, 100]}, {})
    tuned = EvaluationSession(backbone).tune([search], sets)
    assert sum(d.startswith("Fitting on ID validation") for d in descs) == 1
    out, y = _outputs(backbone, dm.val_dataloader())
    direct = TemperatureScaling()
    direct.fit_validation(out, y)
    got = float(tuned.selected["ts"].fitted_temperature)
    assert got == pytest.approx(float(direct.fitted_temperature), rel=1e-6)


def test_grid_reports_group_rows_and_ccr_from_labelled_features() -> None:
    """`lightning-ood grid` (cached features with their labels): group rows and CCR@FPR as
    the session gives them, recorded in its meta."""
    backbone, dm = _toy()
    loaders = dict(zip(dm.test_set_names, dm.test_dataloader(), strict=True))
    f = {k: compute_features(backbone, ld) for k, ld in loaders.items()}
    val = compute_features(backbone, dm.val_dataloader())
    far_sets = {"far1": f["far1"], "far2": f["far2"]}
    res = grid_search(
        "energy", {"temperature": [1.0]}, {}, backbone, None, val, {"v": f["near1"]}, f["toy"],
        far_sets, groups={"far1": "far", "far2": "far"}, skipped_ood_sets=SKIPPED,
    )  # fmt: skip
    far = (res.test["far1"]["ccr_fpr1e-1"] + res.test["far2"]["ccr_fpr1e-1"]) / 2
    assert res.test["average[far]"]["ccr_fpr1e-1"] == pytest.approx(far, abs=1e-15)
    s_id = torch.logsumexp(f["toy"].logits.double(), 1)
    correct = f["toy"].logits.argmax(1) == f["toy"].targets
    want = ccr_metrics(s_id, torch.logsumexp(f["far1"].logits.double(), 1), correct)
    assert {k: res.test["far1"][k] for k in CCR_NAMES} == pytest.approx(want, abs=1e-12)
    assert res.meta["groups"] == {"far1": "far", "far2": "far"}
    assert res.meta["skipped_ood_sets"] == SKIPPED and res.meta["ccr"]["method"] == "roc"


def test_fit_refuses_a_validation_fitted_detector_without_a_split_before_training(
    tmp_path: Path,
) -> None:
    backbone_task = ClassificationTask(model="lenet", num_classes=10)
    dm = GroupedData(backbone_task.backbone)
    dm.val_size = 0  # the ID validation loader would be the reported test set
    refused_before_training(
        tmp_path, backbone_task, dm, {"temperature_scaling": {}},
        r"temperature_scaling.*set `data.val_size > 0`",
    )  # fmt: skip


def refused_before_training(
    tmp_path: Path, task: ClassificationTask, dm: Any, detectors: dict[str, Any], match: str
) -> None:
    """``trainer.fit`` with an OOD callback of ``detectors`` raises ``match`` before any
    training step."""
    cb = OODEvaluation(detectors=detectors, progress=False, figures=False)
    trainer = Trainer(
        default_root_dir=tmp_path, callbacks=[cb], logger=False, max_steps=1,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=match):
        trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 0


def test_a_detector_that_cannot_run_on_the_backbone_stops_before_any_pass(
    tmp_path: Path,
) -> None:
    """MC Dropout on a network without dropout: the session refuses it before reading a single
    training batch, and the callback before the first training step."""
    task = ClassificationTask(model="lenet", num_classes=10)
    task.backbone.dropout1 = task.backbone.dropout2 = torch.nn.Identity()  # none left
    backbone, dm = task.backbone.eval(), GroupedData(task.backbone)
    no_dropout = r"LeNet has no dropout layers"
    reads: list[int] = []

    class Counting:
        def __iter__(self) -> Any:
            reads.append(1)
            return iter(dm.train_dataloader())

    sets = Sets(
        train=LoaderSource(Counting(), backbone),
        id_val=LoaderSource(dm.val_dataloader(), backbone),
        test={"id": LoaderSource(dm.val_dataloader(), backbone)},
    )
    dets = {"knn": build_detector("knn", {"k": 2}), "mcd": build_detector("mcd", {})}
    with pytest.raises(ValueError, match=rf"^mcd: the model {no_dropout}"):
        EvaluationSession(backbone).run(dets, sets, per_set=False)
    assert reads == []  # not one training batch read
    searches, _ = tuning.searches_for(
        {"mcd": build_detector("mcd", {})}, {"mcd": {"passes": [2, 4]}}
    )
    with pytest.raises(ValueError, match=rf"mcd.*{no_dropout}"):
        EvaluationSession(backbone).run({}, sets, searches=searches, per_set=False)
    assert reads == []
    refused_before_training(
        tmp_path, task, dm, {"mcd_var": {}}, rf"^mcd_var: the model {no_dropout}"
    )
