"""Hand-off: a fitted checkpoint → `lightning_ood.load` in a fresh process, `predict` CSV,
`torch.export`, and clear refusals of inputs the model was not trained for."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli import LENET_DETECTORS, ROOT, run_cli
from torchvision.datasets import FashionMNIST

import lightning_ood
from lightning_ood.io import safe_load

DETECTORS = LENET_DETECTORS
EXPORTABLE = ["msp", "energy", "react", "dice", "line", "mahalanobis", "fssd"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, lenet_fitted: dict) -> dict:
    """The session's fitted LeNet checkpoint, and a `predict` CSV of it (500 ID, 500 MNIST,
    40 PNGs)."""
    tmp = tmp_path_factory.mktemp("handoff")
    cfg, ckpt = lenet_fitted["config"], lenet_fitted["ckpt"]
    out = tmp / "pred.csv"
    folder = tmp / "mine"  # the user's own images: 40 PNGs, all scored (ood_every: 20 is not)
    folder.mkdir()
    images = FashionMNIST(str(lenet_fitted["config"]["data"]["init_args"]["root"]), train=False)
    for i in range(40):
        images[i][0].save(folder / f"img{i:02d}.png")
    pred_cfg = {**cfg, "data": {**cfg["data"], "init_args": {**cfg["data"]["init_args"]}}}
    pred_cfg["data"]["init_args"]["predict_sets"] = [
        {"name": "mnist", "every": 20},  # a predict set is sliced only by its own `every`
        {"name": "mine", "kind": "folder", "path": str(folder)},
    ]
    run_cli(
        tmp, "handoff", "predict", pred_cfg, "--ckpt_path", str(ckpt), "--predictions", str(out)
    )
    return {"tmp": tmp, "ckpt": ckpt, "csv": out, "config": cfg}


def _test_images(shared_data: Path, every: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    ds = FashionMNIST(str(shared_data), train=False)
    return ds.data[::every].unsqueeze(1), ds.targets[::every]  # uint8 (N, 1, 28, 28)


def test_checkpoint_records_what_a_receiving_team_needs(fitted: dict) -> None:
    meta = safe_load(fitted["ckpt"])["lightning_ood"]["data"]
    assert meta["class_names"][:3] == ["T-shirt/top", "Trouser", "Pullover"]
    assert meta["input_shape"] == [1, 28, 28]
    assert meta["mean"] == pytest.approx([0.2860]) and meta["std"] == pytest.approx([0.3530])
    assert meta["data_version"] == "FashionMNIST (original idx files)"


def test_load_in_a_fresh_process(fitted: dict, shared_data: Path) -> None:
    script = f"""
