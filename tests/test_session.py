"""The one evaluation session: the same config gives identical metrics through the OOD callback
(``lightning-ood test`` with ``tune``) and through the grid from the feature cache; the shared
protocol value and its aliases; the grid refuses what ``tune`` refuses."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset
from toys import TensorSetsData

from lightning_ood import engine, tuning
from lightning_ood.callbacks import OODEvaluation
from lightning_ood.detectors import build_detector
from lightning_ood.features import FeatureCache, compute_features
from lightning_ood.grid import NO_ID_VALIDATION, grid_search, run_spec
from lightning_ood.metrics import ood_metrics
from lightning_ood.protocol import Protocol, check_tune
from lightning_ood.session import CachedSource, EvaluationSession, LoaderSource, Sets
from lightning_ood.task import ClassificationTask

BATCH = TensorSetsData.batch_size  # loaders and cached batches alike: same float32 sums


class SessionData(TensorSetsData):
    """Random 1x28x28 images: a training set, 32 held-out ID validation images (val_size), a
    validation OOD set that is never reported, the ID test set and one reported OOD set."""

    id_name = "toy"
    data_version = "toy random tensors (session test)"
    val_size = 32

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def images(n: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
            return shift + scale * torch.rand(n, 1, 28, 28, generator=g)

        self.train = TensorDataset(images(64), torch.arange(64) % 10)
        self.val = TensorDataset(images(32), torch.arange(32) % 10)
        self.val_ood = TensorDataset(images(32, 0.5, 1.5), torch.full((32,), -1))
        self.test = TensorDataset(images(48), torch.arange(48) % 10)
        self.ood = TensorDataset(images(40, 1.0, 2.0), torch.full((40,), -1))
        self.test_set_names = ["toy", "far"]
        self.val_ood_names = ["near_val"]

    def val_ood_dataloaders(self) -> dict[str, DataLoader]:
        return {"near_val": self._loader(self.val_ood)}

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.test), self._loader(self.ood)]


#: One config for both entry points: the detectors, what `tune` searches, the protocol.
DETECTORS = {
    "line": {"delta": 1.0, "p_a": 90, "p_w": 90},
    "mahalanobis": {"taps": ["fc1", "logits"], "combiner": "lr", "standardize": True},
    "energy": {},
}
SPACES = {
    "line": {"p_a": [10, 90], "p_w": [10, 90]},
    "mahalanobis": {"standardize": [False, True]},
}


@pytest.fixture(scope="module")
def through_test(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`lightning-ood test`'s callback with `tune`, in process, on an untrained seeded LeNet."""
    out = tmp_path_factory.mktemp("test_run")
    torch.manual_seed(0)
    task = ClassificationTask(model="lenet", num_classes=10)
    cb = OODEvaluation(
        detectors=DETECTORS,
        tune={"detectors": SPACES},  # select, seed, combiner_fraction: the protocol's defaults
        per_set_holdout=0,
        results_dir=str(out),
        progress=False,
        figures=False,
    )
    trainer = Trainer(
        default_root_dir=out,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
    )
    trainer.test(task, datamodule=SessionData())
    return {"results": cb.results, "task": task, "protocol": cb.protocol, "out": out}


@pytest.mark.parametrize("name", ["line", "mahalanobis"])
def test_grid_from_the_cache_equals_test_on_the_same_config(
    through_test: dict[str, Any], tmp_path: Path, name: str
) -> None:
    results, task = through_test["results"], through_test["task"]
    base = {k: v for k, v in DETECTORS[name].items() if k not in SPACES[name]}
    spec = {"detector": name, "base": base, "grid": SPACES[name], "batch_size": BATCH}
    cache = FeatureCache(tmp_path / "cache")
    grid = run_spec(
        spec,
        task.backbone,
        SessionData(),
        cache=cache,
        progress=False,
        protocol=through_test["protocol"],
        info={"id_set": "toy"},
    )
    assert cache.misses == 5  # train, ID validation, ID test, far, near_val: all from the cache
    # the same selection: same candidates, same validation numbers, same choice
    record = results["tuning"]["detectors"][name]
    assert [r["params"] for r in grid.rows] == [r["params"] for r in record["rows"]]
    assert [r["val_mean"] for r in grid.rows] == [r["val_mean"] for r in record["rows"]]
    assert grid.best_params == record["selected"]
    assert grid.select_metric == results["tuning"]["protocol"]["select"] == "auroc"
    # the same shipped detector (combiner fitted on all validation data) and threshold ...
    assert grid.meta["best_config"] == results["detectors"][name]
    assert grid.meta["threshold"]["value"] == results["thresholds"][name]["value"]
    if name == "mahalanobis":
        shipped = results["shipped_combiners"][name]
        assert grid.meta["shipped_combiner"]["method"] == shipped["method"] == "logistic"
        assert grid.meta["shipped_combiner"]["n_id"] == shipped["n_id"] == 32
    # ... gives identical reported metrics: every value of every set and the average
    assert grid.test == results["metrics"][name]
    assert grid.meta["n_id_test"] == results["metrics"][name]["far"]["n_id"] == 48


def test_tune_metrics_recomputed_by_hand(through_test: dict[str, Any]) -> None:
    """The validation numbers both entry points share, recomputed without the session: LINe
    candidates fitted by the engine, AUROC of the held-out ID vs validation OOD scores."""
    task, dm = through_test["task"], SessionData()
    record = through_test["results"]["tuning"]["detectors"]["line"]
    chosen = [r for r in record["rows"] if r["params"] == record["selected"]]
    assert len(chosen) == 1
    for row in [record["rows"][0], *chosen]:  # the first configuration and the selected one
        det = build_detector("line", {**DETECTORS["line"], **row["params"]})
        engine.fit_from_loader([det], task.backbone, dm.train_eval_dataloader())
        s_id = engine.score_loader({"l": det}, task.backbone, dm.val_dataloader())["l"]
        s_ood = engine.score_loader({"l": det}, task.backbone, dm.val_ood_dataloaders()["near_val"])
        want = ood_metrics(s_id, s_ood["l"])
        assert row["val_mean"]["auroc"] == pytest.approx(want["auroc"], abs=1e-12)


