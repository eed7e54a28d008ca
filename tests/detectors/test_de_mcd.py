"""Deep Ensemble and MC Dropout: values against hand computations, seeding (MC Dropout: per-sample
seeded masks, independent of batch position), bad inputs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from toys import TapNet

from lightning_ood import engine
from lightning_ood.detectors.deep_ensemble import DeepEnsemble
from lightning_ood.detectors.mc_dropout import (
    MCDropout,
    MCDropoutVar,
    apply_dropout,
    keep_mask,
    row_keys,
    sample_keys,
)
from lightning_ood.detectors.msp import MSP
from lightning_ood.io import safe_load
from lightning_ood.models import OODBackbone, create_model


def _lenet(seed: int, num_classes: int = 10, **kwargs: object) -> OODBackbone:
    torch.manual_seed(seed)
    return create_model("lenet", num_classes=num_classes, in_channels=1, **kwargs).eval()


def _save_member(path: Path, model: OODBackbone, **kwargs: object) -> str:
    """A minimal lightning-ood checkpoint of ``model`` (what `lightning-ood fit` writes)."""
    hp = {"model": "lenet", "num_classes": model.num_classes, "model_kwargs": dict(kwargs)}
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hp, "state_dict": state}, path)
    return str(path)


@pytest.fixture
def members(tmp_path: Path) -> tuple[list[str], list[OODBackbone]]:
    nets = [_lenet(s) for s in (11, 12, 13)]
    paths = [_save_member(tmp_path / f"m{i}.ckpt", n, in_channels=1) for i, n in enumerate(nets)]
    return paths, nets


def _probs(net: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return net(x).softmax(dim=1)


# -- Deep Ensemble ---------------------------------------------------------------------------
def test_de_is_max_of_the_hand_computed_mean_softmax(members: tuple) -> None:
    paths, nets = members
    main = _lenet(0)
    x = torch.randn(16, 1, 28, 28)
    out = main.extract(x)
    de = DeepEnsemble(checkpoints=paths)
    p1, p2, p3 = (_probs(n, x) for n in nets)
    expected = ((p1 + p2 + p3) / 3).amax(dim=1)
    torch.testing.assert_close(de.score(out, main, x), expected, atol=1e-7, rtol=0)
    # the main network as a fourth member
    de4 = DeepEnsemble(checkpoints=paths, include_model=True)
    expected4 = ((p1 + p2 + p3 + _probs(main, x)) / 4).amax(dim=1)
    torch.testing.assert_close(de4.score(out, main, x), expected4, atol=1e-7, rtol=0)
    # the members' scores are not the main network's: the ensemble really ran them
    assert (de.score(out, main, x) - MSP().score(out)).abs().max() > 1e-3


def test_de_through_the_engine_and_seed_template(members: tuple, tmp_path: Path) -> None:
    paths, nets = members
    main = _lenet(0)
    x = torch.randn(20, 1, 28, 28)
    de = DeepEnsemble(checkpoint_template=str(tmp_path / "m{seed}.ckpt"), seeds=[0, 1, 2])
    assert de.paths == paths and de.needs_inputs and not de.needs_input_grad
    loader = DataLoader(TensorDataset(x, torch.zeros(20, dtype=torch.long)), batch_size=7)
    scores = engine.score_loader({"de": de}, main, loader)["de"]
    expected = torch.stack([_probs(n, x) for n in nets]).mean(0).amax(1).double()
    torch.testing.assert_close(scores, expected, atol=1e-7, rtol=0)
    # members are frozen sub-modules: they travel with .to() and land in the state dict
    assert "members.2.fc2.weight" in de.state_dict()
    assert not any(p.requires_grad for p in de.parameters())


def test_de_members_come_back_from_a_checkpoint_without_their_files(
    members: tuple, tmp_path: Path
) -> None:
    paths, _ = members
    main = _lenet(0)
    x = torch.randn(8, 1, 28, 28)
    out = main.extract(x)
    de = DeepEnsemble(checkpoints=paths)
    expected = de.score(out, main, x)
    buf = tmp_path / "handoff.pt"
    torch.save(nn.ModuleDict({"de": de}).state_dict(), buf)
    for p in paths:
        Path(p).unlink()
    fresh = nn.ModuleDict({"de": DeepEnsemble(checkpoints=paths)})
    assert len(fresh["de"].members) == 0
    with pytest.raises(FileNotFoundError, match=r"m0\.ckpt"):
        fresh["de"].score(out, main, x)
    fresh.load_state_dict(safe_load(buf))  # weights-only load: the record is primitives
    assert torch.equal(fresh["de"].score(out, main, x), expected)


def test_de_refuses_members_of_another_recipe_naming_both_files(tmp_path: Path) -> None:
    a = _save_member(tmp_path / "a.ckpt", _lenet(1), in_channels=1)
    five = _save_member(tmp_path / "five_classes.ckpt", _lenet(2, num_classes=5), in_channels=1)
    with pytest.raises(ValueError, match=r"five_classes\.ckpt.*a\.ckpt"):
        DeepEnsemble(checkpoints=[a, five])
    torch.manual_seed(3)
    rgb = create_model("lenet", num_classes=10, in_channels=3)
    rgb_path = tmp_path / "rgb.ckpt"
    torch.save(
        {
            "hyper_parameters": {
                "model": "lenet",
                "num_classes": 10,
                "model_kwargs": {"in_channels": 3},
            },
            "state_dict": {f"backbone.{k}": v for k, v in rgb.state_dict().items()},
        },
        rgb_path,
    )
    with pytest.raises(ValueError, match=r"rgb\.ckpt.*in_channels.*a\.ckpt"):
        DeepEnsemble(checkpoints=[a, str(rgb_path)])
    # members that agree with each other but not with the tested network
    b = _save_member(tmp_path / "b.ckpt", _lenet(4, num_classes=5), in_channels=1)
    de = DeepEnsemble(checkpoints=[five, b])
    main = _lenet(0)
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"five_classes\.ckpt.*5 classes.*LeNet.*10 classes"):
        de.score(main.extract(x), main, x)


def test_de_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        DeepEnsemble(checkpoints=["a"], seeds=[1])
    with pytest.raises(ValueError, match="seed"):
        DeepEnsemble(checkpoint_template="no_placeholder.ckpt", seeds=[1])
    with pytest.raises(ValueError, match="listed twice"):
        DeepEnsemble(checkpoints=["a.ckpt", "a.ckpt"])
    liar = tmp_path / "liar.ckpt"  # records 10 classes, holds a 5-class head
    five = {f"backbone.{k}": v for k, v in _lenet(0, num_classes=5).state_dict().items()}
    hp = {"model": "lenet", "num_classes": 10, "model_kwargs": {"in_channels": 1}}
    torch.save({"hyper_parameters": hp, "state_dict": five}, liar)
    with pytest.raises(ValueError, match=r"liar\.ckpt.*do not fit"):
        DeepEnsemble(checkpoints=[str(liar)])
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(Exception, match=r"bogus\.ckpt"):
        DeepEnsemble(checkpoints=[str(bogus)])


# -- MC Dropout ------------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch", [4096, 100, 1])
def test_mcd_without_dropout_is_exactly_msp(max_batch: int) -> None:
    """p = 0: the 32 passes are identical, and the float64 mean of identical values is the
    value itself, so the score is MSP bit for bit (a variance of exactly 0)."""
    net = _lenet(0, dropout=False)  # LeNet's dropout modules with p = 0
    x = torch.randn(24, 1, 28, 28)
    with torch.no_grad():
        out = net.extract(x)
    msp = MSP().score(out)
    assert torch.equal(MCDropout(max_batch=max_batch).score(out, net, x), msp)
    assert torch.equal(MCDropoutVar(max_batch=max_batch).score(out, net, x), torch.zeros(24))


class _BNDropNet(OODBackbone):
    """conv - BatchNorm - ReLU - Dropout(0.5) - fc: checks that BatchNorm stays in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.num_classes, self.num_features, self.input_shape = 3, 144, (1, 6, 6)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1)

    def get_classifier(self) -> nn.Linear:
        return self.fc


