"""A run's own ``last.ckpt`` (FSSD fitted: an ``_extra_state`` dict in its state dict) as the
initial weights of another run: the fine-tuning recipe of ``configs/oe_lenet_fashionmnist.yaml``
and ``lightning-ood grid --ckpt_path`` (issue 21 item 17)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_ood.io import safe_load
from lightning_ood.models import create_model
from lightning_ood.models.lenet import LeNet
from lightning_ood.models.weights import load_weights
from lightning_ood.task import ClassificationTask


def test_a_fitted_run_checkpoint_initialises_a_new_run(lenet_fitted: dict[str, Any]) -> None:
    ckpt = lenet_fitted["ckpt"]
    state = safe_load(ckpt)["state_dict"]
    assert isinstance(state["detectors.fssd._extra_state"], dict)
    backbone = {
        k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
    }
    task = ClassificationTask(model="lenet", model_kwargs={"in_channels": 1, "weights": str(ckpt)})
    grid = load_weights(LeNet(), ckpt, model_name="lenet")  # what grid --ckpt_path does
    for model in (task.backbone, grid):
        got = model.state_dict()
        assert set(got) == set(backbone)
        for k, v in backbone.items():
            assert torch.equal(got[k], v), k


def test_a_lenet_run_checkpoint_for_resnet18_is_an_architecture_mismatch(
    lenet_fitted: dict[str, Any],
) -> None:
    ckpt = lenet_fitted["ckpt"]
    with pytest.raises(ValueError) as err:
        create_model("tv:resnet18", num_classes=10, in_channels=1, image_size=28, weights=ckpt)
    msg = str(err.value)
    assert "no state_dict" not in msg
    assert f"{str(ckpt)!r} does not match the architecture of tv:resnet18" in msg
    assert "unexpected keys (e.g. ['conv1.bias' (32,)" in msg
    assert "conv1.weight: checkpoint (32, 1, 3, 3) vs model (64, 1, 7, 7)" in msg
