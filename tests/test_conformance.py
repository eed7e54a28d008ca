"""Conformance suite: the properties every registered detector has (issue 22 item 4).

One parametrized module over the registry, after timm's ``tests/test_models.py`` and
torchmetrics' ``MetricTester``: a detector is covered by registering it plus ONE line in
:data:`CONFIGS` (hyperparameters sized for the small model below); a registered kind without
that line fails :func:`test_every_registered_kind_has_a_config` and every property test of its
own, it is never skipped.

The module fixture fits EVERY configured detector at once (``engine.fit_from_loader``) on a
LeNet trained for 16 steps (seeded) over 512 FashionMNIST training images, fits those that
use validation data on the 128 labelled ID validation images
(``engine.fit_validation_from_loader``: temperature scaling's T), fits the shipped
layer-ensemble combiners (``engine.deploy_combiners``) on 128 FashionMNIST + 128 MNIST
validation images, calibrates every threshold at 95 % TPR on the ID ones
(``engine.calibrate_detectors``), and scores 64 test images (32 FashionMNIST, 32 MNIST).
The ensembles' member is a second LeNet written as a lightning-ood checkpoint. For each
detector:

1. **batching**: per-sample scores are the same for batches of 1, 7 and 64 and for a
   shuffled order (:func:`test_scores_do_not_depend_on_batch_size_or_order`);
2. **state**: a detector rebuilt from ``config()`` and loaded with ``state_dict()`` (through
   bytes, weights only) scores identically, and so does ``lightning_ood.load`` of a
   lightning-ood checkpoint holding every detector, against the eager ``OODPredictor``;
3. **export**: ``OODPredictor.export()`` (``torch.export``) scores like the eager module, or
   the detector is refused by name (:data:`NOT_EXPORTABLE` says which and why);
4. **empty batch**: an empty score vector, through the engine and the hand-off module;
5. **bad input**: NaN/Inf and out-of-range pixels are refused by ``OODPredictor.check_input``
   before any forward, for every one-detector predictor and the all-detector one;
6. **dtype**: ``.to(torch.float64)`` moves every floating buffer; the float64 scores are
   finite and close to float32's; ``.to(torch.float32)`` brings them back.

Batching tolerance. The scores of a batch are compared with the same samples' rows of ONE
forward pass of the backbone: the backbone's own batch invariance is not the detector's (the
LeNet's oneDNN convolutions round differently for 1, 7 and 64 images, up to 8e-6 on the
features, so the hand-off module's end-to-end scores of one image alone and in a batch of 64
differ by up to 2e-5 relative for ViM and RMDS). The shuffled batch of 64 must give the
reference scores bit for bit. Batches of 1 and 7 must agree to ``1e-6 * max(1, |score|)``:
BLAS and oneDNN pick their kernels by the number of rows (a matrix-vector path for one row,
other tile remainders for seven), so a product over the feature axis (a head re-applied to
shaped features, a projection, a distance) may round differently, and detectors that run the
network themselves (ODIN, Deep Ensembles, MC Dropout, the FSSD ensemble) inherit the
convolutions' rounding. Measured with one thread on 2 shared cores: at most 2.3e-7 relative
(GradNorm, batches of 1), exact for MSP, MaxLogit, Energy, FSSD, Mahalanobis, KNN, NNGuide,
NCI, ODIN and MC Dropout; a real batch dependence is orders larger (MC Dropout's former
batch-position masks: 0.3).

The DDP part (``integration``): two gloo processes, each fitting every detector on its
EvalShardedSampler shard, give one process's fitted buffers and scores to 1e-6.

Run alone: ``pytest tests/test_conformance.py`` (about 45 s on 2 shared cores; the DDP test
another 60 s with ``-m integration``); the module runs torch on one thread (LeNet-sized work
on shared cores: a batch-of-one forward took 60 ms with 2 threads, 0.8 ms with one).
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST, FashionMNIST

import lightning_ood
from lightning_ood import engine
from lightning_ood.data.samplers import EvalShardedSampler
from lightning_ood.data.transforms import FASHIONMNIST_MEAN, FASHIONMNIST_STD
from lightning_ood.detectors import DETECTORS, Detector, Reducer, build_detector
from lightning_ood.models import OODBackbone, create_model
from lightning_ood.models.base import BackboneOutput
from lightning_ood.predictor import OODPredictor

#: THE table: one entry per registered kind, hyperparameters sized for LeNet (128 features,
#: 10 classes) and 512 training images. ``{member}``: the path of the member checkpoint.
CONFIGS: dict[str, dict[str, Any]] = {
    "msp": {},
    "maxlogit": {},
    "gen": {},
    "odin": {"temperature": 1000.0, "epsilon": 0.0014},
    "energy": {},
    "react": {"percentile": 90.0},
    "dice": {"p": 90.0},
    "dice_react": {"p": 90.0},
    "line": {"p_a": 90.0, "p_w": 90.0},
    "fssd": {"taps": ["conv1", "conv2", "fc1", "logits"], "n_noise": 16},
    "mahalanobis": {"taps": ["conv1", "conv2", "fc1"]},
    "ash": {"variant": "s", "percentile": 65.0},
    "scale": {"percentile": 65.0},
    "gradnorm": {},
    "vim": {"dim": 32, "max_samples": 200 * 128},  # 55 live features; alpha on 200 rows
    "rmds": {},
    "knn": {"k": 10, "bank_fraction": 0.5, "store_bank": True},  # a sampled bank
    # 25 % of 512 is ~128 rows: the min_bank floor tops the bank up to 160
    "nnguide": {"k": 10, "bank_fraction": 0.25, "min_bank": 160, "store_bank": True},
    "nci": {},
    "fdbd": {},
    "de": {"checkpoints": ["{member}"]},
    "mcd": {"passes": 8},
    "mcd_var": {"passes": 8},
    "fssd_ensemble": {
        "checkpoints": ["{member}"],
        "taps": ["conv1", "fc1", "logits"],
        "n_noise": 16,
    },
    "klm": {},
    # the 16-step LeNet classifies no training coat correctly: patterns/MAVs from every sample
    "she": {"correct_only": False},
    "openmax": {"tailsize": 10, "alpha": 3, "correct_only": False},  # ~50 images per class
    "gmm": {"n_components": 2, "reduce_dim": 16},  # per-class full covariances on 16 PCA dims
    "residual": {"dim": 32},  # as vim: 55 live features
    "temperature_scaling": {},  # T by NLL on the labelled validation images (fit_validation)
    # no training coat is classified correctly (see she): ranges from every labelled sample
    "gram": {"taps": ["conv1", "conv2", "fc1"], "samples": "label"},
    "rankfeat": {"taps": ["conv2"]},  # no LeNet tap pools to the features: a rerun
    "vra": {},
    "iodin": {"temperature": 1000.0, "epsilon": 0.0014},
    "weiper": {"n_repeats": 20},  # 200 perturbed logits, two fitting passes
    "reweightood": {},
    "relation": {"bank_fraction": 0.5, "store_bank": True},  # a sampled bank of [z, p] rows
    "cfood": {"bank_fraction": 0.5, "store_bank": True},  # ~256 reference points
    "adascale": {"num_samples": 256},  # Q' of 256 perturbed training images
    "core": {},  # two passes: the class means, then the statistics of both scores
}

#: Kinds whose score no exported graph can hold, and why; every other kind must export.
NOT_EXPORTABLE: dict[str, str] = {
    "odin": "perturbs the input along its gradient (autograd at inference)",
    "mcd": "runs stochastic dropout passes",
    "mcd_var": "runs stochastic dropout passes",
    "iodin": "perturbs the input along its gradient (autograd at inference)",
    "adascale": "perturbs the input along its gradient (autograd at inference)",
    "rankfeat": "on LeNet (no tap pools to the features) it reruns the network from conv2 "
    "through a forward hook",
}

#: Every kind the suite speaks of: the registry's and the table's (a stale entry fails too).
KINDS = sorted(set(DETECTORS) | set(CONFIGS))

#: Known failures of code outside this suite's reach, by (property, kind): strict xfails, so
#: the day one is fixed its test fails until the line here is removed.
KNOWN: dict[tuple[str, str], str] = {}


def _known(prop: str, kinds: list[str]) -> list[Any]:
    """``kinds`` as parameters, those with a :data:`KNOWN` failure of ``prop`` as strict
    xfails that say why."""
    return [
        pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=KNOWN[(prop, k)]))
        if (prop, k) in KNOWN
        else k
        for k in kinds
    ]


N_TRAIN, N_VAL, N_TEST = 512, 128, 64
TOL = 1e-6  # batching and DDP: |a - b| <= TOL * max(1, |b|)
META: dict[str, Any] = {
    "input_shape": [1, 28, 28],
    "mean": list(FASHIONMNIST_MEAN),
    "std": list(FASHIONMNIST_STD),
    "num_classes": 10,
    "class_names": list(FashionMNIST.classes),
}


# -- the fitted zoo ----------------------------------------------------------------------------
@dataclass
class Zoo:
    """Every configured detector fitted, combined and calibrated on one LeNet."""

    net: OODBackbone
    detectors: dict[str, Detector]
    images: Tensor  # (64, 1, 28, 28) floats in [0, 1]: 32 FashionMNIST, then 32 MNIST
    x: Tensor  # the same, normalised as the backbone takes them
    out: BackboneOutput  # one forward of x with every tap
    scores: dict[str, Tensor]  # engine.score_batch of the whole batch: the reference
    member: str
    root: Path  # the data folder
    tmp: Path
    cache: dict[str, Any] = field(default_factory=dict)


def _lenet(seed: int, steps: int, data: tuple[Tensor, Tensor]) -> OODBackbone:
    """A LeNet (with its dropout layers) after ``steps`` Adadelta steps of 64 images."""
    torch.manual_seed(seed)
    net = create_model("lenet", num_classes=10, in_channels=1)
    opt = torch.optim.Adadelta(net.parameters(), lr=1.0)
    x, y = data
    net.train()
    for i in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            net(x[i * 64 : (i + 1) * 64]), y[i * 64 : (i + 1) * 64]
        )
        loss.backward()
        opt.step()
    return net.eval()


def _save_member(path: Path, model: OODBackbone) -> str:
    """A minimal lightning-ood checkpoint of ``model`` (what `lightning-ood fit` writes)."""
    hp = {"model": "lenet", "num_classes": 10, "model_kwargs": {"in_channels": 1}}
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hp, "state_dict": state}, path)
    return str(path)


def _normalize(u8: Tensor) -> Tensor:
    mean = torch.tensor(FASHIONMNIST_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(FASHIONMNIST_STD).view(1, -1, 1, 1)
    return (u8.unsqueeze(1).float() / 255.0 - mean) / std


def _data(root: Path) -> dict[str, Any]:
    """The images of the suite (fixed slices, no randomness)."""
    ftrain, ftest = FashionMNIST(str(root), train=True), FashionMNIST(str(root), train=False)
    mtest = MNIST(str(root), train=False)
    test_u8 = torch.cat([ftest.data[:32], mtest.data[:32]])
    return {
        "backbone": (_normalize(ftrain.data[:1024]), ftrain.targets[:1024]),
        "train": (_normalize(ftrain.data[-N_TRAIN:]), ftrain.targets[-N_TRAIN:]),
        "val_id": _normalize(ftest.data[-N_VAL:]),
        "val_id_labels": ftest.targets[-N_VAL:],
        "val_ood": _normalize(mtest.data[-N_VAL:]),
        "images": test_u8.unsqueeze(1).float() / 255.0,
        "x": _normalize(test_u8),
    }


def specs(member: str) -> dict[str, dict[str, Any]]:
    """:data:`CONFIGS` of the registered kinds with the member path filled in."""
    return {
        kind: {k: [member if p == "{member}" else p for p in v] if isinstance(v, list) else v
               for k, v in spec.items()}
        for kind, spec in CONFIGS.items()
        if kind in DETECTORS
    }  # fmt: skip


def build_backbones(root: Path, tmp: Path) -> tuple[OODBackbone, str]:
    """The scored LeNet and the path of the ensembles' member checkpoint."""
    data = _data(root)
    net = _lenet(0, 16, data["backbone"])
    member = _save_member(tmp / "member.ckpt", _lenet(1, 16, data["backbone"]))
    return net, member


