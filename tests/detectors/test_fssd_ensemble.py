"""Multi-model FSSD (FSSD paper §3.3): per-network FSSDs against a hand computation, the
combiner over N·K components against scikit-learn, hand-off and the callback's hold-out."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood.callbacks import OODEvaluation
from lightning_ood.detectors import FSSD, FSSDEnsemble, build_detector
from lightning_ood.io import safe_load
from lightning_ood.models import OODBackbone, create_model
from lightning_ood.task import ClassificationTask

TAPS = ["conv2", "fc1"]


def _lenet(seed: int, num_classes: int = 10) -> OODBackbone:
    torch.manual_seed(seed)
    return create_model("lenet", num_classes=num_classes).eval()


def _save_member(path: Path, model: OODBackbone) -> str:
    """A minimal lightning-ood checkpoint of ``model`` (what `lightning-ood fit` writes)."""
    hp = {"model": "lenet", "num_classes": model.num_classes, "model_kwargs": {}}
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hp, "state_dict": state}, path)
    return str(path)


@pytest.fixture
def members(tmp_path: Path) -> tuple[list[str], list[OODBackbone]]:
    nets = [_lenet(s) for s in (11, 12)]
    return [_save_member(tmp_path / f"m{i}.ckpt", n) for i, n in enumerate(nets)], nets


def _hand_components(nets: list[nn.Module], x: Tensor, n_noise: int) -> Tensor:
    """||F_{n,l}(x) - mean_noise F_{n,l}||_2 per network n and tap l, network-major; the
    noise is the reference's: integers U{0..254} fed as (v - 127.5)/255, seed 0."""
    g = torch.Generator().manual_seed(0)
    noise = (torch.randint(0, 255, (n_noise, *x.shape[1:]), generator=g).float() - 127.5) / 255
    cols = []
    with torch.no_grad():
        for net in nets:
            on_noise, on_x = net.extract(noise, taps=TAPS), net.extract(x, taps=TAPS)
            for t in TAPS:
                fss = on_noise.tap(t).flatten(1).double().mean(0).float()
                cols.append((on_x.tap(t).flatten(1) - fss).norm(dim=1))
    return torch.stack(cols, dim=1)


def test_components_are_every_networks_fssd_by_hand(members: tuple) -> None:
    paths, nets = members
    main = _lenet(0)
    ens = FSSDEnsemble(checkpoints=paths, taps=TAPS, n_noise=16)
    ens.finalize(main)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        out = main.extract(x, taps=TAPS)
    got = ens.score_components(out, main, x)
    torch.testing.assert_close(got, _hand_components([main, *nets], x, 16), rtol=1e-5, atol=1e-5)
    assert ens.component_names(main) == (
        "model/conv2", "model/fc1", "member1/conv2", "member1/fc1", "member2/conv2", "member2/fc1",
    )  # fmt: skip
    assert ens.num_components == 6 and ens.tap_names(main) == tuple(TAPS) and ens.needs_inputs
    # Without the tested network: only the members' components, no taps of the main pass.
    alone = build_detector("fe", {"type": "fssd_ensemble", "checkpoints": paths,
                                  "include_model": False, "taps": TAPS, "n_noise": 16})  # fmt: skip
    alone.finalize(main)
    assert alone.tap_names(main) == () and alone.num_components == 4
    torch.testing.assert_close(alone.score_components(out, main, x), got[:, 2:])


