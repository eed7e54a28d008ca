"""The combiner a layer ensemble ships: fitted on ID validation (+ validation OOD) data only,
by engine.deploy_combiners; the OOD-free fallback is the mean of ID-z-scored components."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from lightning_ood import engine
from lightning_ood.detectors import build_detector
from lightning_ood.detectors.msp import MSP


def _fssd(**kw: object):
    return build_detector("fssd", {"taps": ["a", "b", "c"], "combiner": "lr", **kw})


def test_id_only_combiner_is_the_mean_of_z_scores() -> None:
    g = torch.Generator().manual_seed(0)
    cid = torch.randn(50, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1])
    det = _fssd()
    det.fit_id_only_combiner(cid)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    mu, sd = cid.mean(0), cid.std(0, unbiased=False)
    expected = ((x - mu) / sd).mean(1)
    torch.testing.assert_close(det.combine(x), expected, rtol=0, atol=1e-12)
    assert bool(det.combiner_fitted)
    # a constant component does not divide by zero
    flat = cid.clone()
    flat[:, 1] = 4.0
    det.fit_id_only_combiner(flat)
    assert float(det.combiner_scale[1]) == 1.0


def test_id_only_combiner_refuses_what_it_cannot_fit() -> None:
    det = _fssd()
    with pytest.raises(ValueError, match="at least 2 ID validation samples"):
        det.fit_id_only_combiner(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="NaN/inf"):
        det.fit_id_only_combiner(torch.tensor([[0.0, 1.0, float("nan")]] * 3))
    with pytest.raises(ValueError, match="K=3"):
        det.fit_id_only_combiner(torch.zeros(4, 2))


def test_deploy_combiners_fits_logistic_with_validation_ood_and_the_fallback_without() -> None:
    g = torch.Generator().manual_seed(1)
    cid = torch.randn(40, 3, generator=g, dtype=torch.float64) + 1.0
    cood = torch.randn(30, 3, generator=g, dtype=torch.float64) - 1.0
    dets = {"fssd": _fssd(), "msp": MSP()}
    bank = {"fssd": cid, "msp": torch.rand(40, dtype=torch.float64)}
    how = engine.deploy_combiners(dets, bank, {"fssd": cood})
    assert how == {"fssd": {"method": "logistic", "n_id": 40, "n_ood": 30}}
    ref = LogisticRegression(C=1.0, max_iter=1000).fit(
        np.concatenate([cid.numpy(), cood.numpy()]), np.r_[np.ones(40), np.zeros(30)]
    )
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        dets["fssd"].combine(x),
        torch.from_numpy(ref.decision_function(x.numpy())),
        atol=1e-6,
        rtol=0,
    )
    how = engine.deploy_combiners(dets, bank)
    assert how == {"fssd": {"method": "id_zscore_mean", "n_id": 40, "n_ood": 0}}
    shipped = engine.combined_scores(dets, bank)
    torch.testing.assert_close(
        shipped["fssd"], ((cid - cid.mean(0)) / cid.std(0, unbiased=False)).mean(1)
    )
    assert shipped["msp"] is bank["msp"]


def test_a_single_component_ships_without_a_combiner() -> None:
    det = build_detector("mahalanobis", {})
    how = engine.deploy_combiners({"m": det}, {"m": torch.randn(10, 1)})
    assert how == {} and not bool(det.combiner_fitted)


def test_fgsm_batches_step_along_the_sign_of_the_loss_gradient() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    from lightning_ood.models import wrap

    model = wrap(net, head="1", input_shape=(3, 2, 2))
    x = torch.randn(5, 3, 2, 2)
    std = [0.5, 0.25, 1.0]
    (got, y), *_ = list(engine.fgsm_batches(model, [(x, torch.arange(5))], eps=0.1, input_std=std))
    assert all(p.grad is None for p in net.parameters())  # input gradients only
    xg = x.clone().requires_grad_(True)
    logits = net(xg)
    torch.nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum").backward()
    step = 0.1 / torch.tensor(std).view(1, 3, 1, 1) * xg.grad.sign()
    torch.testing.assert_close(got, x + step, rtol=0, atol=0)
    assert torch.equal(y, torch.arange(5))


def test_deploy_prefers_validation_ood_then_the_proxy_then_the_id_only_mean() -> None:
    g = torch.Generator().manual_seed(2)
    cid = torch.randn(40, 3, generator=g, dtype=torch.float64) + 1.0
    proxy = torch.randn(40, 3, generator=g, dtype=torch.float64) - 0.5
    cood = torch.randn(30, 3, generator=g, dtype=torch.float64) - 1.0
    det = _fssd()
    how = engine.deploy_combiners({"f": det}, {"f": cid}, None, {"f": proxy})
    assert how == {"f": {"method": "logistic_fgsm_proxy", "n_id": 40, "n_ood": 40}}
    ref = LogisticRegression(C=1.0, max_iter=1000).fit(
        np.concatenate([cid.numpy(), proxy.numpy()]), np.r_[np.ones(40), np.zeros(40)]
    )
    torch.testing.assert_close(
        det.combine(cid), torch.from_numpy(ref.decision_function(cid.numpy())), atol=1e-6, rtol=0
    )
    how = engine.deploy_combiners({"f": det}, {"f": cid}, {"f": cood}, {"f": proxy})
    assert how["f"]["method"] == "logistic" and how["f"]["n_ood"] == 30
