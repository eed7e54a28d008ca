"""ASH and SCALE: hand-computed shaping and scores, the per-sample percentile count, energy
composition, fitting and checkpoint state, and pytorch-ood's ASH/SCALE as a peer oracle."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors import DETECTORS, Energy, build_detector
from lightning_ood.detectors.ash import ASH, PERCENTILE_SWEEP, kept_count, shaping_ratio
from lightning_ood.detectors.base import Detector
from lightning_ood.detectors.scale import SCALE
from lightning_ood.models.base import BackboneOutput


def d64(*rows: object) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def lse(*z: float) -> float:
    m = max(z)
    return m + math.log(sum(math.exp(v - m) for v in z))


# The hand-computed example: one sample, 6 features, a 2-class head.
# p = 65: k = 6 - round(6 * 0.65) = 6 - round(3.9) = 2 -> the values 6 (index 1) and 5 (index 3)
# survive; s1 = 21 (all), s2 = 11 (kept), r = 21/11.
H = d64([3.0, 6.0, 1.0, 5.0, 2.0, 4.0])
W = d64([1.0] * 6, [0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # row 0 sums the feature, row 1 reads h_1
B = d64(0.0, 1.0)
R = 21.0 / 11.0


def toy() -> LinearHeadNet:
    return LinearHeadNet(W, B).eval()


def fitted(det: Detector, model: LinearHeadNet | None = None) -> Detector:
    """Fit ``det`` through the engine: no training data is read, finalize copies the head."""
    assert not engine.reads_training_data(det)
    engine.fit_detectors([det], model or toy())
    return det


def score(det: Detector, h: Tensor, model: LinearHeadNet | None = None) -> Tensor:
    with torch.no_grad():
        return engine.score_batch({"d": det}, (model or toy()).extract(h))["d"]


# -- hand-computed values -------------------------------------------------------------------------
def test_ash_variants_by_hand() -> None:
    p = fitted(ASH(variant="p", percentile=65))
    torch.testing.assert_close(p.shaped(H), d64([0.0, 6.0, 0.0, 5.0, 0.0, 0.0]))
    # logits [0+6+0+5+0+0, 6 + 1]
    torch.testing.assert_close(score(p, H), d64(lse(11.0, 7.0)))

    b = fitted(ASH(variant="b", percentile=65))
    # the kept positions get s1 / k = 21 / 2
    torch.testing.assert_close(b.shaped(H), d64([0.0, 10.5, 0.0, 10.5, 0.0, 0.0]))
    torch.testing.assert_close(score(b, H), d64(lse(21.0, 11.5)))

    s = fitted(ASH(variant="s", percentile=65))
    e = math.exp(R)
    torch.testing.assert_close(s.shaped(H), d64([0.0, 6.0 * e, 0.0, 5.0 * e, 0.0, 0.0]))
    torch.testing.assert_close(score(s, H), d64(lse(11.0 * e, 6.0 * e + 1.0)))

    # temperature: T * lse(z / T)
    s2 = fitted(ASH(variant="s", percentile=65, temperature=2.0))
    torch.testing.assert_close(score(s2, H), d64(2.0 * lse(5.5 * e, 3.0 * e + 0.5)))


def test_scale_by_hand() -> None:
    det = fitted(SCALE(percentile=65))
    e = math.exp(R)
    # the whole feature is scaled, nothing pruned: logits [21 e, 6 e + 1]
    torch.testing.assert_close(det.scaled(H), H * e)
    torch.testing.assert_close(score(det, H), d64(lse(21.0 * e, 6.0 * e + 1.0)))
    det2 = fitted(SCALE(percentile=65, temperature=2.0))
    torch.testing.assert_close(score(det2, H), d64(2.0 * lse(10.5 * e, 3.0 * e + 0.5)))
    # p = 0: s2 = s1, factor e for every sample
    det0 = fitted(SCALE(percentile=0))
    torch.testing.assert_close(score(det0, H), d64(lse(21.0 * math.e, 6.0 * math.e + 1.0)))


def test_the_percentile_is_each_samples_own() -> None:
    """A batch-global threshold would prune the whole small row; per sample, each row keeps
    its own two largest values."""
    small = H / 10
    batch = torch.cat([H, small])
    p = fitted(ASH(variant="p", percentile=65))
    torch.testing.assert_close(
        p.shaped(batch), d64([0, 6.0, 0, 5.0, 0, 0], [0, 0.6, 0, 0.5, 0, 0]), rtol=0, atol=1e-15
    )
    torch.testing.assert_close(score(p, batch), d64(lse(11.0, 7.0), lse(1.1, 1.6)))
    # the SCALE factor is scale-free: both rows get r = 21/11
    torch.testing.assert_close(
        shaping_ratio(batch, batch.topk(2, dim=1).values), d64(R, R), rtol=1e-15, atol=0
    )
    # scores of a row do not depend on its batch-mates
    for det in (p, fitted(ASH(variant="b")), fitted(ASH()), fitted(SCALE())):
        torch.testing.assert_close(score(det, batch)[1:], score(det, small))


@pytest.mark.parametrize(
    ("n", "p", "k"),
    [
        (6, 65, 2),  # round(3.9) = 4
        (6, 75, 2),  # round(4.5) = 4: half to even, as the reference's np.round
        (6, 90, 1),
        (6, 0, 6),  # nothing pruned
        (4, 65, 1),  # a count: numpy's interpolated 65th percentile would keep two
        (10, 65, 4),  # round(6.5) = 6
        (512, 90, 51),  # round(460.8) = 461
        (8, 95, 1),  # round(7.6) = 8 would keep none (reference: division by zero): keep 1
        (1, 50, 1),
    ],
)
def test_kept_count(n: int, p: float, k: int) -> None:
    assert kept_count(n, p) == k


def test_kept_count_is_the_reference_count_wherever_it_keeps_something() -> None:
    # the ASH authors' ash.py, OpenOOD's ash_net.py/scale_net.py: k = n - int(np.round(n*p/100))
    for n in (3, 6, 10, 64, 342, 512, 2048):
        for p in (*PERCENTILE_SWEEP, 0.0, 12.5, 50.0, 99.0):
            ref = n - int(np.round(n * p / 100.0))
            assert kept_count(n, p) == max(ref, 1), (n, p)


def test_dead_features_score_finite() -> None:
    """An all-zero feature: the reference's s1/s2 = 0/0 is NaN; here the factor is 1 and the
    score is the energy of the bias."""
    zero = torch.zeros(1, 6, dtype=torch.float64)
    for det in (fitted(ASH(variant=v)) for v in "pbs"):
        torch.testing.assert_close(score(det, zero), d64(lse(0.0, 1.0)))
    torch.testing.assert_close(score(fitted(SCALE()), zero), d64(lse(0.0, 1.0)))


# -- energy composition ----------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_scores_are_the_energy_of_the_shaped_logits(temperature: float) -> None:
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, generator=g)
    model = LinearHeadNet(w, b.double())
    h = torch.randn(9, 12, generator=g, dtype=torch.float64).relu()
    energy = Energy(temperature=temperature)

    def energy_of(a: Tensor) -> Tensor:
        return energy.score(BackboneOutput(a, a @ w.T + b.double()))

    for variant in "pbs":
        det = fitted(ASH(variant=variant, percentile=70, temperature=temperature), model)
        torch.testing.assert_close(score(det, h, model), energy_of(det.shaped(h)))
    det = fitted(SCALE(percentile=70, temperature=temperature), model)
    torch.testing.assert_close(score(det, h, model), energy_of(det.scaled(h)))
    # ASH-P with nothing pruned is the plain energy score of the model's logits
    plain = fitted(ASH(variant="p", percentile=0, temperature=temperature), model)
    with torch.no_grad():
        out = model.extract(h)
    torch.testing.assert_close(plain.score(out), energy.score(out))


# -- fitting, state, errors ------------------------------------------------------------------------
@pytest.mark.parametrize("make", [ASH, SCALE])
def test_fitted_flag_and_head_copy(make: type[Detector]) -> None:
    det = make()
    assert det.requires_fit and not det.uses_training_data and not det.is_fitted
    out = toy().extract(H)
    with pytest.raises(RuntimeError, match=r"detector '(ash|scale)' .* is not fitted"):
        det.score(out)
    engine.fit_detectors([det], toy())  # no training outputs needed
    assert det.is_fitted
    torch.testing.assert_close(det.weight, W)
    torch.testing.assert_close(det.bias, B)
    # only the head is kept
    assert {k: tuple(v.shape) for k, v in det.state_dict().items() if v.dim()} == {
        "weight": (2, 6),
        "bias": (2,),
    }
    det.mark_unfitted()
    with pytest.raises(RuntimeError, match="not fitted"):
        det.score(out)


@pytest.mark.parametrize(
    ("make", "kwargs"),
    [(ASH, {"variant": "p"}), (ASH, {"variant": "b"}), (ASH, {}), (SCALE, {})],
)
def test_checkpoint_round_trip(make: type[Detector], kwargs: dict) -> None:
    g = torch.Generator().manual_seed(5)
    model = LinearHeadNet(torch.randn(4, 10, generator=g), torch.randn(4, generator=g))
    h = torch.randn(7, 10, generator=g).relu()
    det = fitted(make(**kwargs, percentile=75.0, temperature=1.5), model)
    want = score(det, h, model)
    fresh = make(**kwargs, percentile=75.0, temperature=1.5)
    assert fresh.weight.numel() == 0 and not fresh.is_fitted
    fresh.load_state_dict(det.state_dict())
    assert fresh.is_fitted and fresh.config() == det.config()
    assert torch.equal(score(fresh, h, model), want)


@pytest.mark.parametrize("make", [ASH, SCALE])
def test_wrong_feature_width_and_empty_batch(make: type[Detector]) -> None:
    det = fitted(make())
    with pytest.raises(ValueError, match=r"features must have shape \(B, 6\), got \(1, 5\)"):
        det.score(BackboneOutput(torch.zeros(1, 5), torch.zeros(1, 2)))
    empty = torch.zeros(0, 6, dtype=torch.float64)
    assert det.score(BackboneOutput(empty, torch.zeros(0, 2))).shape == (0,)


def test_bad_hyperparameters_are_named() -> None:
    with pytest.raises(
        ValueError, match=r"ASH: variant='ash_s' is not supported.*\['p', 'b', 's'\]"
    ):
        ASH(variant="ash_s")
    for make in (ASH, SCALE):
        name = make.__name__
        for p in (-1.0, 100.0, float("nan")):
            with pytest.raises(
                ValueError, match=rf"{name}: hyperparameter percentile=.* \[0.0, 100"
            ):
                make(percentile=p)
        with pytest.raises(ValueError, match=rf"{name}: hyperparameter temperature=0"):
            make(temperature=0.0)


def test_declared_contract() -> None:
    assert ASH.kind == "ash" and SCALE.kind == "scale"
    assert ASH.search_space == {"percentile": (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)}
    assert SCALE.search_space == ASH.search_space
    assert ASH.finalize_only == {"variant", "percentile", "temperature"}
    assert SCALE.finalize_only == {"percentile", "temperature"}
    assert ASH().config() == {
        "type": "ash",
        "variant": "s",
        "percentile": 90.0,
        "temperature": 1.0,
        "name": "ash",
    }
    assert SCALE().config() == {
        "type": "scale",
        "percentile": 85.0,
        "temperature": 1.0,
        "name": "scale",
    }


@pytest.mark.parametrize(("kind", "cls"), [("ash", ASH), ("scale", SCALE)])
def test_registry(kind: str, cls: type[Detector]) -> None:
    assert kind in DETECTORS, f"{kind!r} is missing from the detector registry"
    assert DETECTORS[kind] is cls
    det = build_detector("x", {"type": kind, "percentile": 70})
    assert isinstance(det, cls) and det.percentile == 70.0 and det.name == "x"


# -- pytorch-ood 0.4.0 as a peer oracle ----------------------------------------------------------
class AsMaps(nn.Module):
    """pytorch-ood's ASH/SCALE take 4-d feature maps: (B, q) -> (B, q, 1, 1), i.e. the pooled
    penultimate feature, exactly what ours shape."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, None, None]


