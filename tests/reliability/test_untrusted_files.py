"""A checkpoint from a stranger is data: nothing in it is imported, called or unpickled.

Every crafted file below passes ``torch.load(weights_only=True)`` (it holds only strings,
numbers, lists, dicts and tensors), so the weights-only loader alone does not stop it; what it
asks for must be refused by what lightning-ood builds from it. Each attack would create a
canary file; the tests assert the refusal, its message, and that the canary never appears.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _cli import base_config, ood_callback

import lightning_ood
from lightning_ood.cli import main
from lightning_ood.detectors.deep_ensemble import DeepEnsemble
from lightning_ood.models import create_model
from lightning_ood.models.trust import (
    UntrustedCheckpointError,
    allow_modules,
    allowed_modules,
    checked_model_record,
)
from lightning_ood.state import build_from_checkpoint
from lightning_ood.task import ClassificationTask


def _shell(canary: Path) -> dict[str, Any]:
    """``model: wrap`` asking for ``subprocess.Popen(["sh", "-c", "touch CANARY"])``."""
    return {
        "module": "subprocess.Popen",
        "module_kwargs": {"args": ["sh", "-c", f"touch {canary}"]},
    }


def _crafted(path: Path, model: str, model_kwargs: dict[str, Any], **extra: Any) -> Path:
    """A file shaped like a lightning-ood checkpoint, with only plain values (weights-only)."""
    hp = {"model": model, "num_classes": 10, "model_kwargs": model_kwargs, "detectors": {}}
    hp.update(extra.pop("hp", {}))
    ckpt = {
        "pytorch-lightning_version": "2.5.0",
        "epoch": 0,
        "global_step": 0,
        "hyper_parameters": hp,
        "state_dict": extra.pop("state_dict", {}),
        "lightning_ood": {"format": 1, "data": {"input_shape": [1, 28, 28]}},
        **extra,
    }
    torch.save(ckpt, path)
    torch.load(path, weights_only=True)  # the attack passes the weights-only loader
    return path


class _Payload:
    """A pickled object whose unpickling would create the canary."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.canary}",))


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    path = tmp_path / "CANARY"
    yield path
    assert not path.exists(), "code from a file ran"


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module whose import creates its own canary (import is code execution)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "strangers_net.py").write_text(
        "from pathlib import Path\n"
        "import torch.nn as nn\n"
        f"Path({str(tmp_path / 'IMPORTED')!r}).touch()\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU())\n"
        "        self.fc = nn.Linear(8, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.body(x))\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    yield "strangers_net.Net"
    sys.modules.pop("strangers_net", None)


# -- lightning_ood.load and build_from_checkpoint --------------------------------------------
def test_load_refuses_a_wrap_import_path_from_the_file(tmp_path: Path, canary: Path) -> None:
    path = _crafted(tmp_path / "evil.ckpt", "wrap", _shell(canary))
    with pytest.raises(UntrustedCheckpointError) as exc:
        lightning_ood.load(path)
    message = str(exc.value)
    assert "model_kwargs.module='subprocess.Popen'" in message
    assert "allow_modules=['subprocess.Popen']" in message  # the opt-in, at the call site
    assert str(path) in message


@pytest.mark.parametrize(
    "module",
    ["os.system", "builtins.exec", "importlib.import_module", "torch.load", "pickle.loads"],
)
def test_no_importable_callable_is_called_from_a_file(
    tmp_path: Path, canary: Path, module: str
) -> None:
    path = _crafted(
        tmp_path / "evil.ckpt",
        "wrap",
        {"module": module, "module_kwargs": {"command": f"touch {canary}"}},
    )
    with pytest.raises(UntrustedCheckpointError, match="no name read from a file"):
        lightning_ood.load(path)


def test_an_nn_module_class_is_not_even_imported_without_the_opt_in(
    tmp_path: Path, user_package: str
) -> None:
    net = create_model("wrap", module=user_package, head="fc", input_shape=[1, 28, 28])
    assert (tmp_path / "IMPORTED").exists()  # the user's own call imports it: allowed
    (tmp_path / "IMPORTED").unlink()
    sys.modules.pop("strangers_net")
    kwargs = {"module": user_package, "head": "fc", "input_shape": [1, 28, 28]}
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    path = _crafted(tmp_path / "net.ckpt", "wrap", kwargs, state_dict=state)
    ckpt = torch.load(path, weights_only=True)
    with pytest.raises(UntrustedCheckpointError, match=r"strangers_net\.Net"):
        build_from_checkpoint(ckpt, source=str(path))
    assert not (tmp_path / "IMPORTED").exists() and "strangers_net" not in sys.modules
    # with the explicit allow-list the same file rebuilds the same network
    backbone, _, _ = build_from_checkpoint(ckpt, str(path), trusted_modules=[user_package])
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(backbone(x), net(x), rtol=0, atol=0)
    assert allowed_modules() == frozenset()  # the opt-in lasted for that call only


def test_trust_pickle_recorded_in_a_file_is_never_honoured(tmp_path: Path, canary: Path) -> None:
    payload = tmp_path / "payload.pt"
    payload.write_bytes(pickle.dumps(_Payload(canary)))
    # a pickled module named by the file, with the file's own opt-in
    path = _crafted(tmp_path / "a.ckpt", "wrap", {"module": str(payload), "trust_pickle": True})
    with pytest.raises(UntrustedCheckpointError):
        lightning_ood.load(path)
    # even allowed by path, the file's trust_pickle is stripped: it is not unpickled
    with pytest.raises(ValueError, match="trust_pickle"):
        build_from_checkpoint(torch.load(path, weights_only=True), trusted_modules=[str(payload)])
    # weights= + trust_pickle on a registered model: both dropped, the state dict is the weights
    record = {
        "model": "lenet",
        "model_kwargs": {"in_channels": 1, "weights": str(payload), "trust_pickle": True},
    }
    assert checked_model_record(record, "x")["model_kwargs"] == {"in_channels": 1}
    net = create_model("lenet", num_classes=10, in_channels=1)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    path = _crafted(tmp_path / "b.ckpt", **record, state_dict=state)
    backbone, _, _ = build_from_checkpoint(torch.load(path, weights_only=True))
    assert torch.equal(backbone.state_dict()["conv1.weight"], net.state_dict()["conv1.weight"])


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        ("lenet", {"in_channels": {"class_path": "subprocess.Popen"}}, "import or instantiate"),
        ("lenet", {"act": {"init_args": {"args": ["sh"]}}}, "import or instantiate"),
        ("lenet", {"__reduce__": 1}, "import or instantiate"),
        ("lenet", {"x": torch.zeros(1)}, "is a Tensor"),
        ("tv:resnet18", {"weights": "x"}, None),  # stripped, see below
        ("timm:resnet18", {"checkpoint_path": "/etc/passwd"}, "read or download"),
        ("timm:resnet18", {"pretrained": True}, "read or download"),
        ("subprocess.Popen", {}, "not a registered architecture"),
        ("tv:../../x", {}, None),  # torchvision's registry refuses it by name
    ],
)
def test_only_registered_architectures_and_plain_values(
    model: str, kwargs: dict[str, Any], match: str | None
) -> None:
    record = {"model": model, "model_kwargs": kwargs}
    if match is None:
        checked = checked_model_record(record, "f.ckpt")
        assert "weights" not in checked["model_kwargs"]
        return
    with pytest.raises(UntrustedCheckpointError, match=match) as exc:
        checked_model_record(record, "f.ckpt")
    assert "f.ckpt" in str(exc.value)


