"""RankFeat (Song, Sebe & Wang, NeurIPS 2022, "RankFeat: Rank-1 Feature Removal for
Out-of-distribution Detection"): remove the rank-1 component of a high-level feature map,
then score the energy of the classifier applied to the result (docs/methods.md#rankfeat)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import OptInput, OptModel, Reducer
from lightning_ood.detectors.energy import energy_score
from lightning_ood.detectors.fssd import model_device_dtype
from lightning_ood.detectors.hparams import HParam, choice, integer, positive
from lightning_ood.detectors.layer_ensemble import tap_list
from lightning_ood.detectors.linear_head import LinearHeadDetector
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

METHODS = ("svd", "power")


def rank1(x: Tensor, method: str = "svd", iterations: int = 20) -> Tensor:
    """The rank-1 component s₁u₁v₁ᵀ of each sample's (C, S) matrix ``x`` (B, C, S).

    ``"svd"``: exact, from ``torch.linalg.svd``. ``"power"``: ``iterations`` rounds of power
    iteration (the authors' commented-out acceleration, OpenOOD's ``accelerate``) from
    v = 1/√S: post-ReLU maps are non-negative, so their leading right singular vector is too
    (Perron-Frobenius) and the start is never orthogonal to it; a fixed start keeps the
    result deterministic.
    """
    if method == "svd":
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])
    v = x.new_full((x.shape[0], x.shape[2], 1), 1.0 / math.sqrt(max(x.shape[2], 1)))
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(iterations):
        u = x @ v
        u = u / u.norm(dim=1, keepdim=True).clamp_min(tiny)
        v = x.transpose(1, 2) @ u
        v = v / v.norm(dim=1, keepdim=True).clamp_min(tiny)
    sigma = u.transpose(1, 2) @ x @ v  # (B, 1, 1)
    return sigma * (u @ v.transpose(1, 2))


def remove_rank1(f: Tensor, method: str = "svd", iterations: int = 20) -> Tensor:
    """``f`` (B, C, *spatial) minus its per-sample rank-1 component (RankFeat eq. (2)†)."""
    x = f.flatten(2)
    return (x - rank1(x, method, iterations)).reshape(f.shape)


class _RankFeatTaps(LinearHeadDetector):
    """RankFeat's ``taps`` declaration, stored as ``_taps_arg`` (its ``taps`` property gives
    the resolved taps, as the layer ensembles')."""

    hparam_attrs: ClassVar[Mapping[str, str]] = MappingProxyType({"taps": "_taps_arg"})
    taps = HParam(
        None,
        tap_list,
        doc="feature-map taps to remove the rank-1 component from (logits averaged); None: "
        "the tap that pools to the penultimate features (the last block)",
    )