def test_mcd_matches_a_loop_over_passes_and_is_seeded() -> None:
    """The stacked, chunked passes equal T separate forwards of each sample ALONE, with the
    dropout module replaced by its hand-written training-mode formula (x * keep / (1 - p)) on
    that sample's documented mask. (Before the per-sample masks, the oracle drew the masks of
    the whole batch from torch's RNG seeded with ``seed``: a sample's masks then depended on its
    position in its batch.)"""
    torch.manual_seed(0)
    net = _BNDropNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(5, 1, 6, 6)
    out = net.eval().extract(x)
    bn_before = net.bn.running_mean.clone()
    net.train()  # a training-mode caller: modes must come back as they were
    rng_before = torch.get_rng_state()
    mcd, var = MCDropout(passes=6, seed=3, max_batch=5), MCDropoutVar(passes=6, seed=3, max_batch=5)
    s_mean, s_var = mcd.score(out, net, x), var.score(out, net, x)
    # the oracle: one forward per (sample, pass) in eval mode, the dropout written out by hand
    oracle = copy.deepcopy(net).eval()
    probs = torch.zeros(6, 5, 3, dtype=torch.float64)
    for s in range(5):
        xs = x[s : s + 1]
        for t in range(6):
            keep = keep_mask(row_keys(sample_keys(xs), 3, range(t, t + 1)), 0, 144, 0.5)
            oracle.drop = _Mask(keep.view(1, 4, 6, 6).float() / 0.5)
            with torch.no_grad():
                probs[t, s] = oracle(xs).softmax(1)[0].double()
    torch.testing.assert_close(s_mean, probs.mean(0).amax(1).float(), atol=1e-6, rtol=0)
    expected_var = -probs.var(0, unbiased=False).mean(1).float()
    torch.testing.assert_close(s_var, expected_var, atol=1e-8, rtol=1e-5)
    assert (s_var < 0).all()  # dropout p = 0.5 really varies the predictions
    net.train()
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global stream is untouched
    assert torch.equal(mcd.score(out, net, x.clone()), s_mean)  # a re-run: identical
    assert not torch.equal(MCDropout(passes=6, seed=4, max_batch=5).score(out, net, x), s_mean)
    assert torch.equal(net.bn.running_mean, bn_before)  # BatchNorm stayed in eval mode
    assert net.training and net.bn.training and net.drop.training  # modes restored
    assert not net.drop._forward_hooks  # the mask hooks are removed