def test_allow_modules_refuses_what_is_not_an_import_path() -> None:
    with pytest.raises(TypeError, match="list of import paths"), allow_modules("pkg.Net"):
        pass
    with pytest.raises(ValueError, match="not class import paths"), allow_modules(["Net"]):
        pass


def test_load_from_checkpoint_reads_the_file_as_data(tmp_path: Path, canary: Path) -> None:
    path = _crafted(tmp_path / "evil.ckpt", "wrap", _shell(canary))
    with pytest.raises(UntrustedCheckpointError):
        ClassificationTask.load_from_checkpoint(path)
    # the instantiation keys Lightning honours are ignored, the plain arguments kept
    net = create_model("lenet", num_classes=10, in_channels=1)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    hp = {"_class_path": "subprocess.Popen", "_instantiator": "subprocess.Popen", "oe_weight": 2}
    path = _crafted(tmp_path / "ok.ckpt", "lenet", {"in_channels": 1}, hp=hp, state_dict=state)
    task = ClassificationTask.load_from_checkpoint(path)
    assert task.hparams["oe_weight"] == 2.0 and "_class_path" not in task.hparams
    assert torch.equal(task.backbone.conv1.weight, net.conv1.weight)


# -- ensembles --------------------------------------------------------------------------------
def test_a_crafted_ensemble_member_file_runs_nothing(tmp_path: Path, canary: Path) -> None:
    evil = _crafted(tmp_path / "member.ckpt", "wrap", _shell(canary))
    for kind in ("de", "fssd_ensemble"):
        from lightning_ood.detectors import build_detectors

        with pytest.raises(UntrustedCheckpointError, match="member checkpoint"):
            build_detectors({"m": {"type": kind, "checkpoints": [str(evil)]}})
    with pytest.raises(UntrustedCheckpointError):
        DeepEnsemble(checkpoints=[str(evil)])