def test_combiner_over_all_networks_is_sklearns_logistic_regression(members: tuple) -> None:
    paths, _ = members
    main = _lenet(0)
    ens = FSSDEnsemble(checkpoints=paths, taps=TAPS, n_noise=16, combiner="lr")
    ens.finalize(main)
    x_id, x_ood = torch.randn(20, 1, 28, 28), 3 + torch.rand(20, 1, 28, 28)
    with torch.no_grad():
        out_id, out_ood = main.extract(x_id, taps=TAPS), main.extract(x_ood, taps=TAPS)
    c_id = ens.score_components(out_id, main, x_id)
    c_ood = ens.score_components(out_ood, main, x_ood)
    ens.fit_combiner(c_id, c_ood)
    x = np.concatenate([c_id.double().numpy(), c_ood.double().numpy()])
    y = np.r_[np.ones(20), np.zeros(20)]
    clf = LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
    assert ens.combiner_coef.numel() == 6
    got = ens.score(out_id, main, x_id)
    want = torch.as_tensor(clf.decision_function(c_id.double().numpy()), dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_handoff_rebuilds_members_and_scores_identically(members: tuple, tmp_path: Path) -> None:
    paths, _ = members
    main = _lenet(0)
    ens = FSSDEnsemble(checkpoints=paths, n_noise=16)  # taps resolved at finalize
    ens.finalize(main)
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        out = main.extract(x, taps=ens.tap_names(main))
    c = ens.score_components(out, main, x)
    ens.fit_combiner(c, c + 1.0)
    expected = ens.score(out, main, x)
    torch.save(nn.ModuleDict({"fe": ens}).state_dict(), tmp_path / "handoff.pt")
    for p in paths:
        Path(p).unlink()
    fresh = nn.ModuleDict({"fe": FSSDEnsemble(checkpoints=paths, n_noise=16)})
    with pytest.raises(FileNotFoundError, match=r"m0\.ckpt"):
        fresh["fe"].finalize(main)
    fresh.load_state_dict(safe_load(tmp_path / "handoff.pt"))
    assert fresh["fe"].is_fitted and fresh["fe"].num_components == c.shape[1]
    assert torch.equal(fresh["fe"].score(out, main, x), expected)


def test_bad_members_and_inputs_are_named(members: tuple, tmp_path: Path) -> None:
    paths, _ = members
    five = _save_member(tmp_path / "five.ckpt", _lenet(3, num_classes=5))
    with pytest.raises(ValueError, match=r"five\.ckpt.*m0\.ckpt|m0\.ckpt.*five\.ckpt"):
        FSSDEnsemble(checkpoints=[paths[0], five])
    ens = FSSDEnsemble(checkpoints=[five], n_noise=4)
    with pytest.raises(ValueError, match=r"five\.ckpt.*5 classes.*10 classes"):
        ens.finalize(_lenet(0))
    ok = FSSDEnsemble(checkpoints=paths, taps=TAPS, n_noise=4)
    main = _lenet(0)
    ok.finalize(main)
    with pytest.raises(ValueError, match="need `inputs`"):
        ok.score_components(main.extract(torch.randn(2, 1, 28, 28), taps=TAPS), main)
    with pytest.raises(ValueError, match="n_noise"):
        FSSDEnsemble(checkpoints=paths, n_noise=0)


class _Toy(LightningDataModule):
    id_name, data_version = "toy", "toy random tensors"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.test = TensorDataset(torch.rand(40, 1, 28, 28, generator=g), torch.arange(40) % 10)
        self.ood = TensorDataset(3 + torch.rand(48, 1, 28, 28, generator=g), torch.full((48,), -1))
        self.test_set_names = ["toy", "far"]

    def test_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.test, batch_size=16), DataLoader(self.ood, batch_size=16)]


def test_callback_fits_the_combiner_on_the_hold_out_over_n_times_k(
    members: tuple, tmp_path: Path
) -> None:
    """Through `test`: the ensemble of 3 networks x 2 taps is held out like FSSD (10 per set,
    reported on the rest) and its combiner has 6 weights; the tested network's FSSD part is
    the plain FSSD's (same noise), so the single-network detector's components reappear."""
    paths, _ = members
    dets = {
        "fssd": {"taps": TAPS, "n_noise": 8},
        "fe": {"type": "fssd_ensemble", "checkpoints": paths, "taps": TAPS, "n_noise": 8},
    }
    cb = OODEvaluation(
        detectors=dets, per_set_holdout=10, results_dir=str(tmp_path), progress=False
    )
    torch.manual_seed(0)
    task = ClassificationTask(model="lenet", num_classes=10)
    trainer = Trainer(
        default_root_dir=tmp_path,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
    )
    trainer.test(task, datamodule=_Toy())
    got = cb.results
    held = {n: (m["far"]["n_id"], m["far"]["n_ood"]) for n, m in got["metrics"].items()}
    # per-set rows on the hold-out's remainder; the shipped rows on every sample
    assert held == {"fe": (40, 48), "fssd": (40, 48), "fe[per-set]": (30, 38),
                    "fssd[per-set]": (30, 38)}  # fmt: skip
    assert sorted(got["validation"]["held_out_for"]) == ["fe", "fssd"]
    assert len(got["combiners"]["fe"]["far"]["combiner_coef"]) == 6
    fe, fssd = task.detectors["fe"], task.detectors["fssd"]
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        out = task.backbone.extract(x, taps=TAPS)
    assert isinstance(fssd, FSSD)
    torch.testing.assert_close(
        fe.score_components(out, task.backbone, x)[:, :2], fssd.score_components(out)
    )


def test_finalize_only_values_reach_every_networks_fssd(members: tuple) -> None:
    """The tuner's sharing path (a copy with finalize-only values set, then finalize) gives
    what a fresh detector with those values gives."""
    paths, _ = members
    main = _lenet(0)
    proto = FSSDEnsemble(checkpoints=paths, taps=TAPS, n_noise=4)
    proto.finalize(main)
    copy_ = copy.deepcopy(proto)
    copy_.n_noise, copy_.noise_seed = 12, 3
    copy_.finalize(main)
    fresh = FSSDEnsemble(checkpoints=paths, taps=TAPS, n_noise=12, noise_seed=3)
    fresh.finalize(main)
    assert copy_.config() == fresh.config()
    for a, b in zip(copy_.fssds, fresh.fssds, strict=True):
        assert torch.equal(a.fss, b.fss)
    assert not torch.equal(proto.fssds[1].fss, fresh.fssds[1].fss)