def fit_all(
    net: OODBackbone,
    member: str,
    root: Path,
    reducer: Reducer | None = None,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Detector]:
    """Every configured detector built, fitted at once on rank ``rank``'s EvalShardedSampler
    shard of the training images (batches of 64), those fitted on validation data
    (temperature scaling's T) on that rank's shard of the labelled ID validation images, its
    layer-ensemble combiner deployed and its threshold calibrated on the validation images
    (every rank scores them all)."""
    data = _data(root)
    dets = {kind: build_detector(kind, spec) for kind, spec in specs(member).items()}
    ds = TensorDataset(*data["train"])
    loader = DataLoader(ds, batch_size=64, sampler=EvalShardedSampler(ds, world, rank))
    engine.fit_from_loader(dets.values(), net, loader, reducer)
    val = TensorDataset(data["val_id"], data["val_id_labels"])
    val_loader = DataLoader(val, batch_size=64, sampler=EvalShardedSampler(val, world, rank))
    engine.fit_validation_from_loader(dets.values(), net, val_loader, reducer)
    comps = {
        key: engine.score_loader(dets, net, [(data[key],)], components=True)
        for key in ("val_id", "val_ood")
    }
    engine.deploy_combiners(dets, comps["val_id"], comps["val_ood"])
    engine.calibrate_detectors(dets, engine.combined_scores(dets, comps["val_id"]))
    return dets


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo(_one_thread: None, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    tmp = tmp_path_factory.mktemp("conformance")
    net, member = build_backbones(shared_data, tmp)
    dets = fit_all(net, member, shared_data)
    data = _data(shared_data)
    x = data["x"]
    with torch.no_grad():
        out = net.extract(x, taps=engine.detector_taps(dets.values(), net))
    scores = engine.score_batch(dets, out, net, x)
    return Zoo(net, dets, data["images"], x, out, scores, member, shared_data, tmp)


def _det(zoo: Zoo, kind: str) -> Detector:
    """The fitted detector of ``kind``; a kind missing from the table or the registry FAILS."""
    if kind not in DETECTORS:
        pytest.fail(f"CONFIGS has an entry for {kind!r}, which is not a registered detector")
    if kind not in CONFIGS:
        pytest.fail(
            f"registered detector {kind!r} has no entry in tests/test_conformance.py CONFIGS: "
            "add one line with hyperparameters that fit a LeNet and 512 training images"
        )
    return zoo.detectors[kind]


def _rows(out: BackboneOutput, idx: Tensor) -> BackboneOutput:
    return BackboneOutput(
        out.features[idx], out.logits[idx], {k: v[idx] for k, v in out.taps.items()}
    )


def _score_rows(zoo: Zoo, kind: str, idx: Tensor) -> Tensor:
    det = _det(zoo, kind)
    return engine.score_batch({kind: det}, _rows(zoo.out, idx), zoo.net, zoo.x[idx])[kind]


def _assert_close(got: Tensor, want: Tensor, tol: float, what: str) -> None:
    """``|got - want| <= tol * max(1, |want|)`` everywhere, same shape and dtype."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    err = (got.double() - want.double()).abs() / want.double().abs().clamp_min(1.0)
    assert bool((err <= tol).all()), f"{what}: worst {float(err.max()):.2e} > {tol:g}"


def _predictor(zoo: Zoo, kinds: list[str]) -> OODPredictor:
    return OODPredictor(zoo.net, {k: _det(zoo, k) for k in kinds}, META).eval()


def _eager(zoo: Zoo) -> dict[str, Any]:
    """The all-detector predictor's output on the test images (computed once)."""
    if "eager" not in zoo.cache:
        zoo.cache["eager"] = _predictor(zoo, list(zoo.detectors))(zoo.images)
    return zoo.cache["eager"]


# -- the registry --------------------------------------------------------------------------------
def test_every_registered_kind_has_a_config() -> None:
    missing = sorted(set(DETECTORS) - set(CONFIGS))
    stale = sorted(set(CONFIGS) - set(DETECTORS))
    assert not missing, f"add a CONFIGS line for the registered detector(s) {missing}"
    assert not stale, f"CONFIGS names unregistered detector(s) {stale}"
    assert set(NOT_EXPORTABLE) <= set(DETECTORS)


def test_every_detector_is_fitted_calibrated_and_scores_both_ways(zoo: Zoo) -> None:
    """The fixture is what the properties are checked on: every detector fitted, calibrated,
    scoring finite values that call some test images ID and some OOD."""
    assert set(zoo.detectors) == set(CONFIGS) & set(DETECTORS)
    for kind, det in zoo.detectors.items():
        assert det.is_fitted and det.is_calibrated, kind
        s = zoo.scores[kind]
        assert s.shape == (N_TEST,) and bool(torch.isfinite(s).all()), kind
        called_ood = s < det.threshold.to(s.dtype)
        assert called_ood.any() and not called_ood.all(), kind


# -- 1. batching ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_scores_do_not_depend_on_batch_size_or_order(zoo: Zoo, kind: str) -> None:
    want = _score_rows(zoo, kind, torch.arange(N_TEST))
    assert torch.equal(want, zoo.scores[kind])  # the reference repeats
    perm = torch.randperm(N_TEST, generator=torch.Generator().manual_seed(5))
    shuffled = torch.empty_like(want)
    shuffled[perm] = _score_rows(zoo, kind, perm)
    assert torch.equal(shuffled, want), f"{kind}: a shuffled batch changes the scores"
    for size in (1, 7):
        got = torch.cat([_score_rows(zoo, kind, idx) for idx in torch.arange(N_TEST).split(size)])
        _assert_close(got, want, TOL, f"{kind}, batches of {size}")


# -- 2. state ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_scores_identically(zoo: Zoo, kind: str) -> None:
    det = _det(zoo, kind)
    buf = io.BytesIO()
    torch.save(det.state_dict(), buf)
    buf.seek(0)
    fresh = build_detector(kind, det.config())
    assert fresh.config() == det.config()
    fresh.load_state_dict(torch.load(buf, weights_only=True))  # strict
    assert fresh.is_fitted and fresh.is_calibrated
    assert float(fresh.threshold) == float(det.threshold)
    with torch.no_grad():
        got = engine.score_batch({kind: fresh}, zoo.out, zoo.net, zoo.x)[kind]
    assert torch.equal(got, zoo.scores[kind])


@pytest.fixture(scope="module")
def loaded(zoo: Zoo) -> dict[str, Any]:
    """``lightning_ood.load`` of a lightning-ood checkpoint holding every detector: the
    hand-off module's output on the test images, and the module."""
    sd = {f"backbone.{k}": v for k, v in zoo.net.state_dict().items()}
    for name, det in zoo.detectors.items():
        sd.update(det.state_dict(prefix=f"detectors.{name}."))
    hp = {
        "model": "lenet",
        "num_classes": 10,
        "model_kwargs": {"in_channels": 1},
        "detectors": {name: det.config() for name, det in zoo.detectors.items()},
    }
    path = zoo.tmp / "all_detectors.ckpt"
    torch.save({"hyper_parameters": hp, "state_dict": sd, "lightning_ood": {"data": META}}, path)
    model = lightning_ood.load(path)
    return {"model": model, "out": model(zoo.images)}


@pytest.mark.parametrize("kind", KINDS)
def test_handoff_module_from_a_checkpoint_equals_eager(
    zoo: Zoo, loaded: dict[str, Any], kind: str
) -> None:
    _det(zoo, kind)
    eager, got = _eager(zoo), loaded["out"]
    assert loaded["model"].thresholds[kind] == float(zoo.detectors[kind].threshold)
    assert torch.equal(got["scores"][kind], eager["scores"][kind])
    assert torch.equal(got["is_ood"][kind], eager["is_ood"][kind])
    # the hand-off module is the engine: same forward, same scores
    assert torch.equal(eager["scores"][kind], zoo.scores[kind])


# -- 3. export -----------------------------------------------------------------------------------
def _refused(det: Detector) -> bool:
    return bool(det.needs_input_grad or not det.exportable)


@pytest.fixture(scope="module")
def exported(zoo: Zoo) -> dict[str, Any]:
    """ONE ``torch.export`` program of the predictor with every exportable detector, run on
    the test images (and on a batch of 7 of them: the batch size is dynamic)."""
    kinds = [k for k, d in zoo.detectors.items() if not _refused(d)]
    model = _predictor(zoo, kinds)
    program = model.export(zoo.images[:2]).module()
    return {"kinds": kinds, "out": program(zoo.images), "out7": program(zoo.images[20:27])}


@pytest.mark.parametrize("kind", KINDS)
def test_export_scores_like_eager_or_is_refused_by_name(
    zoo: Zoo, exported: dict[str, Any], kind: str
) -> None:
    det = _det(zoo, kind)
    assert _refused(det) == (kind in NOT_EXPORTABLE), (
        f"{kind}: exportability ({not _refused(det)}) disagrees with NOT_EXPORTABLE"
    )
    if kind in NOT_EXPORTABLE:
        with pytest.raises(ValueError, match=rf"\['{kind}'\] need input gradients or random"):
            _predictor(zoo, [kind]).export(zoo.images[:2])
        return
    eager = _eager(zoo)
    for out, idx in ((exported["out"], slice(None)), (exported["out7"], slice(20, 27))):
        # the exported graph may fuse or reorder float32 arithmetic (measured: exact here)
        torch.testing.assert_close(
            out["scores"][kind], eager["scores"][kind][idx], rtol=1e-5, atol=1e-6
        )
        s = eager["scores"][kind][idx]
        clear = (s - det.threshold.to(s.dtype)).abs() > 1e-5 * s.abs().clamp_min(1)
        assert torch.equal(out["is_ood"][kind][clear], eager["is_ood"][kind][idx][clear])


# -- 4. empty batch ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch_gives_empty_scores(zoo: Zoo, kind: str) -> None:
    got = _score_rows(zoo, kind, torch.arange(0))
    assert got.shape == (0,) and got.dtype == zoo.scores[kind].dtype
    out = _predictor(zoo, [kind])(zoo.images[:0])
    assert out["scores"][kind].shape == (0,) and out["is_ood"][kind].shape == (0,)
    assert out["logits"].shape == (0, 10)


# -- 5. bad input --------------------------------------------------------------------------------
def _bad_batches(images: Tensor) -> dict[str, tuple[Tensor, str]]:
    x = images[:4].clone()
    nan, inf, big, neg = x.clone(), x.clone(), x.clone() * 255, x.clone()
    nan[1, 0, 3, 3] = float("nan")
    inf[2, 0, 0, 0] = float("inf")
    neg[0, 0, 5, 5] = -0.1
    return {
        "nan": (nan, r"NaN or Inf values in sample\(s\) \[1\]"),
        "inf": (inf, r"NaN or Inf values in sample\(s\) \[2\]"),
        "0..255 floats": (big, r"outside \[0, 1\]"),
        "negative": (neg, r"outside \[0, 1\] in sample\(s\) \[0\]"),
    }


def _assert_refused(model: OODPredictor, images: Tensor) -> None:
    calls: list[int] = []
    hook = model.backbone.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    try:
        for what, (bad, msg) in _bad_batches(images).items():
            with pytest.raises(ValueError, match=msg):
                model(bad)
            assert not calls, f"{what}: the backbone ran on a refused batch"
    finally:
        hook.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_out_of_range_inputs_are_refused(zoo: Zoo, kind: str) -> None:
    _assert_refused(_predictor(zoo, [kind]), zoo.images)


def test_nan_and_out_of_range_inputs_are_refused_by_the_all_detector_module(zoo: Zoo) -> None:
    _assert_refused(_predictor(zoo, list(zoo.detectors)), zoo.images)


# -- 6. dtype ------------------------------------------------------------------------------------
def _floating(det: Detector) -> dict[str, Tensor]:
    return {
        n: t for n, t in [*det.named_buffers(), *det.named_parameters()] if t.is_floating_point()
    }


def _float64(zoo: Zoo, kind: str) -> tuple[Detector, Tensor]:
    """A float64 copy of the detector and its scores on a float64 copy of the backbone."""
    det64 = copy.deepcopy(_det(zoo, kind)).to(torch.float64)
    net64 = copy.deepcopy(zoo.net).double()
    x64 = zoo.x.double()
    with torch.no_grad():
        out64 = net64.extract(x64, taps=engine.detector_taps([det64], net64))
    return det64, engine.score_batch({kind: det64}, out64, net64, x64)[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_float64_moves_every_buffer_and_keeps_scores(zoo: Zoo, kind: str) -> None:
    """Scores of a float64 detector on a float64 backbone are finite and within float32's
    rounding of the float32 scores: ``5e-4 * max(1, |s|)`` (the float32 path rounds features,
    logits and the detectors' float32 arithmetic; measured worst 3e-5 relative)."""
    det64, s64 = _float64(zoo, kind)
    assert all(t.dtype == torch.float64 for t in _floating(det64).values()), kind
    assert bool(torch.isfinite(s64).all()), kind
    _assert_close(s64.to(zoo.scores[kind].dtype), zoo.scores[kind], 5e-4, f"{kind} float64")


@pytest.mark.parametrize("kind", _known("float32", KINDS))
def test_back_to_float32_restores_dtypes_and_scores(zoo: Zoo, kind: str) -> None:
    """``.to(torch.float64)`` then ``.to(torch.float32)``: every floating buffer is float32,
    integer and bool buffers are untouched, and the scores are the original ones to the bound
    above (buffers a detector keeps in float64, e.g. ViM's basis, the thresholds and the
    layer-ensemble combiners, lose their last bits)."""
    det = _det(zoo, kind)
    others = {n: t.clone() for n, t in det.state_dict().items()
              if isinstance(t, Tensor) and not t.is_floating_point()}  # fmt: skip
    det32 = _float64(zoo, kind)[0].to(torch.float32)
    assert all(t.dtype == torch.float32 for t in _floating(det32).values()), kind
    state = det32.state_dict()
    for n, value in others.items():
        assert state[n].dtype == value.dtype and torch.equal(state[n], value), n
    s32 = engine.score_batch({kind: det32}, zoo.out, zoo.net, zoo.x)[kind]
    _assert_close(s32, zoo.scores[kind], 5e-4, f"{kind} float64 -> float32")


# -- DDP: two gloo processes fit every detector like one -------------------------------------------
WORLD = 2


class GlooReducer(Reducer):
    """What ``StrategyReducer`` does under DDP: all-reduce sums, all-gather concatenations
    (per-rank sizes may differ)."""

    def sum(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out)
        return out

    def cat(self, t: Tensor) -> Tensor:
        from torchmetrics.utilities.distributed import gather_all_tensors

        return torch.cat(gather_all_tensors(t))


def _ddp_rank(rank: int, world: int, out_dir: str, backbone: str, member: str, root: str) -> None:
    """One DDP rank: fit every detector on this rank's shard, score the test images, save."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world
    )
    try:
        net = create_model("lenet", num_classes=10, in_channels=1)
        net.load_state_dict(torch.load(backbone, weights_only=True))
        net.eval()
        dets = fit_all(net, member, Path(root), GlooReducer(), rank, world)
        x = _data(Path(root))["x"]
        with torch.no_grad():
            out = net.extract(x, taps=engine.detector_taps(dets.values(), net))
        scores = engine.score_batch(dets, out, net, x)
        state = {k: d.state_dict() for k, d in dets.items()}
        torch.save({"state": state, "scores": scores}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


#: Buffers that hold an orthonormal basis of a subspace: where the training features leave
#: eigenvalues tied (at 0 for dead ReLU units) the columns are any basis of the tie, so DDP's
#: differently rounded sums may give another one; the subspace (the projector B Bᵀ, all the
#: scores read) is what must agree.
SUBSPACE_BUFFERS = {("vim", "residual_basis"), ("residual", "residual_basis")}


def _mismatch(got: Any, want: Any, per_sample: bool = False) -> str | None:
    """Why ``got`` differs from ``want``, None when they agree: non-tensors and non-floating
    tensors exactly; floating tensors with identical non-finite entries and, on the finite
    ones, ``max |got - want| <= TOL * max |want|`` (a buffer: relative to its largest entry,
    as an ill-conditioned precision matrix is only defined that well) or, ``per_sample``,
    ``|got - want| <= TOL * max(1, |want|)`` for every sample's score."""
    if not isinstance(want, Tensor):
        return None if got == want else f"{got!r} != {want!r}"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}"
    if not want.is_floating_point():
        return None if torch.equal(got, want) else "values differ"
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite) or not torch.equal(
        got[~finite].nan_to_num(), want[~finite].nan_to_num()
    ):
        return "non-finite entries differ"
    a, b = got[finite].double(), want[finite].double()
    if not b.numel():
        return None
    if per_sample:
        worst = float(((a - b).abs() / b.abs().clamp_min(1.0)).max())
    else:
        worst = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    return None if worst <= TOL else f"worst {worst:.2e} > {TOL:g}"


