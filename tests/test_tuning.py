"""The shared selection core (lightning_ood.tuning): one training pass for every candidate and
the others, invalid configurations skipped, selection by validation metric."""

from __future__ import annotations

import math

import pytest
import torch
from toys import LinearHeadNet

from lightning_ood import engine, tuning
from lightning_ood.detectors import ReAct, ViM, build_detector
from lightning_ood.metrics import METRIC_NAMES


def loader(n: int = 120, q: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, q, generator=g) * 3
    y = torch.arange(n) % 3
    return list(zip(x.split(40), y.split(40), strict=True))


def test_candidates_and_others_share_passes_and_equal_independent_fits() -> None:
    """Candidates (one accumulation, finalize-only copies) and an untuned ReAct that needs a
    second pass (max_samples below the value count) are fitted from the same restartable
    source; every one equals a detector fitted on its own."""
    net = LinearHeadNet(torch.randn(3, 6, dtype=torch.float64).float(), torch.zeros(3))
    data = loader()
    passes: list[int] = []

    def source() -> engine.Outputs:
        passes.append(1)
        return engine.labelled(engine.eval_pass(net, data))

    search = tuning.plan("react", "react", {"percentile": [50, 90]}, {"max_samples": 100})
    other = ReAct(percentile=75, max_samples=100, name="other")
    fitted, groups, invalid = tuning.fit_candidates(search.candidates, net, source, others=[other])
    assert groups == 1 and invalid == {} and len(passes) == 2  # first pass + one extra, shared
    for det, p in zip(fitted, (50, 90), strict=True):
        alone = ReAct(percentile=p)
        engine.fit_from_loader([alone], net, data)
        assert float(det.clip_value) == float(alone.clip_value)
    alone = ReAct(percentile=75)
    engine.fit_from_loader([alone], net, data)
    assert float(other.clip_value) == float(alone.clip_value)


def test_invalid_configurations_are_skipped_and_never_selected() -> None:
    net = LinearHeadNet(torch.randn(3, 6), torch.zeros(3))
    search = tuning.plan("vim", "vim", {"dim": [10, 3]})  # 10 >= q = 6: invalid
    fitted, _, invalid = tuning.fit_candidates(search.candidates, net, lambda: iter(
        engine.labelled(engine.eval_pass(net, loader()))
    ))  # fmt: skip
    assert [d.name for d in fitted] == ["vim[1]"] and set(invalid) == {"vim[0]"}
    assert "dim=10 must lie in [1, 5]" in invalid["vim[0]"]
    nan = dict.fromkeys(METRIC_NAMES, math.nan)
    val = {"vim[1]": {"a": nan}}  # even a NaN-scored fitted row ranks before an invalid one
    rows, best = tuning.select(search, fitted, val, "auroc", net, invalid)
    assert best == 1 and rows[0]["invalid"] == invalid["vim[0]"]
    assert tuning.detector_of(search, fitted, best) is fitted[0]
    with pytest.raises(ValueError, match=r"configuration \{'dim': 10\} was not fitted"):
        tuning.detector_of(search, fitted, 0)
    all_bad = tuning.plan("vim", "vim", {"dim": [10]})
    with pytest.raises(ValueError, match="every configuration is invalid"):
        tuning.select(all_bad, [], {}, "auroc", net, {"vim[0]": "dim too large"})
    assert isinstance(build_detector("vim", {"dim": 3}), ViM)
