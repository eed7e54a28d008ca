"""``tune:`` in the OOD callback: hyperparameters selected on validation data inside
``lightning-ood test``, checked against an independent recomputation (engine fit + sklearn)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _cli import base_config, ood_callback, run_cli
from sklearn.metrics import roc_auc_score

from lightning_ood import engine
from lightning_ood.callbacks.evaluation import _check_tune
from lightning_ood.data import FashionMNISTDataModule
from lightning_ood.detectors import ReAct
from lightning_ood.io import safe_load
from lightning_ood.state import build_from_checkpoint

# The session network trained on every 6th training image with val_size 0, so a hold-out may
# only hold images it never saw: val_seed 53's 20 held-out images (every 20th of 400) are none
# of them (any other split is refused: item 15 of issue 21).
DATA = {"test_every": 20, "ood_every": 20, "val_size": 400, "val_seed": 53, "ood_sets": ["mnist"]}


def test_tune_selects_on_validation_data_and_stores_the_choice(
    tmp_path: Path, shared_data: Path, lenet_fitted: dict[str, Any]
) -> None:
    cfg = base_config(shared_data, **DATA, val_ood_sets=[{"name": "kmnist", "every": 10}])
    # tune every declared search space: ReAct's (85, 90, 95, 99); ViM's (its default None, 256,
    # 1000): 256 and 1000 exceed LeNet's 128 features, so those rows are invalid and never
    # selected, and ViM keeps its default
    dets = {"react": {"percentile": 90.0}, "energy": {}, "vim": {}}
    tune = {"select": "auroc", "detectors": None}
    cfg["trainer"]["callbacks"] = [ood_callback(dets, tune=tune, results_dir=str(tmp_path))]
    run_cli(tmp_path, "tuned", "test", cfg, "--ckpt_path", str(lenet_fitted["ckpt"]))
    res = json.loads((tmp_path / "ood_results.json").read_text())
    record = res["tuning"]["detectors"]["react"]
    assert [r["params"]["percentile"] for r in record["rows"]] == [85, 90, 95, 99]
    vim = res["tuning"]["detectors"]["vim"]
    assert [r["params"]["dim"] for r in vim["rows"]] == [None, 256, 1000]
    assert "dim=256" in vim["rows"][1]["invalid"] and vim["selected"] == {"dim": None}
    assert res["detectors"]["vim"]["dim"] is None  # the configured (default) ViM was kept
    assert res["tuning"]["protocol"]["val_ood_sets"] == {"kmnist": 1000}
    md = (tmp_path / "ood_results.md").read_text()
    assert "| react | percentile=" in md and "kmnist (1000 samples)" in md

    # Independent recomputation: the same splits, engine fit per value, sklearn AUROC.
    dm = FashionMNISTDataModule(
        root=str(shared_data),
        batch_size=64,
        eval_batch_size=250,
        num_workers=0,
        train_every=30,
        **DATA,
        val_ood_sets=[{"name": "kmnist", "every": 10}],
    )
    dm.setup("test")
    ckpt = safe_load(lenet_fitted["ckpt"])
    backbone, _, _ = build_from_checkpoint(ckpt, str(lenet_fitted["ckpt"]))
    aurocs = []
    for p in (85, 90, 95, 99):
        det = ReAct(percentile=p)
        engine.fit_from_loader([det], backbone, dm.train_eval_dataloader())
        s_id = engine.score_loader({"r": det}, backbone, dm.val_dataloader())["r"]
        s_ood = engine.score_loader({"r": det}, backbone, dm.val_ood_dataloaders()["kmnist"])["r"]
        y = np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))]
        aurocs.append(roc_auc_score(y, torch.cat([s_id, s_ood]).numpy()))
    got = [r["val_mean"]["auroc"] for r in record["rows"]]
    np.testing.assert_allclose(got, aurocs, rtol=0, atol=1e-9)
    best = (85, 90, 95, 99)[int(np.argmax(aurocs))]
    assert record["selected"] == {"percentile": best}
    # The choice is stored: the hand-off checkpoint rebuilds the selected detector.
    fitted = safe_load(tmp_path / "ckpt" / "tuned" / "fitted.ckpt")
    _, stored, _ = build_from_checkpoint(fitted, "fitted.ckpt")
    assert stored["react"].percentile == best
    assert res["detectors"]["react"]["percentile"] == best


@pytest.mark.parametrize(
    ("tune", "match"),
    [
        ({"selec": "auroc"}, r"unknown keys \['selec'\]"),
        ({"select": "accuracy"}, "tune.select='accuracy' is not one of"),
        ({"combiner_fraction": 1.0}, "combiner_fraction must lie in"),
    ],
)
def test_bad_tune_options_are_refused_at_config_time(tune: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _check_tune(tune)


def test_tune_refuses_bad_grids_and_reported_validation(
    tmp_path: Path, shared_data: Path, lenet_fitted: dict[str, Any]
) -> None:
    from lightning_ood.tuning import plan

    with pytest.raises(ValueError, match=r"\['k'\] are not hyperparameters of detector 'react'"):
        plan("react", "react", {"k": [1, 2]})
    with pytest.raises(ValueError, match=r"grid\['percentile'\] must be a non-empty list"):
        plan("react", "react", {"percentile": []})
    with pytest.raises(ValueError, match="declares no search space"):
        plan("energy", "energy", None)
    # val_size 0: the ID validation set would be the reported ID test set
    cfg = base_config(shared_data, test_every=20, ood_every=20, ood_sets=["mnist"])
    cfg["data"]["init_args"]["val_ood_sets"] = ["kmnist"]
    tune = {"detectors": ["react"]}
    cfg["trainer"]["callbacks"] = [ood_callback({"react": {}}, tune=tune)]
    proc = run_cli(
        tmp_path, "leak", "test", cfg, "--ckpt_path", str(lenet_fitted["ckpt"]), check=False
    )
    assert proc.returncode != 0 and "tune needs held-out ID validation data" in proc.stderr