@register_detector
class RankFeat(_RankFeatTaps):
    """Energy of W·pool(X - s₁u₁v₁ᵀ) + b, X the (C, HW) feature map of a high-level block.

    Each tap in ``taps`` gives one set of logits: a tap whose global average pool *is* the
    penultimate feature (ResNet's ``layer4``) is rescored from the extracted tap with the
    copied head, no extra forward; any other tap (ResNet's ``layer3``, a LeNet conv map) is
    replaced by its rank-1-removed version through a forward hook and the network rerun from
    the input (one extra forward per such tap, so the score needs the model and the inputs).
    Several taps: the logits are averaged before the energy (the authors' Block 3 + Block 4
    fusion). ``taps`` None: the last tap that pools to the features, else the last
    feature-map tap (rerun).
    """

    kind = "rankfeat"
    uses_training_data = False
    method = HParam(
        "svd", choice(*METHODS), stage="score", doc="exact svd, or power iteration (accelerated)"
    )
    iterations = HParam(20, integer(1), stage="score", doc="power iterations (method: power)")
    temperature = HParam(1.0, positive(), stage="score", doc="energy temperature T > 0")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resolved: list[str] = []
        self._pooled: list[bool] = []

    # -- taps -----------------------------------------------------------------------------
    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(self._resolved or self._taps_arg or ())

    def tap_names(self, backbone: OODBackbone) -> tuple[str, ...]:
        """The pooled taps (rescored from the extracted map); rerun taps need no extraction."""
        if not self._resolved:
            self._resolve(backbone)
        return tuple(t for t, p in zip(self._resolved, self._pooled, strict=True) if p)

    @property
    def needs_inputs(self) -> bool:  # type: ignore[override]
        """A tap that does not pool to the features is rescored by rerunning the network."""
        if self._resolved:
            return not all(self._pooled)
        return self._taps_arg is not None

    @property
    def exportable(self) -> bool:  # type: ignore[override]
        """Reruns through a forward hook are not traced; pooled taps export."""
        return not self.needs_inputs

    def get_extra_state(self) -> dict[str, Any]:
        return {"taps": list(self._resolved), "pooled": list(self._pooled)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        taps, pooled = list(state.get("taps", [])), list(state.get("pooled", []))
        if taps and self._taps_arg is not None and taps != self._taps_arg:
            raise ValueError(
                f"{self.name}: the stored RankFeat state was resolved for taps {taps}, but "
                f"this detector is configured with taps {self._taps_arg}; refit or fix the config"
            )
        self._resolved, self._pooled = taps, pooled

    def _resolve(self, model: OODBackbone) -> None:
        """Find which taps pool to the features, with one probe forward of two example
        inputs (and pick the default tap when ``taps`` is None)."""
        owner = f"{self.name} (rankfeat)"
        candidates = list(self._taps_arg) if self._taps_arg is not None else list(model.tap_layers)
        unknown = [t for t in candidates if t not in model.tap_layers]
        if unknown:
            raise ValueError(
                f"{owner}: {type(model).__name__} has no feature-map tap(s) {unknown}; its taps "
                f"are {list(model.tap_layers)}"
            )
        device, dtype = model_device_dtype(model)
        try:
            x = model.example_input(2).to(device)
        except ValueError as err:
            raise ValueError(f"{owner}: cannot probe the backbone's taps: {err}") from err
        x = x.to(dtype) if x.is_floating_point() else x
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.extract(x, taps=candidates)
        finally:
            model.train(was_training)
        maps = [t for t in candidates if out.tap(t).ndim >= 3]
        pooled = {
            t
            for t in maps
            if out.tap(t).shape[1] == out.features.shape[1]
            and torch.allclose(
                out.tap(t).flatten(2).mean(dim=2), out.features, rtol=1e-4, atol=1e-6
            )
        }
        if self._taps_arg is not None:
            flat = [t for t in candidates if t not in maps]
            if flat:
                raise ValueError(
                    f"{owner}: taps {flat} are not feature maps (B, C, H, W); a (B, C) tap is "
                    "its own rank-1 component, removing it leaves nothing"
                )
            chosen = list(self._taps_arg)
        elif not maps:
            raise ValueError(
                f"{owner}: {type(model).__name__} has no feature-map tap (B, C, H, W) among "
                f"{list(model.tap_layers)}; RankFeat needs one (name it in `taps`)"
            )
        else:
            last_pooled = [t for t in maps if t in pooled]
            chosen = [last_pooled[-1] if last_pooled else maps[-1]]
        self._resolved = chosen
        self._pooled = [t in pooled for t in chosen]

    # -- fitting --------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the fit, including the taps resolved against the previous backbone."""
        self._resolved, self._pooled = [], []
        self.fitted.fill_(False)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Copy the head and resolve the taps (no training data)."""
        self._copy_head(model)
        self._resolve(model)
        self.fitted.fill_(True)

    # -- scoring --------------------------------------------------------------------------
    def _rerun(self, model: OODBackbone, inputs: Tensor, tap: str) -> Tensor:
        """Penultimate features of ``inputs`` with ``tap``'s output rank-1-removed."""

        def hook(_m: nn.Module, _i: object, out: Tensor) -> Tensor:
            return remove_rank1(out, self.method, self.iterations)

        handle = model.get_submodule(model.tap_layers[tap]).register_forward_hook(hook)
        try:
            with torch.no_grad():
                return model.forward_features(inputs)
        finally:
            handle.remove()

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        """T·logsumexp(mean over taps of the logits of the rank-1-removed maps / T)."""
        self.check_fitted()
        logits = []
        for tap, pooled in zip(self._resolved, self._pooled, strict=True):
            if pooled:
                f = remove_rank1(out.tap(tap), self.method, self.iterations)
                h = f.flatten(2).mean(dim=2)
            else:
                if model is None or inputs is None:
                    raise ValueError(
                        f"{self.name} (rankfeat): tap {tap!r} does not pool to the features, so "
                        "its score reruns the network: pass `model` and `inputs` (score on "
                        "images, not cached features)"
                    )
                h = self._rerun(model, inputs, tap)
            h = self._check_features(h)
            logits.append(h @ self.weight.T + self.bias)
        fused = logits[0] if len(logits) == 1 else torch.stack(logits).mean(dim=0)
        return energy_score(fused, self.temperature)


__all__ = ["METHODS", "RankFeat", "rank1", "remove_rank1"]
