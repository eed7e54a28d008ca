"""LINe: hand-computed toy case, ablation switches, closed form vs autograd, memory bound."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.base import Reducer, percentile
from lightning_ood.detectors.line import LINe, row_percentile
from lightning_ood.models.base import BackboneOutput, OODBackbone

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class MLPHeadNet(LinearHeadNet):
    """A non-linear head (ReLU MLP before the last linear layer): only autograd applies."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__(weight, bias)
        q = self.num_features
        self.pre = nn.Sequential(nn.Linear(q, q, dtype=weight.dtype), nn.Tanh())

    def forward_head(self, h: Tensor) -> Tensor:
        return self.fc(self.pre(h) + h)


class SmallConvNet(OODBackbone):
    """A small real CNN (conv-BN-ReLU x2, global pool, linear) for the autograd oracle."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes, self.num_features, self.input_shape = num_classes, 32, (3, 32, 32)
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def get_classifier(self) -> nn.Linear:
        return self.fc


def fit(
    det: LINe,
    model: OODBackbone,
    batches: list[tuple[Tensor, Tensor]],
    reducer: Reducer | None = None,
) -> LINe:
    """The callback's protocol, through the engine: one eval pass, update per batch, finalize."""
    engine.fit_from_loader([det], model, batches, reducer)
    return det


def score(det: LINe, model: OODBackbone, x: Tensor) -> Tensor:
    with torch.no_grad():
        return det.score(model.extract(x, det.taps))


