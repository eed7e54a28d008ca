"""Baselines (MSP, ODIN, Energy, ReAct, DICE, DICE+ReAct) on hand-computed toy cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors import DICE, MSP, ODIN, DICEReAct, Energy, ReAct
from lightning_ood.detectors.base import Detector, Reducer, percentile
from lightning_ood.models.base import BackboneOutput, OODBackbone


def d64(*rows: object) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def lse(*z: float) -> float:
    m = max(z)
    return m + math.log(sum(math.exp(v - m) for v in z))


def logits_only(*rows: list[float]) -> BackboneOutput:
    logits = d64(*rows)
    return BackboneOutput(torch.zeros(len(rows), 1, dtype=torch.float64), logits)


def fit(
    det: Detector,
    model: OODBackbone,
    batches: list[Tensor],
    reducer: Reducer | None = None,
) -> Detector:
    """Fit ``det`` through the engine on feature batches, every sample labelled class 0."""
    loader = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches]
    engine.fit_from_loader([det], model, loader, reducer)
    return det


def score(det: Detector, model: OODBackbone, x: Tensor) -> Tensor:
    with torch.no_grad():
        return det.score(model.extract(x), model, x)


# -- logit-only scores -----------------------------------------------------------------------
def test_msp_by_hand() -> None:
    out = logits_only([2.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    e2 = math.exp(2.0)
    torch.testing.assert_close(MSP().score(out), d64(e2 / (e2 + 2), 1 / 3))


def test_energy_by_hand() -> None:
    out = logits_only([1.0, 2.0], [-1.0, 3.0])
    torch.testing.assert_close(Energy().score(out), d64(lse(1, 2), lse(-1, 3)))
    # T = 2: 2 * log(e^(1/2) + e^(2/2)).
    torch.testing.assert_close(
        Energy(temperature=2.0).score(out), d64(2 * lse(0.5, 1.0), 2 * lse(-0.5, 1.5))
    )


# -- ODIN ------------------------------------------------------------------------------------
def test_odin_without_perturbation_is_msp_of_scaled_logits() -> None:
    out = logits_only([2.0, 0.0, 1.0], [0.5, 0.4, -3.0])
    expected = MSP().score(logits_only([0.2, 0.0, 0.1], [0.05, 0.04, -0.3]))
    torch.testing.assert_close(ODIN(temperature=10.0, epsilon=0.0).score(out), expected)


def toy_linear() -> LinearHeadNet:
    return LinearHeadNet(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))


def test_odin_perturbation_by_hand() -> None:
    # f(x) = x, x = [.5, .2] -> ŷ = 0; ∇ₓ(−log S_0) = S − e_0 = [−, +]; x' = x − ε·[−1, +1].
    model, x = toy_linear(), d64([0.5, 0.2])
    odin = ODIN(temperature=1.0, epsilon=0.1)
    torch.testing.assert_close(odin.perturb(model, x), d64([0.6, 0.1]))
    sigmoid = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731 - 2-class softmax max
    torch.testing.assert_close(score(odin, model, x), d64(sigmoid(0.5)))
    # input_std divides the signed step per channel (dim 1): [-1/2, +1/0.5] * 0.1.
    scaled = ODIN(temperature=1.0, epsilon=0.1, input_std=[2.0, 0.5])
    torch.testing.assert_close(scaled.perturb(model, x), d64([0.55, 0.0]))
    torch.testing.assert_close(score(scaled, model, x), d64(sigmoid(0.55)))


def test_odin_step_raises_max_softmax_and_leaves_no_parameter_grads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

    class Net(OODBackbone):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.fc = model[:3], model[3]

        def forward_features(self, x: Tensor) -> Tensor:
            return self.body(x)

        def get_classifier(self) -> nn.Linear:
            return self.fc

    net = Net().eval()
    x = torch.randn(16, 3, 8, 8)
    odin = ODIN(temperature=1000.0, epsilon=0.002)
    with torch.no_grad():  # the callback scores under no_grad
        before = ODIN(temperature=1000.0, epsilon=0.0).score(net.extract(x))
        after = odin.score(net.extract(x), net, x)
    assert (after > before).all()
    assert all(p.grad is None for p in net.parameters())


def test_odin_candidates_differing_in_epsilon_share_one_backward_per_batch() -> None:
    """A tuning grid scores ODIN(T, ε) for many ε on each batch: the gradient sign depends on
    T only, so one backward serves them; another T, an in-place change of the batch or another
    batch tensor recomputes it, and every score equals a fresh computation."""
    torch.manual_seed(0)
    net = toy_linear()
    calls = []
    net.fc.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    x = torch.randn(6, 2, dtype=torch.float64)
    with torch.no_grad():
        out = net.extract(x)
    calls.clear()
    got = [ODIN(temperature=10.0, epsilon=e).score(out, net, x) for e in (0.001, 0.01, 0.1)]
    assert calls.count(True) == 1  # one gradient forward for the three candidates
    for e, g in zip((0.001, 0.01, 0.1), got, strict=True):
        fresh = x.clone()  # another tensor: nothing shared
        torch.testing.assert_close(g, ODIN(temperature=10.0, epsilon=e).score(out, net, fresh))
    calls.clear()
    ODIN(temperature=1.0, epsilon=0.1).score(out, net, x)
    x.mul_(-1.0)  # in place: the sign must be recomputed
    with torch.no_grad():
        out = net.extract(x)
    flipped = ODIN(temperature=1.0, epsilon=0.1).score(out, net, x)
    assert calls.count(True) == 2
    fresh = ODIN(temperature=1.0, epsilon=0.1).score(out, net, x.clone())
    torch.testing.assert_close(flipped, fresh)


def test_odin_errors() -> None:
    with pytest.raises(ValueError, match="needs `model` and `inputs`"):
        ODIN().score(logits_only([1.0, 2.0]))
    with pytest.raises(ValueError, match="floating-point"):
        ODIN().perturb(toy_linear(), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="input_std has 3 entries"):
        ODIN(input_std=[0.2, 0.2, 0.2]).perturb(toy_linear(), d64([0.5, 0.2]))


# -- ReAct -----------------------------------------------------------------------------------
REACT_W, REACT_B = d64([1.0, -1.0], [0.5, 2.0]), d64(0.0, 1.0)


def test_react_fixed_clip_by_hand() -> None:
    model = LinearHeadNet(REACT_W, REACT_B)
    x = d64([2.0, 0.5])  # clipped at 1: [1, .5] -> z = [1 - .5, .5 + 1 + 1]
    det = fit(ReAct(clip=1.0), model, [])
    torch.testing.assert_close(score(det, model, x), d64(lse(0.5, 2.5)))
    det_t = fit(ReAct(clip=1.0, temperature=2.0), model, [])
    torch.testing.assert_close(score(det_t, model, x), d64(2 * lse(0.25, 1.25)))


def test_react_percentile_by_hand() -> None:
    model = LinearHeadNet(REACT_W, REACT_B)
    # 6 training activations 0..5; 90th percentile: position 4.5 -> 4.5.
    det = fit(ReAct(), model, [d64([0.0, 1.0], [2.0, 3.0]), d64([4.0, 5.0])])
    assert float(det.clip_value) == 4.5
    # [5, 6] -> [4.5, 4.5]: z = [0, 2.25 + 9 + 1].
    torch.testing.assert_close(score(det, model, d64([5.0, 6.0])), d64(lse(0.0, 12.25)))
    # nothing of the training stream is kept in the checkpoint: only scalars and the head
    assert {k: tuple(v.shape) for k, v in det.state_dict().items() if v.dim()} == {
        "weight": (2, 2),
        "bias": (2,),
    }


def test_react_percentile_equals_numpy_when_all_values_fit() -> None:
    torch.manual_seed(1)
    h = torch.rand(300, 8) * 3
    model = LinearHeadNet(torch.randn(3, 8), torch.zeros(3))
    det = fit(ReAct(percentile=87.5), model, list(h.split(64)))
    assert float(det.clip_value) == pytest.approx(np.percentile(h.numpy(), 87.5), rel=1e-6)


@pytest.mark.parametrize("make", [ReAct, DICEReAct])
def test_react_percentile_is_exact_beyond_memory(make: type[Detector]) -> None:
    """More values than ``max_samples``: the radix selection takes a second pass over the
    training batches (the engine runs it) and still gives numpy's exact percentile, where the
    strided subsample it replaces did not."""
    torch.manual_seed(2)
    h = torch.rand(203, 4) * 3 - 0.5  # negative values too: the float order key must hold
    model = LinearHeadNet(torch.randn(3, 4), torch.zeros(3))
    passes: list[int] = []
    loader = [(x, torch.zeros(len(x), dtype=torch.long)) for x in h.split(17)]

    def counted() -> list:
        passes.append(1)
        return engine.labelled((x, y, model.extract(x)) for x, y in loader)

    det = make(percentile=87.5, max_samples=100)
    engine.fit_detectors([det], model, counted)
    assert len(passes) == 2  # float32: top 16 bits, then the low 16 bits of the prefix
    clip = det.clip_value
    expected = np.percentile(h.numpy().astype(np.float64), 87.5)
    assert float(clip) == pytest.approx(expected, rel=1e-6)
    assert float(clip) == float(percentile(h.flatten(), 87.5))  # bit-identical to the sort
    in_memory = make(percentile=87.5)
    engine.fit_detectors([in_memory], model, counted)
    assert len(passes) == 3  # everything fit in memory: one pass
    torch.testing.assert_close(in_memory.state_dict(), det.state_dict(), equal_nan=True)


def test_a_one_shot_stream_cannot_feed_a_second_pass() -> None:
    model = LinearHeadNet(torch.randn(3, 4), torch.zeros(3))
    h = torch.rand(50, 4)
    stream = iter([(model.extract(h), torch.zeros(50, dtype=torch.long))])
    with pytest.raises(ValueError, match=r"\['react'\] need another pass.*max_samples"):
        engine.fit_detectors([ReAct(max_samples=10)], model, stream)


class TwoRanks(Reducer):
    """Rank 0's view of a 2-rank run: add/concatenate the other rank's tensors in call order."""

    def __init__(self, other: list[Tensor]) -> None:
        self.other = list(other)

    def sum(self, t: Tensor) -> Tensor:
        return t + self.other.pop(0)

    def cat(self, t: Tensor) -> Tensor:
        return torch.cat([t, self.other.pop(0)])


class Recorder(Reducer):
    def __init__(self) -> None:
        self.seen: list[Tensor] = []

    def sum(self, t: Tensor) -> Tensor:
        self.seen.append(t.clone())
        return t

    def cat(self, t: Tensor) -> Tensor:
        self.seen.append(t.clone())
        return t


@pytest.mark.parametrize("make", [ReAct, DICE, DICEReAct])
def test_two_rank_fit_equals_single_process(make: type[Detector]) -> None:
    torch.manual_seed(3)
    h = torch.rand(120, 6) * 2
    model = LinearHeadNet(torch.randn(4, 6), torch.randn(4))
    single = fit(make(), model, list(h.split(32)))
    rank1 = Recorder()
    fit(make(), model, [h[60:]], rank1)
    rank0 = fit(make(), model, [h[:60]], TwoRanks(rank1.seen))
    for (name, a), (_, b) in zip(single.named_buffers(), rank0.named_buffers(), strict=True):
        # equal_nan: the decision threshold stays NaN until calibrate()
        torch.testing.assert_close(a, b, msg=name, equal_nan=True)


# -- DICE ------------------------------------------------------------------------------------
DICE_W, DICE_B = d64([1.0, -2.0, 3.0], [2.0, 1.0, -1.0]), d64(0.0, 0.5)
DICE_TRAIN = [d64([1.0, 2.0, 0.0]), d64([3.0, 0.0, 2.0])]  # mean [2, 1, 1]


def test_dice_by_hand() -> None:
    model = LinearHeadNet(DICE_W, DICE_B)
    det = fit(DICE(p=50.0), model, DICE_TRAIN)
    torch.testing.assert_close(det.feature_mean, d64(2.0, 1.0, 1.0))
    # V = ā ⊙ W = [[2, -2, 3], [4, 1, -1]]; sorted [-2, -1, 1, 2, 3, 4]: position 2.5 -> 1.5.
    # The weight percentile is prune_threshold; threshold (decision) stays NaN until calibrate.
    assert float(det.prune_threshold) == 1.5
    assert math.isnan(float(det.threshold)) and not det.is_calibrated
    assert det.mask.tolist() == [[True, False, True], [True, False, False]]
    # h = [1, 1, 1]: z = [1 + 3, 2 + .5].
    torch.testing.assert_close(score(det, model, d64([1.0, 1.0, 1.0])), d64(lse(4.0, 2.5)))
    # DICE with a fixed clip of .5: z = [.5 + 1.5, 1 + .5].
    clipped = fit(DICE(p=50.0, clip=0.5), model, DICE_TRAIN)
    torch.testing.assert_close(score(clipped, model, d64([1.0, 1.0, 1.0])), d64(lse(2.0, 1.5)))


def test_dice_decision_threshold_is_not_its_weight_percentile() -> None:
    """The weight percentile is ``prune_threshold``; ``threshold`` is the decision threshold,
    NaN until calibrate() (once the same buffer: a fresh DICE looked calibrated at 0)."""
    fresh = DICE(p=50.0)
    assert not fresh.is_calibrated and math.isnan(float(fresh.threshold))
    model = LinearHeadNet(DICE_W, DICE_B)
    det = fit(DICE(p=50.0), model, DICE_TRAIN)
    assert not det.is_calibrated and math.isnan(float(det.threshold))
    assert float(det.prune_threshold) == 1.5
    x = d64([1.0, 1.0, 1.0], [0.0, 2.0, 1.0], [2.0, 0.0, 0.0], [1.0, 0.0, 3.0])
    scores = score(det, model, x)  # [lse(4, 2.5), lse(3, .5), lse(2, 4.5), lse(10, 2.5)]
    torch.testing.assert_close(scores, d64(lse(4, 2.5), lse(3, 0.5), lse(2, 4.5), lse(10, 2.5)))
    assert det.calibrate(scores, tpr=0.75) == float(scores[0])  # sorted: [1], [0], [2], [3]
    assert det.is_calibrated and float(det.threshold) == float(scores[0])
    assert det.threshold.dtype == torch.float64 and float(det.threshold_tpr) == 0.75
    assert float(det.prune_threshold) == 1.5  # calibration leaves the mask alone
    assert torch.equal(score(det, model, x), scores)


def _old_dice_state(det: DICE, threshold: float | None, tpr: float | None) -> dict[str, Tensor]:
    """``det``'s state dict as DICE wrote it before ``prune_threshold``: the weight percentile
    (or, once calibrated, the decision threshold) in ``threshold`` (float32)."""
    state = det.state_dict()
    percentile_value = state.pop("prune_threshold")
    state["threshold"] = percentile_value if threshold is None else torch.tensor(threshold)
    if tpr is None:
        del state["threshold_tpr"]  # written before decision thresholds existed
    else:
        state["threshold_tpr"] = torch.tensor(tpr, dtype=torch.float64)
    return state


@pytest.mark.parametrize(
    ("threshold", "tpr", "decision"),
    [(None, math.nan, math.nan), (None, None, math.nan), (2.5, 0.95, 2.5)],
)
def test_dice_loads_old_state_dicts(
    threshold: float | None, tpr: float | None, decision: float
) -> None:
    model = LinearHeadNet(DICE_W, DICE_B)
    det = fit(DICE(p=50.0), model, DICE_TRAIN)
    fresh = DICE(p=50.0)
    fresh.load_state_dict(_old_dice_state(det, threshold, tpr))
    assert float(fresh.prune_threshold) == 1.5  # recomputed from weight and feature_mean
    assert fresh.prune_threshold.dtype == torch.float32
    assert torch.equal(fresh.mask, det.mask)
    if math.isnan(decision):  # the old percentile is no decision threshold
        assert math.isnan(float(fresh.threshold)) and not fresh.is_calibrated
    else:  # calibrate() had overwritten it: keep it
        assert float(fresh.threshold) == decision and float(fresh.threshold_tpr) == tpr
    x = d64([1.0, 1.0, 1.0], [0.0, 2.0, 1.0])
    assert torch.equal(score(fresh, model, x), score(det, model, x))


def test_dice_loads_an_old_unfitted_state_dict() -> None:
    state = _old_dice_state(DICE(p=50.0), None, math.nan)
    assert float(state["threshold"]) == 0.0  # what an old fresh DICE held
    fresh = DICE(p=50.0)
    fresh.load_state_dict(state)
    assert not fresh.is_fitted and not fresh.is_calibrated
    assert float(fresh.prune_threshold) == 0.0


def test_dice_react_by_hand() -> None:
    model = LinearHeadNet(DICE_W, DICE_B)
    det = fit(DICEReAct(p=50.0, percentile=50.0), model, DICE_TRAIN)
    # Same mask as DICE (unclipped mean); c = percentile([0, 0, 1, 2, 2, 3], 50) = 1.5.
    assert det.mask.tolist() == [[True, False, True], [True, False, False]]
    assert float(det.clip_value) == 1.5
    # h = [2, 1, 3] -> [1.5, 1, 1.5]: z = [1.5 + 4.5, 3 + .5].
    torch.testing.assert_close(score(det, model, d64([2.0, 1.0, 3.0])), d64(lse(6.0, 3.5)))


def test_dice_matches_numpy_reference() -> None:
    torch.manual_seed(4)
    h = torch.rand(200, 30).double()
    model = LinearHeadNet(torch.randn(10, 30).double(), torch.randn(10).double())
    det = fit(DICE(p=90.0), model, list(h.split(50)))
    w, b = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    v = h.numpy().mean(axis=0)[None, :] * w
    masked = w * (v > np.percentile(v, 90.0))
    x = torch.rand(20, 30).double()
    z = x.numpy() @ masked.T + b
    expected = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    np.testing.assert_allclose(score(det, model, x).numpy(), expected, rtol=1e-12)
    assert int(det.mask.sum()) == 30  # strict > keeps 10 % of the 300 weights


# -- checkpoints and validation --------------------------------------------------------------
@pytest.mark.parametrize(
    "det", [ReAct(), ReAct(clip=0.7), DICE(p=70.0), DICEReAct(p=80.0, percentile=95.0)]
)
def test_state_dict_round_trip(det: Detector) -> None:
    torch.manual_seed(5)
    h = torch.rand(90, 6)
    model = LinearHeadNet(torch.randn(4, 6), torch.randn(4))
    fit(det, model, list(h.split(30)))
    config = det.config()
    fresh = type(det)(**{k: v for k, v in config.items() if k != "type"})
    assert not fresh.is_fitted
    fresh.load_state_dict(det.state_dict())
    x = torch.rand(10, 6)
    assert torch.equal(score(fresh, model, x), score(det, model, x))


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: Energy(temperature=0.0), "temperature"),
        (lambda: ODIN(temperature=-1.0), "temperature"),
        (lambda: ODIN(epsilon=-0.1), "epsilon"),
        (lambda: ODIN(input_std=[0.2, 0.0, 0.2]), "input_std"),
        (lambda: ReAct(clip=0.0), "clip"),
        (lambda: ReAct(percentile=0.0), "percentile"),
        (lambda: ReAct(percentile=101.0), "percentile"),
        (lambda: ReAct(temperature=math.inf), "temperature"),
        (lambda: ReAct(max_samples=0), "max_samples"),
        (lambda: DICE(p=100.0), "p="),
        (lambda: DICE(p=-5.0), "p="),
        (lambda: DICE(clip=-1.0), "clip"),
        (lambda: DICEReAct(percentile=200.0), "percentile"),
    ],
)
def test_bad_hyperparameters_name_the_parameter(make: object, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()


def test_unfitted_detectors_refuse_to_score() -> None:
    for det in (ReAct(), DICE(), DICEReAct()):
        with pytest.raises(RuntimeError, match="not fitted"):
            det.score(BackboneOutput(torch.rand(2, 3), torch.rand(2, 2)))


def test_routing_flags_follow_the_hyperparameters() -> None:
    """ODIN needs input gradients only with epsilon > 0; ReAct reads training data only when
    its clip is estimated (a fixed clip fits from the head alone)."""
    assert ODIN(epsilon=0.0).needs_input_grad is False
    assert ODIN(epsilon=0.001).needs_input_grad is True
    assert ReAct(clip=1.0).uses_training_data is False
    assert ReAct().uses_training_data is True
    w, b = torch.tensor([[1.0, -1.0], [0.5, 2.0]]), torch.tensor([0.0, 0.1])
    det = ReAct(clip=1.0)
    engine.fit_detectors([det], LinearHeadNet(w, b))  # no training data at all
    h = torch.tensor([[3.0, 0.5]])
    expected = torch.logsumexp(torch.tensor([[1.0, 0.5]]) @ w.T + b, dim=1)
    torch.testing.assert_close(det.score(BackboneOutput(h, h @ w.T + b)), expected)