@pytest.mark.integration
def test_two_process_ddp_fits_every_detector_like_one_process(zoo: Zoo) -> None:
    """Two gloo processes, each reading its EvalShardedSampler half of the training images in
    batches of 64, fit EVERY detector at once (sums all-reduced, banks and samples gathered):
    every rank's fitted state (thresholds and combiners included) and test scores equal the
    one-process fit of the fixture to 1e-6. Before the seeded global-position sampling, KNN's
    and NNGuide's banks and ViM's alpha sample were other samples on two ranks."""
    out_dir = zoo.tmp / "ddp"
    out_dir.mkdir(exist_ok=True)
    backbone = out_dir / "backbone.pt"
    torch.save(zoo.net.state_dict(), backbone)
    cmd = [
        sys.executable,
        __file__,
        "--ddp",
        str(out_dir),
        str(backbone),
        zoo.member,
        str(zoo.root),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    bad: list[str] = []
    for rank in range(WORLD):
        got = torch.load(out_dir / f"rank{rank}.pt", weights_only=True)
        assert set(got["state"]) == set(zoo.detectors)
        for kind, det in zoo.detectors.items():
            want, have = det.state_dict(), got["state"][kind]
            assert set(have) == set(want), kind
            for key, value in want.items():
                if (kind, key) in SUBSPACE_BUFFERS:
                    have[key], value = have[key] @ have[key].T, value @ value.T
                why = _mismatch(have[key], value)
                if why is not None:
                    bad.append(f"rank {rank}: {kind}.{key}: {why}")
            why = _mismatch(got["scores"][kind], zoo.scores[kind], per_sample=True)
            if why is not None:
                bad.append(f"rank {rank}: {kind} scores: {why}")
    assert not bad, "\n".join(bad)


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp"]:
    # `python tests/test_conformance.py --ddp OUT_DIR BACKBONE MEMBER DATA_ROOT`: the worker
    # of the DDP test, WORLD ranks spawned from here (spawn re-imports this file).
    torch.multiprocessing.spawn(_ddp_rank, args=(WORLD, *sys.argv[2:6]), nprocs=WORLD)