def test_loader_and_cached_sources_give_the_same_session(through_test: dict[str, Any]) -> None:
    """`EvaluationSession.run` over images and over their stored features: the same fit,
    selection, shipped combiner, threshold and metrics (the benchmark API)."""
    backbone, dm = through_test["task"].backbone, SessionData()
    taps = ["fc1", "logits"]
    loaders = {
        "train": dm.train_eval_dataloader(),
        "val": dm.val_dataloader(),
        "near_val": dm.val_ood_dataloaders()["near_val"],
        "toy": dm.test_dataloader()[0],
        "far": dm.test_dataloader()[1],
    }

    def sets(make: Any) -> Sets:
        return Sets(
            train=make("train"),
            id_val=make("val"),
            val_ood={"near_val": make("near_val")},
            test={"toy": make("toy"), "far": make("far")},
        )

    feats = {k: compute_features(backbone, ld, taps) for k, ld in loaders.items()}
    base = {"taps": taps, "combiner": "lr"}
    runs = {}
    for how, make in {
        "images": lambda k: LoaderSource(loaders[k], backbone),
        "cache": lambda k: CachedSource(feats[k], BATCH),
    }.items():
        session = EvaluationSession(backbone, Protocol(per_set_holdout=20))
        search = tuning.plan("mahalanobis", "mahalanobis", SPACES["mahalanobis"], base)
        dets = {"energy": build_detector("energy", {})}
        runs[how] = session.run(dets, sets(make), searches=[search])
    a, b = runs["images"].results, runs["cache"].results
    assert a["metrics"] == b["metrics"] and a["thresholds"] == b["thresholds"]
    assert a["tuning"] == b["tuning"] and a["shipped_combiners"] == b["shipped_combiners"]
    # the protocol's per-set row of the layer ensemble: 20 of 48/40 held out, the rest reported
    assert a["metrics"]["mahalanobis[per-set]"]["far"]["n_ood"] == 40 - 20
    assert a["tuning"]["protocol"]["val_ood_sets"] == {"near_val": 32}
    # the energy row is the functional metric of the energy scores on every sample
    s = {k: torch.logsumexp(feats[k].logits.double(), 1) for k in ("toy", "far")}
    want = ood_metrics(s["toy"], s["far"])
    assert a["metrics"]["energy"]["far"]["auroc"] == pytest.approx(want["auroc"], abs=1e-6)


def test_one_protocol_value_with_the_old_names() -> None:
    p = Protocol.from_options({"select_metric": "fpr95", "seed": 3, "tpr": 0.9})
    assert (p.select, p.seed, p.threshold_tpr, p.combiner_fraction) == ("fpr95", 3, 0.9, 0.5)
    assert p.replace(select="auroc").select == "auroc" and p.select == "fpr95"  # frozen copy
    cb = OODEvaluation(tune={"select": "fpr95", "seed": 3}, per_set_holdout=7, threshold_tpr=0.9)
    assert cb.protocol == Protocol(
        select="fpr95", seed=3, per_set_holdout=7, threshold_tpr=0.9, per_set_seed=42
    )
    assert check_tune({"select": "fpr95"}) == {
        "detectors": None,
        "select": "fpr95",
        "seed": 0,
        "combiner_fraction": 0.5,
    }
    for bad, match in [
        ({"selct": "auroc"}, r"grid spec x: 'selct' is not a protocol setting"),
        ({"combiner_fraction": 0.0}, r"grid spec x: combiner_fraction must lie in \(0, 1\)"),
        ({"id_val_fraction": 1.5}, r"id_val_fraction must lie in \(0, 1\) or be null"),
    ]:
        with pytest.raises(ValueError, match=match):
            Protocol.from_options(bad, "grid spec x: ")


def test_the_grid_selects_on_the_id_test_set_only_when_told(tmp_path: Path) -> None:
    """`tune` refuses selection without held-out ID data; so does the grid, unless the spec
    opts in to a seeded split of the ID test set (then half is selection, half reported)."""
    torch.manual_seed(0)
    backbone = ClassificationTask(model="lenet", num_classes=10).backbone.eval()
    dm = SessionData()
    f = {k: compute_features(backbone, ld) for k, ld in [("id", dm.test_dataloader()[0])]}
    val = compute_features(backbone, dm.val_ood_dataloaders()["near_val"])
    far = compute_features(backbone, dm.test_dataloader()[1])
    args = ("energy", {"temperature": [1.0]}, {}, backbone, None, None, {"v": val}, f["id"])
    with pytest.raises(ValueError, match="the grid needs held-out ID validation data"):
        grid_search(*args, {"far": far})
    assert "val_size" in NO_ID_VALIDATION and "id_val_fraction" in NO_ID_VALIDATION
    res = grid_search(*args, {"far": far}, id_val_fraction=0.5)
    assert (res.meta["n_id_val"], res.meta["n_id_test"]) == (24, 24)
    assert not math.isnan(res.test["far"]["auroc"])
    dm.val_size = 0  # the datamodule holds nothing out: refused before any feature is read
    spec = {"detector": "energy", "grid": {"temperature": [1.0]}}
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(ValueError, match="the grid needs held-out ID validation data"):
        run_spec(spec, backbone, dm, cache=cache, progress=False)
    assert cache.misses == 0
