"""The state every detector owns: finalize-only hyperparameters, the taps it reads, forgetting
a fit, and the layer-ensemble combiner state."""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor
from toys import TapNet, fitted

from lightning_ood import engine
from lightning_ood.detectors import DETECTORS, FSSD, LINe, Mahalanobis, build_detector
from lightning_ood.detectors.base import Detector
from lightning_ood.detectors.hparams import STAGES

STD = [0.5, 0.25]

#: Kinds whose scoring needs a model TapNet is not (ensemble member checkpoints, dropout
#: layers): their finalize-only declarations, checked here and exercised in test_de_mcd.py.
OWN_MODEL_FINALIZE_ONLY = {
    "de": frozenset({"include_model"}),
    "fssd_ensemble": frozenset(
        {"noise", "n_noise", "noise_seed", "batch_size", "combiner", "standardize", "default_layer"}
    ),
    "mcd": frozenset({"passes", "seed", "max_batch"}),
    "mcd_var": frozenset({"passes", "seed", "max_batch"}),
}

#: KNN and NNGuide (the bank detectors): k below TapNet's 48 training samples.
KNN_CASE: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = (
    {"bank_fraction": 1.0, "seed": 0},
    {"k": 2, "store_bank": False, "backend": "auto", "query_chunk": 1024, "bank_chunk": 16384},
    {"k": 5, "store_bank": True, "backend": "torch", "query_chunk": 3, "bank_chunk": 7},
)

#: Per kind: hyperparameters shared by both configurations, then configurations A and B that
#: differ in every finalize-only hyperparameter (and in nothing else).
FINALIZE_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "energy": ({}, {"temperature": 1.0}, {"temperature": 2.5}),
    "gen": ({}, {"gamma": 0.1, "M": 2}, {"gamma": 0.7, "M": 3}),
    "odin": (
        {},
        {"temperature": 1000.0, "epsilon": 0.0, "input_std": None},
        {"temperature": 10.0, "epsilon": 0.01, "input_std": STD},
    ),
    "react": (
        {"clip": None, "max_samples": 100},
        {"percentile": 90.0, "temperature": 1.0},
        {"percentile": 60.0, "temperature": 2.0},
    ),
    "dice": ({}, {"p": 90.0, "clip": None}, {"p": 50.0, "clip": 0.3}),
    "vim": ({"max_samples": 1_000_000, "seed": 0}, {"dim": 4}, {"dim": 2}),
    "ash": (
        {},
        {"variant": "s", "percentile": 90.0, "temperature": 1.0},
        {"variant": "b", "percentile": 65.0, "temperature": 2.0},
    ),
    "scale": (
        {},
        {"percentile": 85.0, "temperature": 1.0},
        {"percentile": 65.0, "temperature": 2.0},
    ),
    "gradnorm": (
        {},
        {"temperature": 1.0, "include_bias": False},
        {"temperature": 2.0, "include_bias": True},
    ),
    "nci": ({}, {"alpha": 1e-4, "cosine": False}, {"alpha": 0.1, "cosine": True}),
    "fdbd": ({}, {"distance_as_normalizer": True}, {"distance_as_normalizer": False}),
    "knn": KNN_CASE,
    "nnguide": KNN_CASE,
    "dice_react": (
        {"clip": None, "max_samples": 100},
        {"p": 90.0, "percentile": 90.0},
        {"p": 50.0, "percentile": 60.0},
    ),
    "line": (
        {"contribution": "closed_form"},
        {
            "delta": 1.0,
            "p_a": 90.0,
            "p_w": 90.0,
            "clip": True,
            "act_prune": True,
            "weight_prune": True,
            "abs_contribution": False,
        },
        {
            "delta": 0.3,
            "p_a": 50.0,
            "p_w": 70.0,
            "clip": False,
            "act_prune": False,
            "weight_prune": True,
            "abs_contribution": True,
        },
    ),
    "mahalanobis": (
        {"taps": ["conv", "features"]},
        {
            "combiner": "cv",
            "standardize": False,
            "default_layer": -1,
            "epsilon": 0.0,
            "input_std": None,
        },
        {
            "combiner": "lr",
            "standardize": True,
            "default_layer": 0,
            "epsilon": 0.01,
            "input_std": STD,
        },
    ),
    "fssd": (
        {"taps": None},
        {
            "noise": "reference",
            "n_noise": 20,
            "noise_seed": 0,
            "epsilon": 0.0,
            "direction": "reference",
            "grad_norm": "batch",
            "input_std": None,
            "batch_size": 100,
            "combiner": "cv",
            "standardize": False,
            "default_layer": -1,
        },
        {
            "noise": "uniform",
            "n_noise": 30,
            "noise_seed": 3,
            "epsilon": 0.01,
            "direction": "paper",
            "grad_norm": "sample",
            "input_std": STD,
            "batch_size": 7,
            "combiner": "lr",
            "standardize": True,
            "default_layer": 0,
        },
    ),
}