def test_a_fitted_checkpoints_member_record_runs_nothing(tmp_path: Path, canary: Path) -> None:
    """The members' architectures travel as the detector's extra state: crafted there too."""
    net = create_model("lenet", num_classes=10, in_channels=1)
    members = ["absent_a.ckpt", "absent_b.ckpt"]  # not on this machine: the record is used
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    de = DeepEnsemble(checkpoints=members)  # what a fitted checkpoint stores for it
    state.update(de.state_dict(prefix="detectors.de."))
    arch = {"model": "wrap", "num_classes": 10, "model_kwargs": _shell(canary)}
    state["detectors.de._extra_state"] = {"archs": [arch, arch], "sources": members}
    hp = {"detectors": {"de": de.config()}}
    path = _crafted(tmp_path / "fitted.ckpt", "lenet", {"in_channels": 1}, hp=hp, state_dict=state)
    with pytest.raises(UntrustedCheckpointError, match="member record 0"):
        lightning_ood.load(path)


# -- the command line -------------------------------------------------------------------------
def _cli_args(tmp_path: Path, shared_data: Path, detectors: dict | None = None) -> list[str]:
    cfg = base_config(shared_data, test_every=200, ood_every=200, ood_sets=["mnist"])
    cfg["trainer"]["callbacks"] = [ood_callback(detectors or {"energy": {}}, per_set_holdout=0)]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return [
        "--config", str(tmp_path / "cfg.yaml"),
        "--checkpoint_root", str(tmp_path / "ckpt"), "--log_root", str(tmp_path / "logs"),
    ]  # fmt: skip


@pytest.mark.parametrize("sub", ["test", "predict"])
def test_cli_ckpt_path_runs_nothing_from_the_file(
    tmp_path: Path, shared_data: Path, canary: Path, sub: str
) -> None:
    evil = _crafted(tmp_path / "evil.ckpt", "wrap", _shell(canary))
    with pytest.raises(SystemExit) as exc:
        main([sub, *_cli_args(tmp_path, shared_data), "--ckpt_path", str(evil)])
    message = str(exc.value)
    assert message.startswith(f"lightning-ood {sub}: --ckpt_path {evil}")
    assert "--allow_modules [subprocess.Popen]" in message
    assert allowed_modules() == frozenset()


def test_cli_members_from_a_config_run_nothing(
    tmp_path: Path, shared_data: Path, canary: Path, lenet_fitted: dict
) -> None:
    evil = _crafted(tmp_path / "member.ckpt", "wrap", _shell(canary))
    for kind in ("de", "fssd_ensemble"):
        dets = {"m": {"type": kind, "checkpoints": [str(evil)]}}
        args = _cli_args(tmp_path, shared_data, dets)
        with pytest.raises(SystemExit) as exc:
            main(["test", *args, "--ckpt_path", str(lenet_fitted["ckpt"])])
        message = str(exc.value)
        assert message.startswith(f"lightning-ood test: member checkpoint '{evil}'")
        assert "--allow_modules [subprocess.Popen]" in message


def test_cli_allow_modules_admits_the_users_own_class(
    tmp_path: Path, shared_data: Path, user_package: str
) -> None:
    """--allow_modules is the call-site opt-in: with it, a wrap checkpoint is rebuilt."""
    kwargs = {"module": user_package, "head": "fc", "input_shape": [1, 28, 28]}
    net = create_model("wrap", **kwargs)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    path = _crafted(tmp_path / "net.ckpt", "wrap", kwargs, state_dict=state)
    args = [*_cli_args(tmp_path, shared_data), "--ckpt_path", str(path)]
    with pytest.raises(SystemExit, match="allow_modules"):
        main(["test", *args])
    cli = main(["test", *args, "--allow_modules", f"[{user_package}]"])
    assert type(cli.model.backbone.net).__name__ == "Net"
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(cli.model.backbone(x), net(x), rtol=0, atol=0)
    assert allowed_modules() == frozenset()