class _Mask(nn.Module):
    """A fixed dropout: multiply by a given (already scaled) noise tensor."""

    def __init__(self, noise: Tensor) -> None:
        super().__init__()
        self.noise = noise

    def forward(self, x: Tensor) -> Tensor:
        return x * self.noise


def test_mcd_scores_do_not_depend_on_batch_position_size_or_chunking() -> None:
    """A sample's masks depend on its content, not its place: alone, in a batch of 7, in a
    shuffled batch, or with other ``max_batch`` chunkings it scores the same (up to LeNet's
    float32 convolutions, which round differently for different batch sizes); a duplicated
    sample gets identical masks, hence identical scores."""
    net = _lenet(0)
    x = torch.randn(7, 1, 28, 28)
    x[5] = x[2]  # a duplicate
    ref = MCDropout(passes=8, seed=1).score(net.extract(x), net, x)
    assert ref[5] == ref[2]
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    shuffled = MCDropout(passes=8, seed=1).score(net.extract(x[perm]), net, x[perm])
    torch.testing.assert_close(shuffled, ref[perm], atol=1e-6, rtol=0)
    alone = torch.cat(
        [MCDropout(passes=8, seed=1).score(net.extract(x[i : i + 1]), net, x[i : i + 1])
         for i in range(7)]
    )  # fmt: skip
    torch.testing.assert_close(alone, ref, atol=1e-6, rtol=0)
    for max_batch in (1, 10, 56):  # 8, 1 and 8 passes per forward
        got = MCDropout(passes=8, seed=1, max_batch=max_batch).score(net.extract(x), net, x)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # the same values in float64 hash to the same keys (float32 bit patterns)
    assert torch.equal(sample_keys(x.double()), sample_keys(x))
    # the dropout really acts: the scores are not the deterministic network's MSP
    assert (ref - MSP().score(net.extract(x))).abs().max() > 1e-3


def test_mcd_masks_are_bernoulli_and_independent() -> None:
    """The hash masks keep each unit with probability 1 - p (binomial bounds), independently
    across samples, passes, modules and seeds."""
    keys = sample_keys(torch.randn(64, 3, 5, 5))
    assert keys.unique().numel() == 64
    rows = row_keys(keys, 0, range(16))  # 1,024 rows
    assert rows.unique().numel() == rows.numel()
    n_units = 500
    for p in (0.1, 0.25, 0.5, 0.9):
        keep = keep_mask(rows, 0, n_units, p)
        n = keep.numel()
        frac = float(keep.float().mean())
        assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, (p, frac)
        per_unit = keep.float().mean(0)  # every unit is dropped alike
        assert (per_unit - (1 - p)).abs().max() < 5 * (p * (1 - p) / rows.numel()) ** 0.5
    a = keep_mask(rows, 0, n_units, 0.5).float()
    others = {
        "next pass": keep_mask(row_keys(keys, 0, range(1, 17)), 0, n_units, 0.5),
        "other module": keep_mask(rows, 1, n_units, 0.5),
        "other seed": keep_mask(row_keys(keys, 1, range(16)), 0, n_units, 0.5),
    }
    for what, b in others.items():  # agreement of independent fair coins: 1/2
        agree = float((a == b.float()).float().mean())
        assert abs(agree - 0.5) < 5 * (0.25 / a.numel()) ** 0.5, what
    assert torch.equal(keep_mask(rows, 0, 0, 0.5), torch.zeros(1024, 0, dtype=torch.bool))
    assert keep_mask(rows, 0, 10, 0.0).all() and not keep_mask(rows, 0, 10, 1.0).any()