#: Kinds whose defaults bound each class by its correctly classified training samples, which
#: TapNet's random toy data may leave empty: fitted on every labelled sample instead.
TOY_DATA_CASES: dict[str, dict[str, Any]] = {
    "she": {"correct_only": False},
    "openmax": {"correct_only": False},
    "gram": {"samples": "label"},
    "adascale": {"k1": 25.0, "k2": 25.0},  # 8 toy features: 5 % and 1 % select none
}


@pytest.fixture
def model() -> TapNet:
    torch.manual_seed(0)
    return TapNet().eval()


def data(seed: int, n: int = 48, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g) + shift, torch.arange(n) % 3


def batches(seed: int) -> list[tuple[Tensor, Tensor]]:
    """``data(seed)`` as three (inputs, targets) batches of 16: the training loader."""
    x, y = data(seed)
    return list(zip(x.split(16), y.split(16), strict=True))


def fit_one(kind: str, spec: dict[str, Any], model: TapNet) -> Detector:
    """One detector of ``kind`` fitted on the training batches of seed 0."""
    return fitted({kind: spec}, model, batches(0))[kind]


def fit_validation(det: Detector, model: TapNet) -> None:
    """The labelled ID validation fit of detectors that have one (temperature scaling)."""
    if det.uses_validation_data:
        x, y = data(4)
        with torch.no_grad():
            det.fit_validation(model.extract(x, taps=det.tap_names(model)), y)


def accumulate(det: Detector, model: TapNet) -> Detector:
    """The accumulation pass alone (reset, update per batch), without finalize."""
    passes = engine.eval_pass(model, batches(0), det.tap_names(model))
    engine.fit_detectors([det], model, engine.labelled(passes), finalize=False)
    return det


def restart(det: Detector, model: TapNet) -> engine.Outputs:
    """The training outputs again, for a detector that asks for another pass."""
    return engine.labelled(engine.eval_pass(model, batches(0), det.tap_names(model)))


def components(det: Detector, model: TapNet, x: Tensor) -> Tensor:
    with torch.no_grad():
        return det.score_components(model.extract(x, taps=det.tap_names(model)), model, x)


def evaluate(det: Detector, model: TapNet) -> list[Tensor]:
    """Scores of held-out samples; for layer ensembles also with a combiner fitted."""
    x, _ = data(1, n=12)
    with torch.no_grad():
        got = [det.score(model.extract(x, taps=det.tap_names(model)), model, x)]
    if det.has_combiner:
        x_id, x_ood = data(2, n=40)[0], data(3, n=40, shift=2.0)[0]
        det.fit_combiner(components(det, model, x_id), components(det, model, x_ood))
        got.append(det.combine(components(det, model, x)))
    return got


def test_every_kind_declares_finalize_only_init_arguments() -> None:
    for kind, cls in DETECTORS.items():
        params = set(inspect.signature(cls).parameters) - {"self", "name"}
        assert cls.finalize_only <= params, kind
        if kind in ("msp", "maxlogit", "rmds"):
            assert cls.finalize_only == frozenset() and params == set()
        elif kind in OWN_MODEL_FINALIZE_ONLY:  # need ensemble members / dropout layers
            assert cls.finalize_only == OWN_MODEL_FINALIZE_ONLY[kind], kind
        elif kind in FINALIZE_CASES:  # kinds added since carry their own tests
            assert set(FINALIZE_CASES[kind][2]) == cls.finalize_only, kind
    # no stale entry: every case names a registered kind
    assert set(FINALIZE_CASES) | set(OWN_MODEL_FINALIZE_ONLY) <= set(DETECTORS)
    # taps decide what update() reads, so they never are finalize-only
    assert "taps" not in Mahalanobis.finalize_only | FSSD.finalize_only


