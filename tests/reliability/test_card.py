"""The checkpoint explains itself: its card says where every shipped number came from, and
``lightning-ood inspect``, ``load(ckpt).card`` show it; an older checkpoint still loads, its
missing fields marked unknown."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from _cli import base_config, ood_callback

import lightning_ood
from lightning_ood.card import UNKNOWN, card_of, format_card
from lightning_ood.cli import inspect_main, main
from lightning_ood.io import safe_load


@pytest.fixture(scope="module")
def tested(tmp_path_factory: pytest.TempPathFactory, shared_data: Path, lenet_fitted: dict):
    """`lightning-ood test` of the session checkpoint with detectors it lacks (MSP, a two-tap
    FSSD): they are fitted and calibrated at test start and fitted.ckpt is written."""
    tmp = tmp_path_factory.mktemp("card")
    cfg = base_config(shared_data, train_every=30, test_every=40, ood_every=40, ood_sets=["mnist"])
    dets = {"msp": {}, "fssd": {"taps": ["conv2", "fc1"], "n_noise": 8}}
    cfg["trainer"]["callbacks"] = [ood_callback(dets, per_set_holdout=50)]
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cli = main([
        "test", "--config", str(tmp / "cfg.yaml"), "--experiment", "card",
        "--checkpoint_root", str(tmp / "ckpt"), "--log_root", str(tmp / "logs"),
        "--ckpt_path", str(lenet_fitted["ckpt"]),
    ])  # fmt: skip
    cb = next(c for c in cli.trainer.callbacks if hasattr(c, "results") and c.results)
    return {"ckpt": tmp / "ckpt" / "card" / "fitted.ckpt", "results": cb.results}


def test_the_card_records_every_shipped_number(tested: dict) -> None:
    card = card_of(safe_load(tested["ckpt"]), str(tested["ckpt"]))
    assert card["lightning_ood_version"] == lightning_ood.__version__
    assert (
        card["model"]["name"] == "lenet"
        and "trained by lightning-ood fit" in (card["model"]["weights_origin"])
    )
    assert card["training"]["global_step"] > 0  # the recipe that made the weights, not `test`'s
    assert card["data"]["id_set"] == "fashionmnist"
    model = lightning_ood.load(tested["ckpt"])
    assert model.card["detectors"]["msp"]["threshold"] == pytest.approx(model.thresholds["msp"])
    assert model.card["detectors"]["fssd"]["threshold_tpr"] == 0.95
    assert model.card["detectors"]["fssd"]["combiner"]["method"] == "logistic_fgsm_proxy"
    assert model.card["detectors"]["msp"]["tuned"] is False
    rows = card["reported"]["rows"]
    for det in ("msp", "fssd"):  # the shipped rows, as the results report them
        assert rows[det]["mnist"]["auroc"] == tested["results"]["metrics"][det]["mnist"]["auroc"]
    assert "fssd[per-set]" not in rows  # a protocol row is not a shipped detector


def test_inspect_prints_the_card_and_its_json(tested: dict, capsys) -> None:
    card = inspect_main([str(tested["ckpt"])])
    text = capsys.readouterr().out
    auroc = card["reported"]["rows"]["fssd"]["mnist"]["auroc"]
    assert f"| fssd | mnist | {100 * auroc:.2f} |" in text
    assert "logistic_fgsm_proxy" in text and "| msp |" in text
    inspect_main([str(tested["ckpt"]), "--json"])
    assert json.loads(capsys.readouterr().out)["reported"]["rows"]["msp"]["mnist"]["n_id"] > 0


def test_an_older_checkpoint_loads_with_its_unknowns_marked(tested: dict, tmp_path: Path) -> None:
    ckpt = safe_load(tested["ckpt"])
    old = copy.deepcopy(ckpt)
    for key in ("card", "shipped_combiners"):
        old["lightning_ood"].pop(key)
    torch.save(old, tmp_path / "old.ckpt")
    model = lightning_ood.load(tmp_path / "old.ckpt")
    card = model.card
    assert card["lightning_ood_version"] == UNKNOWN and card["reported"] == UNKNOWN
    assert card["detectors"]["fssd"]["tuned"] == UNKNOWN
    assert card["detectors"]["msp"]["threshold"] == pytest.approx(model.thresholds["msp"])
    assert "Reported metrics: unknown" in format_card(card)
