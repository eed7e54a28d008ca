"""OOD-set groups (near/far) and ``missing: skip``: parsing, the datamodule's ``groups()`` and
``skipped_ood_sets()``, the OpenOOD CIFAR-10 overlay config against the shared data root, and
the missing-set path on a temporary data root."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from lightning_ood.data import CIFAR10DataModule, FashionMNISTDataModule
from lightning_ood.data.ood_sets import OODSpec, missing_reason, parse_ood_spec

CONFIG = Path(__file__).parents[2] / "lightning_ood/configs/ood/openood_cifar10.yaml"


@pytest.fixture
def fmnist_root(tmp_path: Path, shared_data: Path) -> Path:
    """A data root holding FashionMNIST (ID) and MNIST, and nothing else (links, read-only)."""
    for name in ("FashionMNIST", "MNIST"):
        (tmp_path / name).symlink_to(shared_data / name, target_is_directory=True)
    return tmp_path


def _fmnist(root: Path, ood_sets: list, **kwargs: object) -> FashionMNISTDataModule:
    kwargs.setdefault("download", False)
    return FashionMNISTDataModule(
        root=str(root),
        ood_sets=ood_sets,
        num_workers=0,
        test_every=500,
        ood_every=500,
        train_every=600,
        **kwargs,
    )


# -- parsing -----------------------------------------------------------------------------------
def test_group_and_missing_are_parsed() -> None:
    spec = parse_ood_spec({"name": "mnist", "group": "far", "missing": "skip"})
    assert (spec.name, spec.kind, spec.group, spec.missing) == ("mnist", "mnist", "far", "skip")
    plain = parse_ood_spec("mnist")
    assert (plain.group, plain.missing) == (None, "error")  # configs without groups unchanged
    assert plain.options == {} and spec.options == {}  # not passed to the builder


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"name": "mnist", "group": ""}, "'group' must be a name such as near or far"),
        ({"name": "mnist", "group": 3}, "'group' must be a name"),
        ({"name": "mnist", "group": "average"}, "group 'average' is the name of the overall row"),
        ({"name": "mnist", "missing": "ignore"}, "'missing' must be error .* or skip"),
        ({"name": "mnist", "grop": "far"}, "allowed: name, kind, path, every, group, missing"),
    ],
)
def test_bad_entries_are_named(entry: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_ood_spec(entry)


def test_corrupted_expansion_keeps_the_group(tmp_path: Path) -> None:
    dm = _fmnist(
        tmp_path,
        [
            {
                "name": "fc",
                "kind": "corrupted",
                "base": "fashionmnist",
                "corruption": ["gaussian_noise", "shot_noise"],
                "severity": [1, 2],
                "group": "shift",
                "missing": "skip",
            }
        ],
    )
    names = [s.name for s in dm.declared_ood_specs]
    assert names == [
        "fc/gaussian_noise/1",
        "fc/gaussian_noise/2",
        "fc/shot_noise/1",
        "fc/shot_noise/2",
    ]
    assert all((s.group, s.missing) == ("shift", "skip") for s in dm.declared_ood_specs)
    # The base set (FashionMNIST) is not under this empty root: missing, named.
    reason = missing_reason(dm.declared_ood_specs[0], tmp_path)
    assert reason == (
        f"{tmp_path / 'FashionMNIST/raw'} does not exist; expected the FashionMNIST test idx "
        "files (t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte), 10,000 28x28 images"
    )


def test_group_names_must_not_be_rows_and_only_reported_sets_take_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'kmnist' has group 'mnist', the name of a set"):
        _fmnist(tmp_path, ["mnist", {"name": "kmnist", "group": "mnist"}])
    with pytest.raises(ValueError, match="group 'fashionmnist', the name of a set"):
        _fmnist(tmp_path, [{"name": "mnist", "group": "fashionmnist"}])
    with pytest.raises(ValueError, match=r"val_ood_sets entry 'kmnist' sets \['group'\]"):
        _fmnist(tmp_path, ["mnist"], val_ood_sets=[{"name": "kmnist", "group": "far"}])
    with pytest.raises(ValueError, match=r"predict_sets entry 'kmnist' sets \['missing'\]"):
        _fmnist(tmp_path, ["mnist"], predict_sets=[{"name": "kmnist", "missing": "skip"}])


# -- the datamodule on a temporary data root ------------------------------------------------
def test_missing_sets_are_skipped_loudly_and_recorded(fmnist_root: Path) -> None:
    dm = _fmnist(
        fmnist_root,
        [
            {"name": "mnist", "group": "far", "missing": "skip"},
            {"name": "kmnist", "group": "far", "missing": "skip"},
            {"name": "svhn", "group": "far", "missing": "skip"},
            {"name": "cifar100", "group": "near", "missing": "skip"},
        ],
    )
    with pytest.warns(UserWarning) as caught:
        dm.setup()
    messages = [str(w.message) for w in caught if "SKIPPED" in str(w.message)]
    assert messages == [
        f"OOD set 'kmnist' SKIPPED (missing: skip): {fmnist_root / 'KMNIST/raw'} does not "
        "exist; expected the KMNIST test idx files (t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte), 10,000 28x28 images. Group 'far' averages 1 of its 3 sets "
        "(mnist), so its row is not the full benchmark's. Put the files there (or give the "
        "entry a path) to report it.",
        f"OOD set 'svhn' SKIPPED (missing: skip): {fmnist_root / 'svhn/test_32x32.mat'} does "
        "not exist; expected SVHN's test_32x32.mat (26,032 32x32 digits; torchvision "
        "layout). Group 'far' averages 1 of its 3 sets (mnist), so its row is not the full "
        "benchmark's. Put the files there (or give the entry a path) to report it.",
        f"OOD set 'cifar100' SKIPPED (missing: skip): {fmnist_root} does not hold the set; "
        "expected cifar-100-python/ or cifar100-jpeg-q75/test/ (CIFAR-100 test split). Group "
        "'near' averages 0 of its 1 sets (none), so its row is not the full benchmark's. Put "
        "the files there (or give the entry a path) to report it.",
    ]
    assert dm.test_set_names == ["fashionmnist", "mnist"]
    assert dm.groups() == {"mnist": "far"}
    assert list(dm.skipped_ood_sets()) == ["kmnist", "svhn", "cifar100"]
    assert dm.skipped_ood_sets()["svhn"].startswith(f"{fmnist_root / 'svhn/test_32x32.mat'}")
    loaders = dm.test_dataloader()
    assert len(loaders) == len(dm.test_set_names) == 2
    assert len(loaders[1].dataset) == 20  # MNIST test, every 500th: the set that is there
    assert [s.name for s in dm.declared_ood_specs] == ["mnist", "kmnist", "svhn", "cifar100"]


def test_names_before_setup_agree_with_the_loaders(fmnist_root: Path) -> None:
    dm = _fmnist(fmnist_root, [{"name": "kmnist", "missing": "skip"}, "mnist"])
    with pytest.warns(UserWarning, match="'kmnist' SKIPPED"):
        names = dm.test_set_names  # resolved once, before any loader exists
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not again at setup
        dm.setup()
    assert names == dm.test_set_names == ["fashionmnist", "mnist"]
    assert len(dm.test_dataloader()) == 2
    assert dm.groups() == {}


def test_missing_error_is_the_default_and_all_missing_stops(fmnist_root: Path) -> None:
    dm = _fmnist(fmnist_root, [{"name": "kmnist", "group": "far"}, "mnist"])
    with pytest.raises(FileNotFoundError, match="OOD set 'kmnist' not found"):
        dm.setup()
    dm = _fmnist(
        fmnist_root, [{"name": "kmnist", "missing": "skip"}, {"name": "svhn", "missing": "skip"}]
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"none of the ood_sets is under the data root.*"
        r"kmnist: .*KMNIST/raw does not exist.*svhn: ",
    ):
        dm.setup()
    # Without skip entries nothing is checked early: the names are the configured ones.
    assert _fmnist(fmnist_root, ["kmnist"]).test_set_names == ["fashionmnist", "kmnist"]


def test_a_failed_download_of_a_skip_set_is_left_to_the_skip(
    fmnist_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(spec: OODSpec, root: Path) -> bool:
        if spec.name != "kmnist":  # MNIST is there: nothing to fetch
            return False
        raise RuntimeError("could not download 'kmnist' (no network)")

    monkeypatch.setattr("lightning_ood.data.base.download_ood_set", no_network)
    dm = _fmnist(fmnist_root, [{"name": "kmnist", "missing": "skip"}, "mnist"], download=True)
    with pytest.warns(UserWarning, match=r"no network\) \(missing: skip: it will be left out"):
        dm.prepare_data()
    strict = _fmnist(fmnist_root, ["kmnist", "mnist"], download=True)
    with pytest.raises(RuntimeError, match="no network"):
        strict.prepare_data()


# -- the OpenOOD CIFAR-10 overlay ---------------------------------------------------------------
def test_openood_cifar10_config_groups(shared_data: Path) -> None:
    entries = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]["ood_sets"]
    specs = [parse_ood_spec(e) for e in entries]
    assert {s.name: s.group for s in specs} == {
        "cifar100": "near",
        "tinyimagenet_resize": "near",
        "mnist": "far",
        "svhn": "far",
        "textures": "far",
        "places365": "far",
    }
    assert {s.missing for s in specs} == {"skip"}
    # The shared root holds the CIFAR-10 JPEG copy (ID), MNIST and Tiny-ImageNet's test images.
    dm = CIFAR10DataModule(root=str(shared_data), ood_sets=entries, num_workers=0)
    with pytest.warns(UserWarning) as caught:
        groups = dm.groups()
    assert groups == {"tinyimagenet_resize": "near", "mnist": "far"}
    assert dm.test_set_names == ["cifar10", "tinyimagenet_resize", "mnist"]
    assert list(dm.skipped_ood_sets()) == ["cifar100", "svhn", "textures", "places365"]
    skipped = [str(w.message) for w in caught if "SKIPPED" in str(w.message)]
    assert len(skipped) == 4
    assert "Group 'far' averages 1 of its 4 sets (mnist)" in skipped[-1]
    assert f"{shared_data / 'places365'} does not exist" in skipped[-1]
