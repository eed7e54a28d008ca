"""The CLI never reports an untrained network as a result, and nothing trained or predicted is
lost to a re-run: a second `fit` is refused, `predict` writes one file per run, and a run killed
while fitting its detectors finishes that fitting when resumed."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from _cli import base_config, ood_callback, run_cli

import lightning_ood
from lightning_ood.cli import main
from lightning_ood.io import safe_load


def _write(tmp: Path, cfg: dict) -> list[str]:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return [
        "--config", str(path),
        "--checkpoint_root", str(tmp / "ckpt"), "--log_root", str(tmp / "logs"),
    ]  # fmt: skip


def _small(shared_data: Path) -> dict:
    cfg = base_config(shared_data, test_every=40, ood_every=40, ood_sets=["mnist"])
    cfg["trainer"]["callbacks"] = [ood_callback({"energy": {}, "line": {}}, per_set_holdout=0)]
    return cfg


# -- untrained weights -------------------------------------------------------------------------
def test_test_and_predict_refuse_a_network_without_trained_weights(
    tmp_path: Path, shared_data: Path
) -> None:
    args = _write(tmp_path, _small(shared_data))
    for sub in ("test", "predict"):
        with pytest.raises(SystemExit) as exc:
            main([sub, *args])
        message = str(exc.value)
        assert f"refusing to {sub} a network with untrained weights" in message
        for remedy in ("--ckpt_path", "--model.model_kwargs.weights", "--allow_untrained true"):
            assert remedy in message, (sub, remedy)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


def test_allow_untrained_says_so_and_writes_no_hand_off_checkpoint(
    tmp_path: Path, shared_data: Path
) -> None:
    proc = run_cli(tmp_path, "random", "test", _small(shared_data), "--allow_untrained", "true")
    log = proc.stderr + proc.stdout
    assert "testing a network with UNTRAINED weights" in log
    assert "the model (no checkpoint given) holds no fitted state for detectors ['line']" in log
    assert "checkpoint holds no fitted state" not in log  # no checkpoint was given
    assert "not saving fitted.ckpt" in log
    assert not list((tmp_path / "ckpt").rglob("*.ckpt"))  # nothing lightning_ood.load() takes
    (results,) = (tmp_path / "logs" / "random").glob("version_*/ood_results.json")
    metrics = json.loads(results.read_text())["metrics"]
    assert metrics["energy"]["mnist"]["n_id"] == 250  # the run itself did happen, on request


# -- re-runs -----------------------------------------------------------------------------------
def test_a_second_fit_never_replaces_an_earlier_run(
    tmp_path: Path, shared_data: Path, lenet_fitted: dict
) -> None:
    folder = tmp_path / "ckpt" / "lenet"
    folder.mkdir(parents=True)
    cfg = _small(shared_data)
    cfg["trainer"].update({"limit_train_batches": 2, "limit_val_batches": 1})
    args = ["fit", *_write(tmp_path, cfg), "--experiment", "lenet"]
    # a folder holding only the fitted.ckpt of an earlier `test` is an earlier run too
    shutil.copy(lenet_fitted["ckpt"], folder / "fitted.ckpt")
    with pytest.raises(SystemExit, match=r"earlier run .*fitted\.ckpt"):
        main(args)
    shutil.copy(lenet_fitted["ckpt"], folder / "last.ckpt")
    shutil.copy(lenet_fitted["ckpt"], folder / "epoch000-acc0.5000.ckpt")
    before = (folder / "last.ckpt").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(args)
    message = str(exc.value)
    assert "already holds the checkpoints of an earlier run" in message and "last.ckpt" in message
    assert "--ckpt_path last" in message and "--overwrite true" in message
    assert (folder / "last.ckpt").read_bytes() == before
    # on request, the earlier run is replaced: a 2-step run, its detectors fitted after it
    main([*args, "--overwrite", "true"])
    # none of the replaced model's files is left to be loaded by mistake
    assert not (folder / "fitted.ckpt").exists()
    assert not (folder / "epoch000-acc0.5000.ckpt").exists()
    replaced = safe_load(folder / "last.ckpt")
    assert replaced["global_step"] == 2 != safe_load(lenet_fitted["ckpt"])["global_step"]
    assert bool(replaced["state_dict"]["detectors.line.fitted"])


def test_predict_writes_one_file_per_run_and_never_replaces_one(
    tmp_path: Path, lenet_fitted: dict
) -> None:
    cfg = copy.deepcopy(lenet_fitted["config"])
    cfg["trainer"]["callbacks"] = []
    args = ["predict", *_write(tmp_path, cfg), "--experiment", "p"]
    args += ["--ckpt_path", str(lenet_fitted["ckpt"])]
    main(args)
    main(args)
    files = sorted((tmp_path / "logs" / "p").glob("*/predictions.csv"))
    assert [f.parent.name for f in files] == ["version_0", "version_1"]
    rows = [list(csv.reader(f.open())) for f in files]
    assert rows[0] == rows[1] and len(rows[0]) == 1 + 500  # header + every 20th ID test image
    assert rows[0][0][:7] == ["set", "position", "index", "path", "target", "pred", "class"]
    first = files[0].read_bytes()
    with pytest.raises(SystemExit, match=r"already exists.*--overwrite true"):
        main([*args, "--predictions", str(files[0])])
    assert files[0].read_bytes() == first


# -- resume ------------------------------------------------------------------------------------
def test_resume_of_a_run_killed_while_fitting_detectors_fits_them(
    tmp_path: Path, lenet_fitted: dict
) -> None:
    """A run killed in `on_train_end` leaves `last.ckpt` as saved at the end of its last epoch:
    trained, detectors unfitted. The session run's pre-fit `epoch*.ckpt` is that file (same
    weights, loops and detector buffers; checked against a real SIGKILL when this was written)."""
    (pre_fit,) = lenet_fitted["ckpt"].parent.glob("epoch*.ckpt")
    folder = tmp_path / "ckpt" / "lenet"
    folder.mkdir(parents=True)
    shutil.copy(pre_fit, folder / "last.ckpt")
    assert not safe_load(folder / "last.ckpt")["state_dict"]["detectors.line.fitted"]

    proc = run_cli(tmp_path, "lenet", "fit", lenet_fitted["config"], "--ckpt_path", "last")
    log = proc.stderr + proc.stdout
    assert "training had already finished, but it holds no fitted, calibrated detectors" in log
    assert "fitting them now" in log

    resumed, reference = safe_load(folder / "last.ckpt"), safe_load(lenet_fitted["ckpt"])
    before = safe_load(pre_fit)
    assert resumed["global_step"] == before["global_step"]  # no training step was added
    for key, value in resumed["state_dict"].items():
        if key.startswith("backbone."):
            assert torch.equal(value, before["state_dict"][key]), key
    # the detectors equal those the uninterrupted run fitted after training
    model = lightning_ood.load(folder / "last.ckpt")
    uninterrupted = lightning_ood.load(lenet_fitted["ckpt"])
    assert set(model.thresholds) == set(lenet_fitted["detectors"])
    for name, threshold in uninterrupted.thresholds.items():
        assert model.thresholds[name] == pytest.approx(threshold, rel=1e-5, abs=1e-6), name
    compared = 0
    for key, value in reference["state_dict"].items():
        if not (key.startswith("detectors.") and isinstance(value, torch.Tensor)):
            continue
        got = resumed["state_dict"][key]
        if value.is_floating_point():
            assert torch.allclose(got, value, rtol=1e-5, atol=1e-6, equal_nan=True), key
        else:
            assert torch.equal(got, value), key
        compared += 1
    assert compared > 2 * len(lenet_fitted["detectors"])


def test_prediction_writer_refuses_an_existing_file_itself(tmp_path: Path) -> None:
    """The one overwrite rule, also for the callback used without the CLI (Python API)."""
    from lightning_ood.callbacks.predictions import PredictionCSVWriter

    out = tmp_path / "p.csv"
    PredictionCSVWriter.refuse_existing(out, overwrite=False)  # nothing there yet
    out.write_text("earlier")
    with pytest.raises(FileExistsError, match=r"p.csv already exists.*--overwrite true"):
        PredictionCSVWriter.refuse_existing(out, overwrite=False)
    PredictionCSVWriter.refuse_existing(out, overwrite=True)
    PredictionCSVWriter.refuse_existing(None, overwrite=False)  # the run's own new file
    assert out.read_text() == "earlier"
