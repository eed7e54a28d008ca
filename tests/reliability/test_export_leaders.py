"""Every feature-based detector, the field's leaders included, exports with ``torch.export``
and the exported program scores exactly like the eager predictor (issue 14 item 1)."""

from __future__ import annotations

import torch
from toys import TapNet, fitted

from lightning_ood.detectors import DETECTORS
from lightning_ood.predictor import OODPredictor

#: One entry per exportable kind (every variant of ASH); hyperparameters sized for TapNet's
#: 8 features and 3 classes.
SPECS = {
    "msp": {},
    "maxlogit": {},
    "gen": {},
    "energy": {},
    "react": {"percentile": 90.0},
    "dice": {"p": 50.0},
    "dice_react": {"p": 50.0},
    "line": {"p_a": 50.0, "p_w": 50.0},
    "mahalanobis": {"taps": ["conv", "fc"]},
    "fssd": {"taps": ["conv", "fc", "logits"], "n_noise": 16},
    "ash_p": {"type": "ash", "variant": "p", "percentile": 65.0},
    "ash_b": {"type": "ash", "variant": "b", "percentile": 65.0},
    "ash_s": {"type": "ash", "variant": "s", "percentile": 65.0},
    "scale": {"percentile": 65.0},
    "gradnorm": {},
    "vim": {"dim": 4},
    "rmds": {},
    "knn": {"k": 5, "store_bank": True},
    "nnguide": {"k": 5, "bank_fraction": 1.0, "store_bank": True},
    "nci": {},
    "fdbd": {},
    "klm": {},
    "openmax": {"correct_only": False, "tailsize": 20},
    "she": {"correct_only": False},
    "gmm": {},
    "residual": {"dim": 4},
    "temperature_scaling": {"temperature": 1.5},
    "gram": {"taps": ["conv", "fc"], "samples": "label"},
    "vra": {},
    "relation": {"store_bank": True},
    "weiper": {"n_repeats": 5, "n_bins": 20},
    "reweightood": {},
    "cfood": {"bank_fraction": 1.0, "store_bank": True},
    "core": {},
}


def _batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 4, 4, generator=g)
    y = torch.arange(n) % 3
    return [(x[i : i + 50], y[i : i + 50]) for i in range(0, n, 50)]


def test_specs_cover_every_exportable_feature_kind() -> None:
    kinds = {spec.get("type", name) for name, spec in SPECS.items()}
    # gradients / members / passes / reruns of the network from a tap
    needs_more = {"odin", "iodin", "adascale", "de", "mcd", "mcd_var", "fssd_ensemble", "rankfeat"}
    assert kinds == set(DETECTORS) - needs_more


def test_exported_program_scores_like_the_eager_predictor() -> None:
    torch.manual_seed(0)
    net = TapNet().eval()
    dets = fitted(SPECS, net, _batches(0, 300), calibrate_loader=_batches(1, 100))
    meta = {"input_shape": (2, 4, 4), "mean": [0.0, 0.0], "std": [1.0, 1.0]}
    predictor = OODPredictor(net, dets, meta)
    program = predictor.export(torch.rand(4, 2, 4, 4)).module()
    x = torch.rand(37, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    eager, exported = predictor(x), program(x)
    assert torch.equal(exported["pred"], eager["pred"])
    for name in SPECS:
        torch.testing.assert_close(
            exported["scores"][name], eager["scores"][name], rtol=1e-5, atol=1e-6, msg=name
        )
        assert torch.equal(exported["is_ood"][name], eager["is_ood"][name]), name