# -- data files -------------------------------------------------------------------------------
def test_a_dataset_pickle_with_code_is_refused(tmp_path: Path, canary: Path) -> None:
    """CIFAR's python batches are pickles: only numpy arrays and containers are unpickled."""
    import numpy as np

    from lightning_ood.data.readers import CIFARPickles, CorruptDataError

    good = {"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072), "labels": [3, 7]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(good, protocol=2))
    ds = CIFARPickles(tmp_path, ["data_batch_1"], "labels")
    assert len(ds) == 2 and ds[1][1] == 7
    evil = {"data": good["data"], "labels": [3, 7], "x": _Payload(canary)}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(CorruptDataError, match=r"asks to load the Python object posix\.system"):
        CIFARPickles(tmp_path, ["data_batch_2"], "labels")


# -- found by red-teaming the checks above ---------------------------------------------------
_YAML_SPEC = "{class_path: subprocess.Popen, init_args: {args: 'touch %s', shell: true}}"


@pytest.mark.parametrize(
    "where", ["model_kwargs", "detector", "detector_list"], ids=["model", "det", "list"]
)
def test_a_string_that_parses_as_a_class_spec_is_refused(
    tmp_path: Path, shared_data: Path, canary: Path, where: str
) -> None:
    """jsonargparse reads a string under an ``Any`` type as YAML and builds a ``class_path`` in
    it, so such strings may not come from a file, whatever key holds them."""
    spec = _YAML_SPEC % canary
    net = create_model("lenet", num_classes=10, in_channels=1)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    kwargs: dict[str, Any] = {"in_channels": 1}
    hp: dict[str, Any] = {}
    if where == "model_kwargs":
        kwargs["x"] = spec
    elif where == "detector":
        hp = {"detectors": {"e": {"type": "energy", "t": spec}}}
    else:
        hp = {"detectors": {"e": {"type": "energy", "t": ["ok", spec]}}}
    path = _crafted(tmp_path / "evil.ckpt", "lenet", kwargs, hp=hp, state_dict=state)
    with pytest.raises(SystemExit, match="configuration parser would read as an object"):
        main(["test", *_cli_args(tmp_path, shared_data), "--ckpt_path", str(path)])
    with pytest.raises(UntrustedCheckpointError, match="configuration parser"):
        ClassificationTask.load_from_checkpoint(path)


def test_load_from_checkpoint_ignores_lightnings_legacy_keys(tmp_path: Path, canary: Path) -> None:
    """Lightning merges ``hparams``/``module_arguments`` (with an ``_instantiator``) into the
    arguments; ours reads the admitted task arguments and the state dict only."""
    net = create_model("lenet", num_classes=10, in_channels=1)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    legacy = {
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "detectors": {"e": {"class_path": "subprocess.Popen", "init_args": {"args": "x"}}},
    }
    path = _crafted(
        tmp_path / "l.ckpt", "lenet", {"in_channels": 1}, state_dict=state,
        hparams=legacy, module_arguments=legacy,
    )  # fmt: skip
    task = ClassificationTask.load_from_checkpoint(path)
    assert dict(task.detectors) == {} and torch.equal(task.backbone.fc2.weight, net.fc2.weight)


def test_callback_state_cannot_point_a_checkpoint_deletion_elsewhere(tmp_path: Path) -> None:
    """``ModelCheckpoint`` deletes the best/last paths it restores when it replaces them: only
    ``.ckpt`` files beside the resumed checkpoint survive the read."""
    from lightning_ood.checkpoint import SafeCheckpointIO

    run = tmp_path / "ckpt" / "exp"
    run.mkdir(parents=True)
    (tmp_path / "victim").mkdir()
    key = "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 200}"
    state = {
        "best_model_path": f"local://{tmp_path / 'victim'}",
        "kth_best_model_path": str(run / "../../victim"),
        "last_model_path": str(run / "last.ckpt"),
        "best_k_models": {str(tmp_path / "victim"): 1.0, str(run / "epoch1.ckpt"): 0.5},
    }
    torch.save(
        {"pytorch-lightning_version": "2.5.0", "state_dict": {}, "callbacks": {key: state}},
        run / "last.ckpt",
    )
    got = SafeCheckpointIO().load_checkpoint(run / "last.ckpt")["callbacks"][key]
    assert got["best_model_path"] == got["kth_best_model_path"] == ""
    assert got["last_model_path"] == str(run / "last.ckpt")  # the resumed run's own file
    assert got["best_k_models"] == {str(run / "epoch1.ckpt"): 0.5}


def test_files_that_would_exhaust_memory_or_hang_are_refused(tmp_path: Path) -> None:
    from lightning_ood.detectors.members import member_paths
    from lightning_ood.io import NotACheckpointError, safe_load

    torch.save({"t": torch.zeros(1).expand(10_000)}, tmp_path / "stride0.pt")
    with pytest.raises(NotACheckpointError, match="stride-0"):
        safe_load(tmp_path / "stride0.pt")
    with pytest.raises(UntrustedCheckpointError, match="num_classes=2000000"):
        checked_model_record({"model": "lenet", "num_classes": 2_000_000}, "f")
    # a template is replaced literally: no format spec can size the string
    assert member_paths(None, "m{seed}{seed:>300000000}.ckpt", [1]) == ["m1{seed:>300000000}.ckpt"]
    many = [f"m{i}.ckpt" for i in range(200_000)]
    assert member_paths(many, None, None) == many  # linear, not quadratic
    if Path("/proc/self/pagemap").exists():
        with pytest.raises(NotACheckpointError, match="special file"):
            safe_load("/proc/self/pagemap")