# -- the hand-computed toy case -----------------------------------------------------------
# W (L=2, q=4), b; class 0 training features average to [2, 1, 1, 2], class 1 to [0, 1, 3, 2].
TOY_W = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.5, -4.0, 2.0, 1.0]], dtype=torch.float64)
TOY_B = torch.tensor([0.1, -0.2], dtype=torch.float64)
TOY_TRAIN = [
    (torch.tensor([[1.0, 2.0, 0.0, 4.0], [0.0, 1.0, 3.0, 2.0]], dtype=torch.float64),
     torch.tensor([0, 1])),
    (torch.tensor([[3.0, 0.0, 2.0, 0.0]], dtype=torch.float64), torch.tensor([0])),
]  # fmt: skip
TOY_TEST = torch.tensor([[3.0, 1.0, 0.5, 2.0], [0.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
TOY_ARGS = {"delta": 2.5, "p_a": 50.0, "p_w": 50.0}


def toy_line(**kwargs: object) -> tuple[LINe, LinearHeadNet]:
    model = LinearHeadNet(TOY_W, TOY_B)
    return fit(LINe(**{**TOY_ARGS, **kwargs}), model, TOY_TRAIN), model


def lse(*z: float) -> float:
    m = max(z)
    return m + math.log(sum(math.exp(v - m) for v in z))


def test_toy_case_by_hand() -> None:
    det, model = toy_line()
    # C[:, k] = W[k] ⊙ mean_k: [1*2, 2*1, -1*1, .5*2] and [.5*0, -4*1, 2*3, 1*2].
    expected_c = torch.tensor([[2.0, 0.0], [2.0, -4.0], [-1.0, 6.0], [1.0, 2.0]])
    torch.testing.assert_close(det.contribution_matrix, expected_c.double())
    # p_a = 50 over q = 4: position 1.5 -> midpoint of the 2nd and 3rd smallest.
    # sorted C[:,0] = [-1, 1, 2, 2] -> 1.5; sorted C[:,1] = [-4, 0, 2, 6] -> 1.0.
    torch.testing.assert_close(det.act_threshold, torch.tensor([1.5, 1.0]).double())
    assert det.act_mask.tolist() == [[True, True, False, False], [False, False, True, True]]
    # V_0 = [2,2,1,1] ⊙ W = [[2,4,-1,.5],[1,-8,2,1]], sorted middle pair (1, 1) -> 1.0.
    # V_1 = [0,4,6,2] ⊙ W = [[0,8,-6,1],[0,-16,12,2]], sorted middle pair (0, 1) -> 0.5.
    torch.testing.assert_close(det.weight_threshold, torch.tensor([1.0, 0.5]).double())
    assert det.weight_mask(0).tolist() == [[True, True, False, False], [False, False, True, False]]
    assert det.weight_mask(1).tolist() == [[False, True, False, True], [False, False, True, True]]
    # x1: ĥ = [2.5, 1, .5, 2], full logits [5.1, 0.05] -> l = 0; z = [4.5+.1, 0-.2].
    # x2: ĥ = [0, 0, 2.5, 1], full logits [-1.9, 5.8] -> l = 1; z = [.5+.1, 6-.2].
    assert det.predict(TOY_TEST).tolist() == [0, 1]
    expected = torch.tensor([lse(4.6, -0.2), lse(0.6, 5.8)], dtype=torch.float64)
    torch.testing.assert_close(score(det, model, TOY_TEST), expected)
    # The accumulators are dropped once the scoring state is derived.
    assert det.class_sum.numel() == 0 and det.is_fitted


@pytest.mark.parametrize(
    ("switches", "z1", "z2"),
    [
        ({}, (4.6, -0.2), (0.6, 5.8)),
        ({"clip": False}, (5.1, -0.2), (0.6, 6.8)),
        ({"act_prune": False}, (4.6, 0.8), (0.6, 5.8)),
        ({"weight_prune": False}, (4.6, -2.95), (-1.9, 5.8)),
        ({"act_prune": False, "weight_prune": False}, (5.1, 0.05), (-1.9, 5.8)),  # Energy+AC
        ({"clip": False, "act_prune": False, "weight_prune": False}, (5.6, 0.3), (-2.4, 6.8)),
        ({"abs_contribution": True}, (4.6, -0.2), (0.1, 4.8)),  # m_1 = [0, 1, 1, 0] with |C|
    ],
)
def test_toy_ablations_by_hand(switches: dict, z1: tuple, z2: tuple) -> None:
    det, model = toy_line(**switches)
    expected = torch.tensor([lse(*z1), lse(*z2)], dtype=torch.float64)
    torch.testing.assert_close(score(det, model, TOY_TEST), expected)


def test_abs_contribution_changes_only_activation_masks() -> None:
    signed, _ = toy_line()
    absolute, _ = toy_line(abs_contribution=True)
    torch.testing.assert_close(absolute.contribution_matrix, signed.contribution_matrix.abs())
    # sorted |C[:,1]| = [0, 2, 4, 6] -> 3.0, so neuron 1 (C = -4) is kept instead of neuron 3.
    torch.testing.assert_close(absolute.act_threshold, torch.tensor([1.5, 3.0]).double())
    assert absolute.act_mask.tolist() == [[True, True, False, False], [False, True, True, False]]
    torch.testing.assert_close(absolute.weight_threshold, signed.weight_threshold)


def test_all_switches_off_is_energy() -> None:
    torch.manual_seed(1)
    model = LinearHeadNet(torch.randn(5, 8), torch.randn(5))
    train = [(torch.rand(30, 8) * 3, torch.randint(0, 5, (30,)))]
    det = fit(LINe(clip=False, act_prune=False, weight_prune=False), model, train)
    x = torch.rand(20, 8) * 3
    torch.testing.assert_close(score(det, model, x), torch.logsumexp(model(x), dim=1))


def reference_line(
    train_h: np.ndarray,
    train_y: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    test_h: np.ndarray,
    delta: float,
    p_a: float,
    p_w: float,
) -> np.ndarray:
    """The reference code's way: materialise all L masked weight matrices, score per sample."""
    num_classes, q = w.shape
    c = np.stack([w[k] * train_h[train_y == k].mean(axis=0) for k in range(num_classes)], 1)
    act = np.stack([c[:, k] > np.percentile(c[:, k], p_a) for k in range(num_classes)])
    masked_w = np.empty((num_classes, num_classes, q))
    for k in range(num_classes):
        v = np.abs(c[:, k])[None, :] * w
        masked_w[k] = w * (v > np.percentile(v, p_w))
    scores = []
    for h in test_h:
        hc = np.minimum(h, delta)
        k = int(np.argmax(w @ hc + b))
        z = masked_w[k] @ (act[k] * hc) + b
        scores.append(np.log(np.exp(z - z.max()).sum()) + z.max())
    return np.array(scores)


@pytest.mark.parametrize(("p_a", "p_w"), [(90.0, 90.0), (10.0, 10.0), (0.0, 50.0)])
def test_grouped_scoring_matches_reference_per_sample(p_a: float, p_w: float) -> None:
    torch.manual_seed(2)
    num_classes, q = 7, 20
    model = LinearHeadNet(torch.randn(num_classes, q).double(), torch.randn(num_classes).double())
    train_h = torch.rand(140, q).double() * 2
    train_y = torch.arange(140) % num_classes
    batches = [(train_h[i : i + 32], train_y[i : i + 32]) for i in range(0, 140, 32)]
    det = fit(LINe(delta=1.2, p_a=p_a, p_w=p_w), model, batches)
    test_h = torch.rand(60, q).double() * 2
    expected = reference_line(
        train_h.numpy(),
        train_y.numpy(),
        model.fc.weight.detach().numpy(),
        model.fc.bias.detach().numpy(),
        test_h.numpy(),
        1.2,
        p_a,
        p_w,
    )
    assert len(set(det.predict(test_h).tolist())) > 1  # several groups are exercised
    np.testing.assert_allclose(score(det, model, test_h).numpy(), expected, rtol=1e-10)


def test_row_percentile_matches_numpy_with_ties() -> None:
    x = torch.randn(4, 1001)
    x[:, :300] = x[:, :1]  # many ties
    x[1] = 0.5  # a constant row
    for p in (0.0, 10.0, 33.3, 50.0, 90.0, 99.95):
        got = row_percentile(x, p)
        assert torch.equal(got, percentile(x, p, dim=1))
        np.testing.assert_allclose(got.numpy(), np.percentile(x.numpy(), p, axis=1), rtol=1e-6)


def cifar_train_images(shared_data: Path, per_class: int = 7) -> tuple[Tensor, Tensor]:
    """64 real CIFAR-10 training images under the reference evaluation transform."""
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Resize(32),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        ]
    )
    root = shared_data / "cifar10-jpeg-q75" / "train"
    images, labels = [], []
    for label, cls in enumerate(sorted(p.name for p in root.iterdir())):
        for f in sorted((root / cls).glob("*.jpg"))[:per_class]:
            images.append(tf(Image.open(f).convert("RGB")))
            labels.append(label)
    return torch.stack(images[:64]), torch.tensor(labels[:64])


def reference_densenet(shared_data: Path) -> OODBackbone:
    from lightning_ood.models import create_model

    ckpt = shared_data / "checkpoints" / "densenet100_cifar10_reference.pth.tar"
    return create_model("densenet100", num_classes=10, weights=str(ckpt))


@pytest.mark.parametrize("backbone", ["small_cnn", "densenet100"])
def test_autograd_equals_closed_form_on_real_images(shared_data: Path, backbone: str) -> None:
    """h ⊙ ∂f_y/∂h by one backward per batch equals W[y] ⊙ h on a real CNN and CIFAR images."""
    x, y = cifar_train_images(shared_data)
    model = SmallConvNet() if backbone == "small_cnn" else reference_densenet(shared_data)
    model.eval()
    with torch.no_grad():  # one network pass (DenseNet-100 takes seconds on CPU), reused
        out = model.extract(x)
    if backbone == "densenet100":  # the reference checkpoint really is loaded
        assert (out.logits.argmax(1) == y).float().mean() > 0.6
    dets = {"closed_form": LINe(), "autograd": LINe(contribution="autograd")}
    parts = [
        (BackboneOutput(out.features[i : i + 16], out.logits[i : i + 16]), y[i : i + 16])
        for i in range(0, 64, 16)
    ]
    engine.fit_detectors(dets.values(), model, parts)
    closed, auto = dets["closed_form"], dets["autograd"]
    torch.testing.assert_close(
        auto.contribution_matrix, closed.contribution_matrix, rtol=1e-5, atol=1e-6
    )
    assert torch.equal(auto.act_mask, closed.act_mask)
    torch.testing.assert_close(auto.weight_threshold, closed.weight_threshold, rtol=1e-5, atol=1e-7)
    scores = engine.score_batch(dets, out)
    torch.testing.assert_close(scores["autograd"], scores["closed_form"], rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # gradients w.r.t. h only


def test_autograd_on_nonlinear_head_matches_per_sample_backward() -> None:
    torch.manual_seed(3)
    model = MLPHeadNet(torch.randn(4, 6).double(), torch.randn(4).double()).eval()
    h = torch.rand(24, 6).double()
    y = torch.arange(24) % 4
    det = fit(
        LINe(contribution="autograd", p_a=50.0, p_w=50.0),
        model,
        [(h[:10], y[:10]), (h[10:], y[10:])],
    )
    per_sample = torch.zeros(4, 6, dtype=torch.float64)
    for i in range(24):  # the reference: one backward per training image
        hi = h[i : i + 1].clone().requires_grad_(True)
        model.forward_head(hi)[0, y[i]].backward()
        per_sample[y[i]] += (hi * hi.grad)[0].detach()
    torch.testing.assert_close(det.contribution_matrix, (per_sample / 6).T)


def test_state_dict_round_trip_into_fresh_detector_is_bit_identical() -> None:
    torch.manual_seed(4)
    model = LinearHeadNet(torch.randn(6, 12), torch.randn(6))
    train = [(torch.rand(50, 12) * 2, torch.arange(50) % 6)]
    det = fit(LINe(delta=1.5, p_a=80.0, p_w=70.0, abs_contribution=True), model, train)
    config = det.config()
    assert config["type"] == "line" and config["p_a"] == 80.0
    fresh = LINe(**{k: v for k, v in config.items() if k != "type"})
    assert not fresh.is_fitted
    fresh.load_state_dict(det.state_dict())
    assert fresh.is_fitted
    x = torch.rand(40, 12) * 2
    assert torch.equal(score(fresh, model, x), score(det, model, x))


class DoublingReducer(Reducer):
    """Two identical ranks: every all-reduced sum doubles, every gather repeats."""

    def sum(self, t: Tensor) -> Tensor:
        return t * 2

    def cat(self, t: Tensor) -> Tensor:
        return torch.cat([t, t])


@pytest.mark.parametrize("contribution", ["closed_form", "autograd"])
def test_two_identical_ranks_give_the_same_buffers(contribution: str) -> None:
    torch.manual_seed(5)
    model = LinearHeadNet(torch.randn(6, 12), torch.randn(6))
    train = [(torch.rand(50, 12) * 2, torch.arange(50) % 6)]
    single = fit(LINe(contribution=contribution), model, train)
    double = fit(LINe(contribution=contribution), model, train, DoublingReducer())
    for (name, a), (_, b) in zip(single.named_buffers(), double.named_buffers(), strict=True):
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all()), name  # threshold: NaN


def test_bad_hyperparameters_name_the_parameter() -> None:
    for kwargs, name in [
        ({"p_a": 100.0}, "p_a"),
        ({"p_a": -1.0}, "p_a"),
        ({"p_w": 100.0}, "p_w"),
        ({"delta": 0.0}, "delta"),
        ({"delta": math.nan}, "delta"),
        ({"contribution": "shapley"}, "contribution"),
    ]:
        with pytest.raises(ValueError, match=name):
            LINe(**kwargs)


def test_unfitted_and_mismatched_inputs_raise_clear_errors() -> None:
    model = LinearHeadNet(TOY_W, TOY_B)
    with pytest.raises(RuntimeError, match="not fitted"):
        LINe().score(model.extract(TOY_TEST))
    det, _ = toy_line()
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        det.score(
            LinearHeadNet(torch.randn(2, 5).double(), TOY_B).extract(torch.rand(3, 5).double())
        )
    with pytest.raises(ValueError, match="target"):
        engine.fit_from_loader([det], model, [(TOY_TEST, torch.tensor([0, 2]))])


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from lightning_ood.detectors.line import LINe
    from lightning_ood.models.base import BackboneOutput

    L, q, B, fit_mode = 1000, 2048, 256, sys.argv[1]
    g = torch.Generator().manual_seed(0)
    # W: small noise plus a dominant weight W[k, k], so a sample whose neuron c is the only
    # large activation is predicted as class c: 256 distinct predicted classes.
    weight = torch.randn(L, q, generator=g) * 0.01
    weight[torch.arange(L), torch.arange(L)] = 10.0
    bias = torch.randn(L, generator=g) * 0.01
    det = LINe(delta=1.0, p_a=10.0, p_w=10.0)

    class Head(torch.nn.Module):
        def get_classifier(self):
            fc = torch.nn.Linear(q, L)
            fc.weight.data, fc.bias.data = weight, bias
            return fc

    # Peak RSS of this process since the last reset, in MiB. ru_maxrss would not do: it starts
    # at the forking parent's RSS (pytest's), hiding anything below that.
    def status_mib(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024

    def start():  # reset the high-water mark to the current RSS, return that RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_mib("VmRSS")

    peak = lambda: status_mib("VmHWM")
    result = {}
    if fit_mode == "fit":
        # reset/update/finalize called directly: the peak RSS of finalize alone is measured
        det.reset()
        for _ in range(4):
            h = torch.rand(B, q, generator=g)
            det.update(BackboneOutput(h, h @ weight.T + bias), torch.randint(0, L, (B,)))
        before, t0 = start(), time.perf_counter()
        det.finalize(Head())
        result["finalize_extra_mib"] = peak() - before
        result["finalize_s"] = time.perf_counter() - t0
    else:  # random fitted state of the right shapes, loaded like a checkpoint
        contrib = torch.randn(q, L, generator=g)
        det.load_state_dict({
            "fitted": torch.tensor(True),
            "class_sum": torch.zeros(0, dtype=torch.float64),
            "class_count": torch.zeros(0, dtype=torch.float64),
            "contribution_matrix": contrib,
            "act_threshold": torch.zeros(L),
            "act_mask": contrib.T > 0,
            "weight_threshold": torch.full((L,), 1e-3),
            "weight": weight,
            "bias": bias,
        })
    h = torch.rand(B, q, generator=g) * 0.05
    h[torch.arange(B), torch.arange(B) * 3] = 1.0
    out = BackboneOutput(h, h @ weight.T + bias)
    result["distinct_predicted"] = det.predict(h).unique().numel()
    before, t0 = start(), time.perf_counter()
    s = det.score(out)
    result["score_extra_mib"] = peak() - before
    result["score_s"] = time.perf_counter() - t0
    result["finite"] = bool(torch.isfinite(s).all())
    # The probe sees torch allocations: touching 400 MiB must raise the peak by about that.
    before = start()
    big = torch.ones(100 * 1024 * 1024)
    result["probe_400mib_extra_mib"] = peak() - before
    print(json.dumps(result))
    """
)


def run_memory_probe(mode: str) -> dict:
    """Run the probe in a fresh process; peak RSS is read from Linux's /proc (VmHWM)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the memory probe reads and resets the peak RSS through Linux /proc")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, mode],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_imagenet_head_scoring_stays_under_1gb() -> None:
    """q = 2048, L = 1000, batch 256 with 256 distinct predicted classes: < 1 GB extra.

    The reference's L masked matrices alone would be L·L·q·4 B = 8 GB.
    """
    result = run_memory_probe("load")
    assert result["distinct_predicted"] == 256
    assert result["finite"]
    assert result["probe_400mib_extra_mib"] > 350  # the measurement is live
    assert result["score_extra_mib"] < 1024, result


@pytest.mark.slow
def test_imagenet_head_finalize_and_scoring_stay_under_1gb() -> None:
    result = run_memory_probe("fit")
    assert result["distinct_predicted"] == 256
    assert result["finalize_extra_mib"] < 1024, result
    assert result["score_extra_mib"] < 1024, result
