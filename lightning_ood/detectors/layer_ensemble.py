"""Layer ensembles: one score per tap, combined by a logistic regression fitted on held-out
ID + OOD validation samples (FSSD's ensemble, the reference's ``train_lr``; Lee et al.'s
"feature ensemble" for Mahalanobis), and the input pre-processing helpers both use.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, OptInput, OptModel, check_range, truthy
from lightning_ood.detectors.hparams import HParam, choice, in_range
from lightning_ood.models.base import BackboneOutput, OODBackbone

#: Logistic-regression combiners: "cv" = LogisticRegressionCV(random_state=42) as in the
#: reference's ``train_lr``; "lr" = a plain LogisticRegression with C = 1.
COMBINERS = ("cv", "lr")
#: Random state of the reference's LogisticRegressionCV.
COMBINER_SEED = 42
#: lbfgs iterations; above sklearn's 100 so unscaled distances converge (a converged fit is
#: the same optimum the reference reaches when it converges).
COMBINER_MAX_ITER = 1000


# -- input pre-processing helpers -------------------------------------------------------------
def check_input_std(
    input_std: float | Sequence[float] | None, owner: str
) -> float | list[float] | None:
    """Validate ``input_std`` (a scalar or one positive value per input channel)."""
    if input_std is None:
        return None
    if isinstance(input_std, int | float):
        return check_range("input_std", input_std, low=0.0, low_open=True, owner=owner)
    values = [check_range("input_std", v, low=0.0, low_open=True, owner=owner) for v in input_std]
    if not values:
        raise ValueError(f"{owner}: input_std must be a positive number or a non-empty list")
    return values


def input_stds(name: str, value: Any, owner: str) -> float | list[float] | None:
    """:func:`check_input_std` as an HParam check."""
    return check_input_std(value, owner)


def tap_list(name: str, value: Any, owner: str) -> list[str] | None:
    """None (the detector's default taps) or a non-empty list of distinct tap names."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(t, str) for t in value) or not value:
        raise ValueError(
            f"{owner}: {name} must be a non-empty list of tap names or None, got {value!r}"
        )
    if len(set(value)) != len(value):
        raise ValueError(f"{owner}: {name} {list(value)} name a tap twice")
    return list(value)


def layer_index(name: str, value: Any, owner: str) -> int:
    """An integer component index (negative from the end), bools refused."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{owner}: {name}={value!r} must be an integer index")
    return int(value)


def divide_by_input_std(step: Tensor, input_std: float | list[float] | None) -> Tensor:
    """Divide an input-space step by the normalisation std per channel (dim 1).

    The references perturb the *normalised* tensor but size the step in pixel units, hence
    the division by the dataset's ``Normalize`` std (as in ODIN's reference code).
    """
    if input_std is None:
        return step
    std = torch.as_tensor(input_std, dtype=step.dtype, device=step.device).flatten()
    if std.numel() == 1:
        return step / std
    if step.ndim < 2 or step.shape[1] != std.numel():
        raise ValueError(
            f"input_std has {std.numel()} values but the inputs have shape {tuple(step.shape)} "
            "(channels in dim 1); give one value per channel or a single number"
        )
    return step / std.view(1, -1, *([1] * (step.ndim - 2)))


def grad_ready_inputs(model: OODBackbone | None, inputs: Tensor | None, owner: str) -> Tensor:
    """Check that input pre-processing can run and return a detached copy of the inputs."""
    if model is None or inputs is None:
        raise ValueError(
            f"{owner}: epsilon > 0 perturbs the inputs, so score/score_components need "
            "`model` and `inputs`; pass them or set epsilon=0"
        )
    if model.input_kind != "image" or not inputs.is_floating_point():
        raise ValueError(
            f"{owner}: input pre-processing (epsilon > 0) needs float image inputs, but "
            f"{type(model).__name__} takes {model.input_kind!r} inputs of dtype {inputs.dtype}; "
            "set epsilon=0"
        )
    with torch.inference_mode(False):
        return inputs.detach().clone()  # a normal tensor even if built under inference mode


def input_gradient(
    model: OODBackbone, x: Tensor, tap: str, objective: Callable[[Tensor], Tensor]
) -> Tensor:
    """``d/dx sum_b objective(tap(x))_b`` with respect to the inputs only.

    ``torch.autograd.grad`` with ``inputs=x`` leaves no ``.grad`` on the parameters; per-sample
    objectives are independent in an eval-mode network, so one backward gives every
    sample's own gradient.
    """
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        feat = model.extract(xg, taps=(tap,)).tap(tap)
        (grad,) = torch.autograd.grad(objective(feat).sum(), xg)
    return grad


# -- the layer-ensemble base ------------------------------------------------------------------
def _empty_combiner(device: torch.device | None = None) -> dict[str, Tensor]:
    """The combiner buffers of a detector with no combiner fitted, in registration order."""
    f64 = torch.float64
    return {
        "combiner_coef": torch.zeros(0, dtype=f64, device=device),
        "combiner_intercept": torch.zeros((), dtype=f64, device=device),
        "combiner_mean": torch.zeros(0, dtype=f64, device=device),
        "combiner_scale": torch.ones(0, dtype=f64, device=device),
        "combiner_fitted": torch.tensor(False, device=device),
    }


class LayerEnsembleDetector(Detector):
    """A detector with one score per tap (:meth:`score_components`, shape (B, K)) and a
    logistic-regression combiner fitted on held-out ID (label 1) + OOD (label 0) components.

    :meth:`combine` returns the logistic decision function ``w·(c - m)/s + b`` (higher = ID),
    a monotone map of the reference's ``predict_proba[:, 1]``. With no combiner fitted it
    returns component ``default_layer`` (by default the last tap), so the detector scores
    without validation data. Everything fitted lives in ``combiner_*`` buffers, read and
    restored with :meth:`combiner_state` / :meth:`load_combiner_state`.

    Subclasses implement :meth:`component` (one tap's score from its features) and
    :meth:`perturb` (that tap's pre-processed input, used when ``epsilon > 0``), and a ``taps``
    property (the configured hyperparameter is ``_taps_arg``). The combiner's
    hyperparameters enter its fitted buffers (stage ``"finalize"``); the input
    pre-processing and ``default_layer`` act at scoring time only.
    """

    has_combiner: ClassVar[bool] = True
    #: The configured ``taps`` (None: the detector's default) are kept as ``_taps_arg``; the
    #: ``taps`` property of each subclass gives the taps actually read.
    hparam_attrs: ClassVar[Mapping[str, str]] = MappingProxyType({"taps": "_taps_arg"})
    taps = HParam(
        None,
        tap_list,
        doc="tap names, one component each; None: the detector's default (Mahalanobis: "
        '["features"]; FSSD: every tap_layers entry, then "logits")',
    )
    epsilon = HParam(
        0.0, in_range(0.0), stage="score", doc="input pre-processing magnitude (0 = off)"
    )
    input_std = HParam(
        None,
        input_stds,
        stage="score",
        doc="per-channel Normalize std the pre-processing step is divided by (reference); "
        "None = no division",
    )
    combiner = HParam(
        "cv",
        choice(*COMBINERS),
        stage="finalize",
        doc='"cv" (LogisticRegressionCV, random_state 42, as the reference) or "lr"',
    )
    standardize = HParam(
        False,
        truthy,
        stage="finalize",
        doc="z-score the components before the logistic regression (reference: no)",
    )
    default_layer = HParam(
        -1,
        layer_index,
        stage="score",
        doc="component combine() returns while no combiner is fitted (the last tap by default)",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for key, value in _empty_combiner().items():
            self.register_buffer(key, value)

    @property
    def needs_input_grad(self) -> bool:  # type: ignore[override]
        """Only input pre-processing (epsilon > 0) needs the model and inputs at score time."""
        return self.epsilon > 0

    @property
    def min_per_set_holdout(self) -> int:
        """Held-out samples per set the combiner needs: ``LogisticRegressionCV``'s 5-fold
        stratified split needs 5 of each class; a plain logistic regression 1."""
        return 5 if self.combiner == "cv" else 1

    @property
    def num_components(self) -> int | None:
        """K, the number of per-tap components, once known."""
        return len(self.taps) or None

    # -- components -----------------------------------------------------------------------
    def component(self, feat: Tensor, i: int) -> Tensor:
        """Score of component ``i`` (higher = more ID) from the features of tap ``i``, (B,)."""
        raise NotImplementedError

    def perturb(self, model: OODBackbone, x: Tensor, i: int) -> Tensor:
        """The pre-processed input for component ``i`` (only called with ``epsilon > 0``)."""
        raise NotImplementedError

    def score_components(
        self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None
    ) -> Tensor:
        """Every component, shape (B, K) in float32. With ``epsilon > 0`` each tap gets its
        own perturbed input (as the references): K extra forward+backward and K forward
        passes per batch."""
        self.check_fitted()
        taps = self.taps
        if self.epsilon == 0:
            cols = [self.component(out.tap(t), i) for i, t in enumerate(taps)]
        else:
            x = grad_ready_inputs(model, inputs, self.name)
            assert model is not None
            cols = []
            for i, t in enumerate(taps):
                x_t = self.perturb(model, x, i)
                with torch.no_grad():
                    cols.append(self.component(model.extract(x_t, taps=(t,)).tap(t), i))
        return torch.stack(cols, dim=1).to(torch.float32)

    # -- combiner -------------------------------------------------------------------------
    def _components_2d(self, name: str, c: Tensor, allow_empty: bool = False) -> Tensor:
        if c.ndim != 2 or (c.shape[0] == 0 and not allow_empty):
            least = "N >= 0" if allow_empty else "N > 0"
            raise ValueError(
                f"{self.name}: {name} must have shape ({least}, K), got {tuple(c.shape)}"
            )
        k = self.num_components
        if k is not None and c.shape[1] != k:
            raise ValueError(
                f"{self.name}: {name} has {c.shape[1]} components per sample, but the detector "
                f"has K={k} taps {list(self.taps)}"
            )
        return c

    def fit_combiner(self, components_id: Tensor, components_ood: Tensor) -> None:
        """Fit the logistic regression (ID = 1, OOD = 0) on validation components (N, K).

        ``combiner="cv"`` is the reference's ``LogisticRegressionCV(random_state=42)`` on the
        raw components (``standardize=False``); ``standardize=True`` z-scores each component
        first with the validation mean/std (a StandardScaler), stored in buffers.
        """
        from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

        cid = self._components_2d("components_id", components_id)
        cood = self._components_2d("components_ood", components_ood)
        if cid.shape[1] != cood.shape[1]:
            raise ValueError(
                f"{self.name}: components_id has {cid.shape[1]} columns, components_ood "
                f"{cood.shape[1]}; they must match"
            )
        x = np.concatenate(
            [cid.detach().cpu().double().numpy(), cood.detach().cpu().double().numpy()]
        )
        if not np.isfinite(x).all():
            raise ValueError(f"{self.name}: the validation components contain NaN/inf values")
        y = np.concatenate([np.ones(len(cid), dtype=np.int64), np.zeros(len(cood), dtype=np.int64)])
        if self.standardize:
            mean, scale = x.mean(0), x.std(0)
            scale[scale == 0] = 1.0
        else:
            mean, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
        xs = (x - mean) / scale
        if self.combiner == "cv":
            clf: Any = LogisticRegressionCV(
                random_state=COMBINER_SEED, max_iter=COMBINER_MAX_ITER, **_cv_quiet_kwargs()
            )
        else:
            clf = LogisticRegression(C=1.0, max_iter=COMBINER_MAX_ITER)
        clf.fit(xs, y)
        dev = self.combiner_fitted.device
        f64 = torch.float64
        self.combiner_coef = torch.as_tensor(clf.coef_[0], dtype=f64, device=dev).clone()
        self.combiner_intercept = torch.tensor(float(clf.intercept_[0]), dtype=f64, device=dev)
        self.combiner_mean = torch.as_tensor(mean, dtype=f64, device=dev).clone()
        self.combiner_scale = torch.as_tensor(scale, dtype=f64, device=dev).clone()
        self.combiner_fitted.fill_(True)

    def fit_id_only_combiner(self, components_id: Tensor) -> None:
        """The OOD-free combiner a detector ships when no validation OOD data exists: each
        component z-scored with the ID validation mean and std, then averaged (coefficients
        1/K, intercept 0), i.e. ``mean_k (c_k - mu_k) / sigma_k``.

        Every component is oriented "higher = more ID", so the average rewards a sample that is
        typical at every tap and needs no outlier to be fitted; z-scoring puts taps whose
        scores live on very different scales (FSSD's early vs late layers) on one footing.
        ``docs/methods.md#layer-ensembles-what-ships`` compares it with the alternatives.
        """
        cid = self._components_2d("components_id", components_id)
        x = cid.detach().cpu().double()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.name}: the ID validation components contain NaN/inf values")
        if x.shape[0] < 2:
            raise ValueError(
                f"{self.name}: an ID-only combiner needs at least 2 ID validation samples to "
                f"estimate each component's spread, got {x.shape[0]}"
            )
        mean, scale = x.mean(0), x.std(0, unbiased=False)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        k = x.shape[1]
        dev = self.combiner_fitted.device
        f64 = torch.float64
        self.combiner_coef = torch.full((k,), 1.0 / k, dtype=f64, device=dev)
        self.combiner_intercept = torch.zeros((), dtype=f64, device=dev)
        self.combiner_mean = mean.to(device=dev, dtype=f64).clone()
        self.combiner_scale = scale.to(device=dev, dtype=f64).clone()
        self.combiner_fitted.fill_(True)

    def combine(self, components: Tensor) -> Tensor:
        """Decision function of the fitted combiner, or component ``default_layer``; an empty
        batch gives an empty score vector."""
        c = self._components_2d("components", components, allow_empty=True)
        if self.flag("combiner_fitted"):
            if c.shape[1] != self.combiner_coef.numel():
                raise ValueError(
                    f"{self.name}: the combiner was fitted on {self.combiner_coef.numel()} "
                    f"components, got {c.shape[1]}"
                )
            dev = c.device
            # float64 whatever dtype a .to() gave the buffers: the weights were fitted so
            f64 = torch.float64
            z = (c.double() - self.combiner_mean.to(dev, f64)) / self.combiner_scale.to(dev, f64)
            z = z @ self.combiner_coef.to(dev, f64) + self.combiner_intercept.to(dev, f64)
            return z.to(c.dtype if c.is_floating_point() else torch.float32)
        k = c.shape[1]
        if not -k <= self.default_layer < k:
            raise ValueError(
                f"{self.name}: default_layer={self.default_layer} is out of range for K={k}"
            )
        return c[:, self.default_layer]

    # -- state ----------------------------------------------------------------------------
    def combiner_state(self) -> dict[str, Tensor]:
        """Clones of the ``combiner_*`` buffers (``combiner_fitted`` included), by name."""
        return {key: getattr(self, key).clone() for key in _empty_combiner()}

    def load_combiner_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore exactly a :meth:`combiner_state` dict (every ``combiner_*`` buffer)."""
        expected = list(_empty_combiner())
        if set(state) != set(expected):
            raise ValueError(
                f"{self.name}: a combiner state holds the buffers {expected}, got {sorted(state)}"
            )
        dev = self.combiner_fitted.device
        for key, old in _empty_combiner().items():
            setattr(self, key, state[key].detach().to(device=dev, dtype=old.dtype).clone())

    def mark_unfitted(self) -> None:
        """Forget the fit, the decision threshold and the combiner."""
        super().mark_unfitted()
        for key, value in _empty_combiner(self.combiner_fitted.device).items():
            setattr(self, key, value)


def _cv_quiet_kwargs() -> dict[str, Any]:
    """Pin the reference's LogisticRegressionCV semantics (L2, accuracy-scored CV) where a
    newer scikit-learn warns that those defaults will change; older versions need nothing."""
    from sklearn.linear_model import LogisticRegressionCV

    params = inspect.signature(LogisticRegressionCV).parameters
    pinned = {"l1_ratios": (0.0,), "scoring": "accuracy", "use_legacy_attributes": False}
    return {k: v for k, v in pinned.items() if k in params and params[k].default == "warn"}


__all__ = [
    "COMBINERS",
    "LayerEnsembleDetector",
    "check_input_std",
    "divide_by_input_std",
    "grad_ready_inputs",
    "input_gradient",
    "input_stds",
    "layer_index",
    "tap_list",
]