@pytest.mark.parametrize(
    "module", [nn.Dropout(0.3), nn.Dropout2d(0.3), nn.AlphaDropout(0.3),
               nn.FeatureAlphaDropout(0.3)], ids=lambda m: type(m).__name__
)  # fmt: skip
def test_mcd_dropout_formulas_are_torchs(module: nn.Module) -> None:
    """Given the units torch's own training-mode dropout dropped, :func:`apply_dropout`
    reproduces its output: the same scaling (1 / (1 - p)) and SELU affine correction."""
    x = torch.rand(4, 6, 5, 5) + 0.5  # positive: a dropped unit is recognisable
    module.train()
    want = module(x)
    kept = want != apply_dropout(module, x, torch.zeros(1, dtype=torch.bool))
    if isinstance(module, (nn.Dropout2d, nn.FeatureAlphaDropout)):
        assert (kept == kept[:, :, :1, :1]).all()  # whole channels
    assert 0 < float(kept.float().mean()) < 1
    torch.testing.assert_close(apply_dropout(module, x, kept), want, atol=1e-6, rtol=1e-6)


def test_mcd_refuses_activations_that_are_not_batch_first() -> None:
    class TimeFirst(_BNDropNet):
        def forward_features(self, x: Tensor) -> Tensor:
            h = torch.relu(self.bn(self.conv(x))).flatten(1)
            return self.drop(h.T.contiguous()).T  # (features, batch) at the dropout

    net = TimeFirst().eval()
    x = torch.randn(3, 1, 6, 6)
    with pytest.raises(ValueError, match=r"batch-first"):
        MCDropout(passes=2).score(net.extract(x), net, x)
    assert not net.drop._forward_hooks


def test_mcd_and_mcd_var_share_the_passes_of_a_batch() -> None:
    """Through the engine, the two MCD statistics of one batch cost T passes, not 2T, and
    equal what each computes alone; a new batch (even at the same values) is recomputed."""
    net = _lenet(0)
    x = torch.randn(8, 1, 28, 28)
    sizes: list[int] = []
    net.conv1.register_forward_pre_hook(lambda _m, inp: sizes.append(inp[0].shape[0]))
    dets = {"mcd": MCDropout(passes=16), "mcd_var": MCDropoutVar(passes=16)}
    with torch.no_grad():
        out = net.eval().extract(x)
    sizes.clear()
    both = engine.score_batch(dets, out, net, x)
    assert sizes == [128]  # one forward of 16 passes x 8 samples for both detectors
    alone_mean = MCDropout(passes=16).score(out, net, x.clone())
    alone_var = MCDropoutVar(passes=16).score(out, net, x.clone())
    assert torch.equal(both["mcd"], alone_mean) and torch.equal(both["mcd_var"], alone_var)
    assert sizes == [128, 128, 128]  # new tensors: recomputed, never taken from the memo
    assert not torch.equal(both["mcd_var"], torch.zeros_like(both["mcd_var"]))


def test_mcd_runs_the_passes_as_few_batched_forwards() -> None:
    net = _lenet(0)
    x = torch.randn(8, 1, 28, 28)
    out = net.extract(x)
    sizes: list[int] = []
    net.conv1.register_forward_pre_hook(lambda _m, inp: sizes.append(inp[0].shape[0]))
    MCDropout(passes=32).score(out, net, x)
    assert sizes == [256]  # one forward over the repeated batch
    sizes.clear()
    MCDropout(passes=32, max_batch=100).score(out, net, x)
    assert sizes == [96, 96, 64]  # 12 passes of 8 samples per chunk


def test_mcd_refuses_a_model_without_dropout_and_cached_features() -> None:
    net = TapNet().eval()
    x = torch.randn(4, 2, 4, 4)
    out = net.extract(x)
    with pytest.raises(ValueError, match="TapNet has no dropout"):
        MCDropout().score(out, net, x)
    for det in (MCDropout(), MCDropoutVar(), DeepEnsemble(checkpoints=["absent.ckpt"])):
        assert det.needs_inputs and not det.needs_input_grad
        with pytest.raises(ValueError, match="cached features cannot"):
            engine.check_feature_only(det)
        with pytest.raises(ValueError, match="cached features cannot"):
            engine.score_batch({det.name: det}, out)
    with pytest.raises(ValueError, match="passes"):
        MCDropout(passes=0)


def test_mcd_config_round_trips() -> None:
    det = MCDropoutVar(passes=8, seed=5, max_batch=64, name="v")
    assert det.config() == {"type": "mcd_var", "passes": 8, "seed": 5, "max_batch": 64, "name": "v"}
    # nothing fitted to store: the state is the base detector's flags only
    assert set(det.state_dict()) == {"fitted", "threshold", "threshold_tpr"}