class FlatHead(nn.Module):
    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


def peer_setup() -> tuple[LinearHeadNet, Tensor]:
    g = torch.Generator().manual_seed(11)
    w = torch.randn(10, 64, generator=g, dtype=torch.float64)
    b = torch.randn(10, generator=g, dtype=torch.float64)
    h = torch.randn(32, 64, generator=g, dtype=torch.float64).relu() * 2
    return LinearHeadNet(w, b).eval(), h


@pytest.mark.parametrize("percentile", PERCENTILE_SWEEP)
@pytest.mark.parametrize("variant", ["p", "b", "s"])
def test_ash_equals_pytorch_ood(variant: str, percentile: float) -> None:
    """pytorch_ood/detector/ash.py ``_prune``/``ash_p``/``ash_b``/``ash_s`` (k = n -
    int(np.round(n * fraction))) then ``EnergyBased.score`` = -logsumexp: the same features
    and head give the negated score. The percentile is a fraction there; 64 features never
    hit a rounding tie in this sweep. Ours keeps at least one value and scores 0/0 as a
    factor 1 (``kept_count``, ``shaping_ratio``); neither case occurs here."""
    detector = importlib.import_module("pytorch_ood.detector")  # dev extra
    model, h = peer_setup()
    ours = score(fitted(ASH(variant=variant, percentile=percentile), model), h, model)
    peer = detector.ASH(
        AsMaps(), FlatHead(model.fc), variant=f"ash-{variant}", percentile=percentile / 100
    )
    torch.testing.assert_close(ours, -peer.predict(h), rtol=1e-10, atol=0)


@pytest.mark.parametrize("percentile", PERCENTILE_SWEEP)
def test_scale_equals_pytorch_ood(percentile: float) -> None:
    """pytorch_ood/detector/scale.py ``scale``: x * exp(s1 / s2) with s2 the top-k sum."""
    detector = importlib.import_module("pytorch_ood.detector")  # dev extra
    model, h = peer_setup()
    ours = score(fitted(SCALE(percentile=percentile), model), h, model)
    peer = detector.SCALE(AsMaps(), FlatHead(model.fc), percentile=percentile / 100)
    torch.testing.assert_close(ours, -peer.predict(h), rtol=1e-10, atol=0)