import json, torch, lightning_ood
from torchvision.datasets import FashionMNIST
model = lightning_ood.load({str(fitted["ckpt"])!r})
ds = FashionMNIST({str(shared_data)!r}, train=False)
x, y = ds.data[::20].unsqueeze(1), ds.targets[::20]
out = model(x)
print(json.dumps({{
    "type": type(model).__name__, "is_module": isinstance(model, torch.nn.Module),
    "logits": list(out["logits"].shape), "detectors": sorted(out["scores"]),
    "acc": float((out["pred"] == y).float().mean()),
    "flagged": {{k: int(v.sum()) for k, v in out["is_ood"].items()}},
}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["type"] == "OODPredictor" and res["is_module"]
    assert res["logits"] == [500, 10]
    assert res["detectors"] == sorted(DETECTORS)
    assert res["acc"] > 0.6
    # The calibration set IS this slice (val = ID test set, val_size 0): exactly >= 95 % kept.
    for det, n_flagged in res["flagged"].items():
        assert n_flagged <= 25, det  # 5 % of 500


def test_thresholds_are_the_95_percent_tpr_point_of_held_out_id_scores(
    fitted: dict, shared_data: Path
) -> None:
    model = lightning_ood.load(fitted["ckpt"])
    x, _ = _test_images(shared_data)
    with torch.no_grad():
        scores = model(x)["scores"]
    for name, det in model.detectors.items():
        s = torch.sort(scores[name].double()).values
        k = int(0.05 * len(s))  # floor((1 - 0.95) * 500) = 25
        assert float(det.threshold) == pytest.approx(float(s[k]), rel=1e-6, abs=1e-9), name
        assert float(det.threshold_tpr) == 0.95


def test_predict_writes_one_row_per_sample_matching_the_module(
    fitted: dict, shared_data: Path
) -> None:
    rows = list(csv.DictReader(fitted["csv"].open()))
    assert len(rows) == 500 + 500 + 40  # FashionMNIST and MNIST test [::20], all 40 PNGs
    assert len({(r["set"], r["position"]) for r in rows}) == len(rows)
    id_rows = [r for r in rows if r["set"] == "fashionmnist"]
    assert [int(r["position"]) for r in id_rows] == list(range(500))
    # `index` maps a row back to the full set, although only every 20th sample was scored
    assert [int(r["index"]) for r in id_rows] == list(range(0, 10_000, 20))
    mine = [r for r in rows if r["set"] == "mine"]
    assert [(int(r["index"]), Path(r["path"]).name) for r in mine] == [
        (i, f"img{i:02d}.png") for i in range(40)
    ]
    model = lightning_ood.load(fitted["ckpt"])
    x, y = _test_images(shared_data)
    out = model(x)
    assert [int(r["target"]) for r in id_rows] == y.tolist()
    assert [int(r["pred"]) for r in id_rows] == out["pred"].tolist()
    assert id_rows[0]["class"] == model.class_names[out["pred"][0]]
    for det in DETECTORS:
        csv_scores = torch.tensor([float(r[f"{det}_score"]) for r in id_rows])
        assert torch.allclose(csv_scores, out["scores"][det].float(), rtol=1e-5, atol=1e-5), det
        flags = [int(r[f"{det}_is_ood"]) for r in id_rows]
        assert flags == out["is_ood"][det].int().tolist(), det


def test_export_matches_the_module(fitted: dict, shared_data: Path, tmp_path: Path) -> None:
    model = lightning_ood.load(fitted["ckpt"], detectors=EXPORTABLE)
    x, _ = _test_images(shared_data)
    program = model.export(x[:4].float() / 255)
    path = tmp_path / "predictor.pt2"
    torch.export.save(program, path)
    reloaded = torch.export.load(path).module()
    xs = x[:64].float() / 255
    expected = model(xs)
    got = reloaded(xs)  # another batch size than the example: the batch dim is dynamic
    assert torch.equal(got["logits"], expected["logits"])
    for det in EXPORTABLE:
        assert torch.equal(got["scores"][det], expected["scores"][det]), det
        assert torch.equal(got["is_ood"][det], expected["is_ood"][det]), det
    with pytest.raises(ValueError, match=r"\['odin'\] need input gradients.*cannot be exported"):
        lightning_ood.load(fitted["ckpt"]).export(x[:4].float() / 255)


def test_bad_inputs_are_refused_with_what_to_do(fitted: dict) -> None:
    model = lightning_ood.load(fitted["ckpt"], detectors=["energy"])
    good = torch.rand(3, 1, 28, 28)
    with pytest.raises(ValueError, match=r"shape \(3, 1, 32, 32\).*\(N, 1, 28, 28\).*Resize"):
        model(torch.rand(3, 1, 32, 32))
    with pytest.raises(ValueError, match=r"shape \(3, 3, 28, 28\).*\(N, 1, 28, 28\)"):
        model(torch.rand(3, 3, 28, 28))
    bad = good.clone()
    bad[1, 0, 5, 5] = float("nan")
    bad[2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf values in sample\(s\) \[1, 2\]"):
        model(bad)
    with pytest.raises(ValueError, match=r"no fitted, calibrated detector\(s\) \['nope'\]"):
        lightning_ood.load(fitted["ckpt"], detectors=["nope"])


# -- the exported program and the eager module agree, bad input included ----------------------
@pytest.mark.parametrize("example_size", [1, 2, 300])
def test_export_any_example_batch_size_gives_a_dynamic_batch(
    fitted: dict, shared_data: Path, example_size: int
) -> None:
    model = lightning_ood.load(fitted["ckpt"], detectors=["energy", "line"])
    x = _test_images(shared_data)[0].float() / 255
    program = model.export(x[:example_size]).module()
    for n in (1, 3, 64):
        got, want = program(x[:n]), model(x[:n])
        assert got["logits"].shape == (n, 10)
        for det in ("energy", "line"):
            torch.testing.assert_close(got["scores"][det], want["scores"][det])
            assert torch.equal(got["is_ood"][det], want["is_ood"][det]), det


def test_exported_program_refuses_what_the_module_refuses(fitted: dict, shared_data: Path) -> None:
    model = lightning_ood.load(fitted["ckpt"], detectors=["energy"])
    x = _test_images(shared_data)[0][:4]
    program = model.export(x.float() / 255).module()
    nan = x.float() / 255
    nan[2, 0, 3, 3] = float("nan")
    over = x.float()  # 0..255 floats
    for bad, words in [(nan, "NaN or Inf"), (over, r"outside \[0, 1\]")]:
        with pytest.raises(ValueError, match=words):
            model(bad)
        with pytest.raises(RuntimeError, match=words):
            program(bad)
    with pytest.raises(ValueError, match="at least one image"):
        model.export(x[:0].float() / 255)
    # uint8 is a first-class input dtype: export with a uint8 example to deploy on uint8
    program_u8 = model.export(x).module()
    assert torch.equal(program_u8(x)["scores"]["energy"], model(x)["scores"]["energy"])


def test_out_of_range_and_integer_inputs_are_refused(fitted: dict, shared_data: Path) -> None:
    model = lightning_ood.load(fitted["ckpt"], detectors=["energy", "msp"])
    x = _test_images(shared_data)[0][:8]
    normalised = (x.float() / 255 - 0.2860) / 0.3530  # what a datamodule batch looks like
    negative = x.float() / 255 - 0.5
    for bad in (x.float(), normalised, negative):
        with pytest.raises(ValueError, match=r"outside \[0, 1\].*do not apply the dataset"):
            model(bad)
    with pytest.raises(ValueError, match=r"dtype torch.int32; pass uint8 images"):
        model(x.int())
    ok = model(x.double() / 255)  # float64 in [0, 1] is valid, scored like float32
    assert torch.equal(ok["pred"], model(x)["pred"])


def test_memory_is_bounded_by_chunks_and_empty_batches_work(
    fitted: dict, shared_data: Path
) -> None:
    x = _test_images(shared_data)[0]  # 500 uint8 images
    chunked = lightning_ood.load(fitted["ckpt"], chunk_size=128)
    whole = lightning_ood.load(fitted["ckpt"], chunk_size=1000)
    sizes: list[int] = []
    real = chunked.score_normalized

    def spy(batch: torch.Tensor) -> dict:
        sizes.append(len(batch))
        return real(batch)

    chunked.score_normalized = spy  # type: ignore[method-assign]
    got, want = chunked(x), whole(x)
    assert sizes == [128, 128, 128, 116]  # never more than chunk_size samples per pass
    assert torch.equal(got["pred"], want["pred"])
    for det in want["scores"]:
        torch.testing.assert_close(got["scores"][det], want["scores"][det], rtol=1e-5, atol=1e-5)
    empty = whole(x[:0])
    assert empty["logits"].shape == (0, 10) and empty["pred"].shape == (0,)
    assert set(empty["scores"]) == set(want["scores"]) == set(DETECTORS)
    for det, s in empty["scores"].items():
        assert s.shape == (0,) and empty["is_ood"][det].shape == (0,), det


def test_peak_memory_does_not_grow_with_the_batch(fitted: dict, shared_data: Path) -> None:
    """The issue's probe: ODIN on 4,096 images raised peak memory from 0.8 to 4.3 GB. Scored in
    chunks with no autograd graph kept, 4,096 images cost what 256 do (within 0.3 GB)."""
    script = f"""
import json, resource, torch, lightning_ood
from torchvision.datasets import FashionMNIST
model = lightning_ood.load({str(fitted["ckpt"])!r}, detectors=["odin"])
x = FashionMNIST({str(shared_data)!r}, train=False).data[:4096].unsqueeze(1)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model(x[:256])
small = peak()
out = model(x)
print(json.dumps({{"small": small, "large": peak(), "n": len(out["scores"]["odin"])}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["n"] == 4096
    assert res["large"] - res["small"] < 0.3e9, res


@pytest.mark.gpu
def test_load_onto_a_gpu_scores_there(fitted: dict, shared_data: Path) -> None:
    model = lightning_ood.load(fitted["ckpt"], map_location="cuda")
    x = _test_images(shared_data)[0][:8].cuda()
    out = model(x)
    assert out["logits"].device.type == "cuda" and model.mean.device.type == "cuda"
    cpu = lightning_ood.load(fitted["ckpt"])(x.cpu())
    torch.testing.assert_close(out["scores"]["energy"].cpu(), cpu["scores"]["energy"])