@pytest.mark.parametrize("kind", sorted(DETECTORS))
def test_every_registered_kind_declares_its_hyperparameters(kind: str) -> None:
    """One HParam per hyperparameter: no constructor names an argument of its own, and the
    signature, search space and finalize-only set are the declarations'."""
    cls = DETECTORS[kind]
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None or klass is Detector or not issubclass(klass, Detector):
            continue
        params = inspect.signature(init).parameters
        assert list(params) == ["self", "kwargs"], (kind, klass.__name__, list(params))
        assert params["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    sig = inspect.signature(cls).parameters
    assert list(sig) == [*cls.hparams, "name"], kind
    for n, p in cls.hparams.items():
        assert sig[n].kind is inspect.Parameter.KEYWORD_ONLY and sig[n].default == p.default
        assert p.stage in STAGES and p.doc.strip(), (kind, n)
    assert sig["name"].default is None
    assert cls.finalize_only == {n for n, p in cls.hparams.items() if p.stage != "fit"}
    assert set(cls.search_space) <= set(cls.hparams), kind
    for n, candidates in cls.search_space.items():
        assert len(candidates) > 0 and cls.hparams[n].default in candidates, (kind, n)
        assert len(set(map(repr, candidates))) == len(candidates), (kind, n)  # no repeats


def test_search_spaces_gain_the_default_when_the_sweep_lacks_it() -> None:
    # OpenOOD's ViM sweep (256, 1000) lacks the authors' rule (dim=None): tuning keeps it
    assert DETECTORS["vim"].search_space == {"dim": (None, 256, 1000)}
    # a sweep that holds the default is kept as written (the default in its place)
    assert DETECTORS["react"].search_space == {"percentile": (85, 90, 95, 99)}
    assert DETECTORS["knn"].search_space == {"k": (50, 100, 200, 500, 1000)}


def test_hand_written_derivations_are_refused() -> None:
    with pytest.raises(TypeError, match="declares search_space by hand"):

        class _Bad(Detector):  # pyright: ignore[reportUnusedClass]
            kind = "bad_space"
            search_space: ClassVar[dict[str, tuple[int, ...]]] = {"x": (1, 2)}

    with pytest.raises(TypeError, match="hparam_attrs names \\['y'\\]"):

        class _Stray(Detector):  # pyright: ignore[reportUnusedClass]
            kind = "bad_attrs"
            hparam_attrs: ClassVar[dict[str, str]] = {"y": "_y"}


def test_a_property_keeps_a_hyperparameter_stored_under_hparam_attrs() -> None:
    """The layer ensembles' ``taps``: the hyperparameter (configured list or None) is kept as
    ``_taps_arg`` while the ``taps`` property gives the taps read."""
    det = Mahalanobis()
    assert det.taps == ("features",) and det.hparam_value("taps") is None
    assert det.config()["taps"] is None and "taps" in Mahalanobis.hparams
    det = Mahalanobis(taps=("conv", "features"))  # any sequence, stored as a list
    assert det.config()["taps"] == ["conv", "features"] and det.taps == ("conv", "features")
    with pytest.raises(ValueError, match="taps must be a non-empty list of tap names or None"):
        Mahalanobis(taps="conv")
    with pytest.raises(KeyError, match="no hyperparameter 'nope'"):
        det.hparam_value("nope")


def _stored_line(model: TapNet) -> tuple[dict[str, Tensor], dict[str, Any], Detector]:
    """A fitted, calibrated LINe as a checkpoint holds it: state and config."""
    det = fit_one("line", {}, model)
    det.calibrate(torch.linspace(0.0, 1.0, 101))
    return det.state_dict(prefix="detectors.line."), det.config(), det


def test_stored_state_fits_compares_by_stage(model: TapNet) -> None:
    from lightning_ood.state import reconcile_detector_state

    state, stored, fitted_det = _stored_line(model)
    assert LINe().stored_state_fits(stored) == (True, "")

    # a key the checkpoint lacks (declared since) means its default: nothing to refit
    old = {k: v for k, v in stored.items() if k != "intgrad_steps"}
    assert LINe().stored_state_fits(old) == (True, "")
    fits, why = LINe(intgrad_steps=8).stored_state_fits(old)
    assert not fits and "intgrad_steps: 32 -> 8" in why
    knn = DETECTORS["knn"]()
    no_floor = {k: v for k, v in knn.config().items() if k != "min_bank"}
    assert knn.stored_state_fits(no_floor) == (True, "")
    nng = DETECTORS["nnguide"]()  # its default floor is 128, what old configs left out
    assert nng.stored_state_fits({k: v for k, v in nng.config().items() if k != "min_bank"})[0]

    # a score-stage value: the state is kept, the threshold must be recalibrated
    fits, why = LINe(delta=0.5, act_prune=False).stored_state_fits(stored)
    assert fits and why == "score-time values changed (delta, act_prune); recalibrating"
    # fit- and finalize-stage values, an unknown key, another kind: refit
    for det, what in (
        (LINe(p_a=50.0), "p_a: 90.0 -> 50.0"),
        (LINe(contribution="autograd"), "contribution: 'closed_form' -> 'autograd'"),
        (LINe(weight_prune=False, delta=0.5), "weight_prune: True -> False"),
    ):
        fits, why = det.stored_state_fits(stored)
        assert not fits and why == f"fitted with other values ({what})", why
    fits, why = LINe().stored_state_fits({**stored, "beta": 1.0})
    assert not fits and why == "stored with hyperparameters ['beta'] that 'line' lacks"
    assert LINe().stored_state_fits({**stored, "type": "dice"})[0] is False
    assert LINe().stored_state_fits(None)[0] is False

    # through the checkpoint rule: score-only change keeps the buffers, threshold NaN
    logs: list[str] = []
    det = LINe(delta=0.5)
    st = dict(state)
    refit, dropped = reconcile_detector_state(st, {"line": det}, {"line": stored}, logs.append)
    assert (refit, dropped) == ([], [])
    assert math.isnan(float(st["detectors.line.threshold"]))
    assert math.isnan(float(st["detectors.line.threshold_tpr"]))
    assert torch.equal(st["detectors.line.act_mask"], fitted_det.act_mask)
    assert "recalibrating" in logs[0] and "refitting" not in logs[0]
    # a config stored before intgrad_steps existed: kept as it is, threshold included
    st = dict(state)
    assert reconcile_detector_state(st, {"line": LINe()}, {"line": old}) == ([], [])
    assert float(st["detectors.line.threshold"]) == float(fitted_det.threshold)
    # a finalize-stage change: fresh, unfitted state
    st, logs = dict(state), []
    refit, _ = reconcile_detector_state(st, {"line": LINe(p_w=10.0)}, {"line": stored}, logs.append)
    assert refit == ["line"] and not bool(st["detectors.line.fitted"])
    assert st["detectors.line.act_mask"].numel() == 0 and logs[0].endswith("; refitting.")


@pytest.mark.parametrize("kind", sorted(FINALIZE_CASES))
def test_finalize_only_configs_share_one_accumulation_pass(kind: str, model: TapNet) -> None:
    base, cfg_a, cfg_b = FINALIZE_CASES[kind]
    assert set(cfg_a) == set(cfg_b) == DETECTORS[kind].finalize_only
    # One update pass with configuration A ...
    proto = accumulate(build_detector(kind, {**base, **cfg_a}), model)
    shared: list[list[Tensor]] = []
    for cfg in (cfg_a, cfg_b):
        target = build_detector(kind, {**base, **cfg})
        det = copy.deepcopy(proto)
        for key in type(det).finalize_only:
            setattr(det, key, getattr(target, key))
        assert det.config() == target.config()
        # finalize-only configs share one accumulation; the engine's finalize runs the extra
        # pass an exact percentile beyond `max_samples` asks for (ReAct, DICE+ReAct)
        engine.finalize_detectors([det], model, None, lambda d=det: restart(d, model))
        shared.append(evaluate(det, model))
    # ... gives exactly the scores of two independent fits.
    for cfg, got in zip((cfg_a, cfg_b), shared, strict=True):
        want = evaluate(fit_one(kind, {**base, **cfg}, model), model)
        assert len(got) == len(want) == (2 if DETECTORS[kind].has_combiner else 1)
        for g, w in zip(got, want, strict=True):
            assert g.shape == (12,)
            assert torch.equal(g, w), (kind, cfg)
    # The two configurations really score differently.
    assert not torch.equal(shared[0][0], shared[1][0]), kind


def test_tap_names_resolve_defaults_against_the_backbone(model: TapNet) -> None:
    det = FSSD(n_noise=4)
    assert det.taps == ()  # not fitted: nothing resolved yet
    assert det.tap_names(model) == ("conv", "fc", "logits")
    engine.fit_detectors([det], model)
    assert det.taps == ("conv", "fc", "logits")
    assert det.fss_sizes.tolist() == [64, 8, 3]
    assert FSSD(taps=["fc", "conv"]).tap_names(model) == ("fc", "conv")
    assert Mahalanobis().tap_names(model) == ("features",)
    assert Mahalanobis(taps=["conv", "logits"]).tap_names(model) == ("conv", "logits")
    assert LINe().tap_names(model) == ()
    assert build_detector("energy").tap_names(model) == ()


@pytest.mark.parametrize("kind", sorted(set(DETECTORS) - set(OWN_MODEL_FINALIZE_ONLY)))
def test_mark_unfitted_forgets_fit_threshold_and_combiner(kind: str, model: TapNet) -> None:
    base, cfg_a, _ = FINALIZE_CASES.get(kind, ({}, TOY_DATA_CASES.get(kind, {}), {}))
    det = fit_one(kind, {**base, **cfg_a}, model)
    fit_validation(det, model)
    before = evaluate(det, model)  # fits the combiner of layer ensembles
    x, _ = data(1, n=12)
    det.calibrate(before[-1], tpr=0.75)
    assert det.is_calibrated and float(det.threshold_tpr) == 0.75
    if det.has_combiner:
        k = len(det.tap_names(model))
        assert bool(det.combiner_fitted) and det.combiner_state()["combiner_coef"].numel() == k

    det.mark_unfitted()
    assert det.is_fitted is (not det.requires_fit)
    assert not det.is_calibrated
    assert math.isnan(float(det.threshold)) and math.isnan(float(det.threshold_tpr))
    if det.has_combiner:
        state = det.combiner_state()
        assert not bool(state["combiner_fitted"]) and state["combiner_coef"].numel() == 0
    with torch.no_grad():
        out = model.extract(x, taps=det.tap_names(model))
        if det.requires_fit:
            with pytest.raises(RuntimeError, match="not fitted"):
                det.score(out, model, x)
        else:  # nothing to fit: it still scores, identically
            assert torch.equal(det.score(out, model, x), before[0])
    # a refit gives the scores of the first fit again
    engine.fit_from_loader([det], model, batches(0))
    fit_validation(det, model)
    again = evaluate(det, model)
    for a, b in zip(again, before, strict=True):
        assert torch.equal(a, b), kind


@pytest.mark.parametrize("kind", ["mahalanobis", "fssd"])
def test_combiner_state_round_trip(kind: str, model: TapNet) -> None:
    base, cfg_a, _ = FINALIZE_CASES[kind]
    det = fit_one(kind, {**base, **cfg_a}, model)
    evaluate(det, model)  # fits the combiner
    state = det.combiner_state()
    assert list(state) == [
        "combiner_coef",
        "combiner_intercept",
        "combiner_mean",
        "combiner_scale",
        "combiner_fitted",
    ]
    for key, value in state.items():
        assert torch.equal(value, getattr(det, key)), key
        assert value.data_ptr() != getattr(det, key).data_ptr(), key  # clones
    assert bool(state["combiner_fitted"]) and state["combiner_intercept"].dtype == torch.float64

    x, _ = data(1, n=12)
    comps = components(det, model, x)
    want = det.combine(comps)
    other = fit_one(kind, {**base, **cfg_a}, model)  # no combiner: scores one layer
    assert torch.equal(other.combine(comps), comps[:, -1])
    other.load_combiner_state(state)
    assert torch.equal(other.combine(comps), want)
    state["combiner_coef"].zero_()  # the loaded buffers are the detector's own
    assert torch.equal(other.combine(comps), want)
    # forgetting the fit drops the combiner; the saved state brings it back
    other.mark_unfitted()
    assert not bool(other.combiner_fitted)
    other.load_combiner_state(det.combiner_state())
    assert bool(other.combiner_fitted)
    assert torch.equal(other.combiner_coef, det.combiner_coef)
    with pytest.raises(ValueError, match="combiner state holds"):
        other.load_combiner_state({"combiner_coef": det.combiner_coef})


def test_detectors_without_combiner_have_empty_combiner_state() -> None:
    det = LINe()
    assert det.combiner_state() == {}
    det.load_combiner_state({})  # a no-op
    assert not det.is_fitted
    with pytest.raises(ValueError, match="has no combiner"):
        det.load_combiner_state({"combiner_coef": torch.zeros(2)})


def test_needs_validation_is_a_deprecated_alias_of_has_combiner() -> None:
    """The old name read ``needs validation data`` but meant ``has a combiner``: reading it
    warns and answers ``has_combiner``; a plugin class still declaring it gets it mapped."""
    with pytest.warns(DeprecationWarning, match="read has_combiner"):
        assert build_detector("fssd").needs_validation is True
    with pytest.warns(DeprecationWarning, match="read has_combiner"):
        assert build_detector("energy").needs_validation is False

    with pytest.warns(DeprecationWarning, match="OldPlugin.needs_validation is deprecated"):

        class OldPlugin(DETECTORS["energy"]):  # type: ignore[misc, valid-type]
            needs_validation = True

    assert OldPlugin.has_combiner is True and DETECTORS["energy"].has_combiner is False
