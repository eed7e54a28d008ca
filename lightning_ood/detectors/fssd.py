"""FSSD: Feature Space Singularity Distance (Huang et al., 2021, arXiv:2011.14654).

Uniform-noise inputs collapse onto one point of each layer's feature space, the *feature space
singularity* (FSS); in-distribution samples lie far from it, OOD samples close to it. Per tap
``l`` the score is ``FSSD_l(x) = ||F_l(x) - FSS_l||_2`` (the paper's definition of FSSD),
higher = more in-distribution, and the layers are combined by a logistic regression fitted on
held-out ID + OOD validation samples (the paper's ensemble; the reference's ``train_lr``).
Paper/reference differences follow ``METHODS.md`` (FSSD items 2, 4, 5).

This module also holds :class:`LayerEnsembleDetector`, the per-tap-components + logistic
combiner base shared with :mod:`lightning_ood.detectors.mahalanobis`, and the input-gradient
helpers both use for input pre-processing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, Reducer, check_range
from lightning_ood.models.base import LOGITS, BackboneOutput, OODBackbone

#: Logistic-regression combiners: "cv" = LogisticRegressionCV(random_state=42) as in the
#: reference's ``train_lr``; "lr" = a plain LogisticRegression with C = 1.
COMBINERS = ("cv", "lr")
#: Random state of the reference's LogisticRegressionCV.
COMBINER_SEED = 42
#: lbfgs iterations; above sklearn's 100 so unscaled distances converge (a converged fit is
#: the same optimum the reference reaches when it converges).
COMBINER_MAX_ITER = 1000


# -- shared helpers -------------------------------------------------------------------------
def check_choice(name: str, value: str, options: Sequence[str], owner: str) -> str:
    """Validate an option string, naming the parameter and the allowed values."""
    if value not in options:
        raise ValueError(
            f"{owner}: {name}={value!r} is not supported; choose one of {list(options)}"
        )
    return value


def check_int(name: str, value: int, low: int, owner: str) -> int:
    """Validate an integer hyperparameter ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{owner}: hyperparameter {name}={value!r} must be an integer >= {low}")
    check_range(name, value, low=low, owner=owner)
    return int(value)


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


def model_device_dtype(model: OODBackbone) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a model's first floating parameter/buffer."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


# -- the layer-ensemble base ------------------------------------------------------------------
class LayerEnsembleDetector(Detector):
    """A detector with one score per tap (:meth:`score_components`, shape (B, K)) and a
    logistic-regression combiner fitted on held-out ID (label 1) + OOD (label 0) components.

    :meth:`combine` returns the logistic decision function ``w·(c - m)/s + b`` (higher = ID),
    a monotone map of the reference's ``predict_proba[:, 1]``. With no combiner fitted it
    returns component ``default_layer`` (by default the last tap), so the detector scores
    without validation data. Everything fitted lives in ``combiner_*`` buffers.
    """

    needs_validation: ClassVar[bool] = True
    #: Input pre-processing magnitude; subclasses set it (0 = off).
    epsilon: float

    def __init__(
        self,
        taps: Sequence[str] | None,
        combiner: str,
        standardize: bool,
        default_layer: int,
        name: str | None,
    ) -> None:
        super().__init__(name)
        owner = type(self).__name__
        if taps is not None:
            if isinstance(taps, str) or not all(isinstance(t, str) for t in taps) or not taps:
                raise ValueError(
                    f"{owner}: taps must be a non-empty list of tap names or None, got {taps!r}"
                )
            if len(set(taps)) != len(taps):
                raise ValueError(f"{owner}: taps {list(taps)} name a tap twice")
        self._taps_arg = None if taps is None else list(taps)
        self.combiner = check_choice("combiner", combiner, COMBINERS, owner)
        self.standardize = bool(standardize)
        if isinstance(default_layer, bool) or not isinstance(default_layer, int | np.integer):
            raise ValueError(f"{owner}: default_layer={default_layer!r} must be an integer index")
        self.default_layer = int(default_layer)
        f64 = torch.float64
        self.register_buffer("combiner_coef", torch.zeros(0, dtype=f64))
        self.register_buffer("combiner_intercept", torch.zeros((), dtype=f64))
        self.register_buffer("combiner_mean", torch.zeros(0, dtype=f64))
        self.register_buffer("combiner_scale", torch.ones(0, dtype=f64))
        self.register_buffer("combiner_fitted", torch.tensor(False))

    @property
    def needs_input_grad(self) -> bool:  # type: ignore[override]
        """Only input pre-processing (epsilon > 0) needs the model and inputs at score time."""
        return self.epsilon > 0

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["taps"] = None if self._taps_arg is None else list(self._taps_arg)
        return cfg

    @property
    def num_components(self) -> int | None:
        """K, the number of per-tap components, once known."""
        return len(self.taps) or None

    # -- combiner -------------------------------------------------------------------------
    def _components_2d(self, name: str, c: Tensor) -> Tensor:
        if c.ndim != 2 or c.shape[0] == 0:
            raise ValueError(
                f"{self.name}: {name} must have shape (N > 0, K), got {tuple(c.shape)}"
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

    def combine(self, components: Tensor) -> Tensor:
        """Decision function of the fitted combiner, or component ``default_layer``."""
        c = self._components_2d("components", components)
        if self.flag("combiner_fitted"):
            if c.shape[1] != self.combiner_coef.numel():
                raise ValueError(
                    f"{self.name}: the combiner was fitted on {self.combiner_coef.numel()} "
                    f"components, got {c.shape[1]}"
                )
            dev = c.device
            z = (c.double() - self.combiner_mean.to(dev)) / self.combiner_scale.to(dev)
            z = z @ self.combiner_coef.to(dev) + self.combiner_intercept.to(dev)
            return z.to(c.dtype if c.is_floating_point() else torch.float32)
        k = c.shape[1]
        if not -k <= self.default_layer < k:
            raise ValueError(
                f"{self.name}: default_layer={self.default_layer} is out of range for K={k}"
            )
        return c[:, self.default_layer]


def _cv_quiet_kwargs() -> dict[str, Any]:
    """Pin the reference's LogisticRegressionCV semantics (L2, accuracy-scored CV) where a
    newer scikit-learn warns that those defaults will change; older versions need nothing."""
    from sklearn.linear_model import LogisticRegressionCV

    params = inspect.signature(LogisticRegressionCV).parameters
    pinned = {"l1_ratios": (0.0,), "scoring": "accuracy", "use_legacy_attributes": False}
    return {k: v for k, v in pinned.items() if k in params and params[k].default == "warn"}


# -- FSSD -------------------------------------------------------------------------------------
NOISES = ("reference", "uniform")
DIRECTIONS = ("reference", "paper")
GRAD_NORMS = ("batch", "sample")


class FSSD(LayerEnsembleDetector):
    """Feature Space Singularity Distance with a logistic-regression layer ensemble.

    Fitting needs no training data: :meth:`finalize` feeds ``n_noise`` noise inputs through
    the model and stores each tap's mean feature, flattened in full (no pooling), in one
    concatenated buffer ``fss`` with per-tap sizes ``fss_sizes``; :meth:`update` is a no-op.

    Args:
        taps: tap names, one component each, in this order. ``None`` = every tap of
            ``model.tap_layers`` then ``"logits"``, resolved at :meth:`finalize` and saved in
            the state dict. The reference uses ReLU(conv1), ReLU(conv2), ReLU(fc1), logits for
            LeNet and stem, layer1..4 for ResNet-34: name them explicitly in configs.
        noise: ``"reference"``: integers v ~ U{0..254}, fed as (v - 127.5)/255 (values in
            [-0.5, 0.498]) without the dataset normalisation, as the reference code;
            ``"uniform"``: x ~ U[0, 1), as the paper. Token models always get token ids drawn
            uniformly from [0, vocab_size), whatever ``noise`` says.
        n_noise: number of noise inputs N (paper/reference: 100).
        noise_seed: seed of the CPU generator that draws the noise (all DDP ranks agree).
        epsilon: input pre-processing magnitude; 0 disables it. Each tap gets its own
            perturbed input (as the reference), costing K extra forward+backward passes and
            K forward passes per batch.
        direction: ``"reference"``: x̃ = x + ε·ĝ/std with ĝ the standardised gradient of
            -mean(FSSD_l), i.e. a step that *lowers* FSSD (reference code); ``"paper"``:
            x̃ = x + ε·sign(∇ₓ FSSD_l)/std (sign 0 where the gradient is 0), raising FSSD
            (the paper's pre-processing).
        grad_norm: standardisation of the reference direction: ``"batch"`` = (g - mean)/std
            over the whole batch tensor (reference code, makes a score depend on its
            batch-mates); ``"sample"`` = over each sample's own gradient.
        input_std: per-channel std of the input ``Normalize`` the step is divided by, as the
            reference does (e.g. ``[0.353]`` for FashionMNIST); ``None`` = no division.
        batch_size: chunk size of the noise pass.
        combiner: ``"cv"`` (reference: LogisticRegressionCV, random_state 42) or ``"lr"``.
        standardize: z-score the components before the logistic regression (reference: no).
        default_layer: component :meth:`combine` returns while no combiner is fitted.
        name: instance name (default ``"fssd"``).
    """

    kind: ClassVar[str] = "fssd"
    requires_fit: ClassVar[bool] = True
    #: FSSD needs the model (a noise pass), not the training set.
    uses_training_data: ClassVar[bool] = False

    def __init__(
        self,
        taps: list[str] | None = None,
        noise: str = "reference",
        n_noise: int = 100,
        noise_seed: int = 0,
        epsilon: float = 0.0,
        direction: str = "reference",
        grad_norm: str = "batch",
        input_std: float | list[float] | None = None,
        batch_size: int = 100,
        combiner: str = "cv",
        standardize: bool = False,
        default_layer: int = -1,
        name: str | None = None,
    ) -> None:
        super().__init__(taps, combiner, standardize, default_layer, name)
        owner = "FSSD"
        self.noise = check_choice("noise", noise, NOISES, owner)
        self.n_noise = check_int("n_noise", n_noise, 1, owner)
        self.noise_seed = check_int("noise_seed", noise_seed, 0, owner)
        self.epsilon = check_range("epsilon", epsilon, low=0.0, owner=owner)
        self.direction = check_choice("direction", direction, DIRECTIONS, owner)
        self.grad_norm = check_choice("grad_norm", grad_norm, GRAD_NORMS, owner)
        self.input_std = check_input_std(input_std, owner)
        self.batch_size = check_int("batch_size", batch_size, 1, owner)
        self._resolved_taps: list[str] = []
        self.register_buffer("fss", torch.zeros(0))
        self.register_buffer("fss_sizes", torch.zeros(0, dtype=torch.long))

    # -- taps -----------------------------------------------------------------------------
    @property
    def taps(self) -> tuple[str, ...]:
        """The configured taps, or the resolved ones once fitted (empty before if ``None``)."""
        if self._resolved_taps:
            return tuple(self._resolved_taps)
        return tuple(self._taps_arg or ())

    def resolve_taps(self, model: OODBackbone) -> list[str]:
        """``taps``, or every ``model.tap_layers`` entry then ``"logits"`` when ``None``."""
        if self._taps_arg is not None:
            return list(self._taps_arg)
        return [*model.tap_layers, LOGITS]

    def get_extra_state(self) -> dict[str, Any]:
        return {"taps": list(self._resolved_taps)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        taps = list(state.get("taps", []))
        if taps and self._taps_arg is not None and taps != self._taps_arg:
            raise ValueError(
                f"{self.name}: the stored FSSD state was fitted on taps {taps}, but this "
                f"detector is configured with taps {self._taps_arg}; refit or fix the config"
            )
        self._resolved_taps = taps

    # -- fitting --------------------------------------------------------------------------
    def make_noise(self, model: OODBackbone) -> Tensor:
        """The ``n_noise`` noise inputs (on the CPU), drawn from a generator seeded
        ``noise_seed``: all at once, so the chunking of the pass does not change them."""
        g = torch.Generator().manual_seed(self.noise_seed)
        shape = (self.n_noise, *model.input_shape)
        if model.input_kind == "tokens":
            if model.vocab_size < 1:
                raise ValueError(
                    f"{type(model).__name__} has token inputs but vocab_size={model.vocab_size}"
                )
            return torch.randint(0, model.vocab_size, shape, generator=g)
        if self.noise == "reference":
            v = torch.randint(0, 255, shape, generator=g).to(torch.float32)
            return (v - 127.5) / 255
        return torch.rand(shape, generator=g)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Compute FSS_l = mean over the noise of F_l(noise), flattened (the paper's FSS).

        Runs the model in eval mode (restoring its mode). Every rank draws the same noise, so
        nothing is reduced across DDP ranks.
        """
        taps = self.resolve_taps(model)
        device, dtype = model_device_dtype(model)
        noise = self.make_noise(model)
        sums: list[Tensor] = [torch.zeros(0)] * len(taps)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for chunk in noise.split(self.batch_size):
                    chunk = chunk.to(device, dtype if chunk.is_floating_point() else chunk.dtype)
                    out = model.extract(chunk, taps=taps)
                    for i, t in enumerate(taps):
                        s = out.tap(t).flatten(1).double().sum(0)
                        sums[i] = s if sums[i].numel() == 0 else sums[i] + s
        finally:
            model.train(was_training)
        dev = self.fitted.device
        self.fss = torch.cat([s / self.n_noise for s in sums]).to(dev, torch.float32)
        self.fss_sizes = torch.tensor([s.numel() for s in sums], dtype=torch.long, device=dev)
        self._resolved_taps = taps
        self.fitted.fill_(True)

    def centres(self) -> list[Tensor]:
        """FSS_l per tap, flattened."""
        return list(self.fss.split(self.int_list("fss_sizes")))

    # -- scoring --------------------------------------------------------------------------
    def _distance(self, feat: Tensor, centre: Tensor, tap: str) -> Tensor:
        f = feat.flatten(1).to(torch.float32)
        if f.shape[1] != centre.numel():
            raise ValueError(
                f"{self.name}: tap {tap!r} gives {f.shape[1]} features per sample but its FSS "
                f"has {centre.numel()}; the detector was fitted on another backbone or input "
                "size, refit it"
            )
        return torch.linalg.vector_norm(f - centre, dim=1)

    def _step(self, grad: Tensor) -> Tensor:
        """The input step per unit ε (before the ``input_std`` division)."""
        if self.direction == "paper":
            return torch.sign(grad)
        s = -grad  # ∇ of -FSSD: the reference's loss = -mean_b FSSD (the 1/B cancels below)
        dims = tuple(range(1, s.ndim)) if self.grad_norm == "sample" else tuple(range(s.ndim))
        mean = s.mean(dim=dims, keepdim=True)
        std = s.std(dim=dims, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        return (s - mean) / std

    def perturb(self, model: OODBackbone, x: Tensor, tap: str, centre: Tensor) -> Tensor:
        """The pre-processed input x̃ for tap ``tap`` (see ``direction``)."""
        grad = input_gradient(model, x, tap, lambda f: self._distance(f, centre, tap))
        return (x + self.epsilon * divide_by_input_std(self._step(grad), self.input_std)).detach()

    def score_components(
        self,
        out: BackboneOutput,
        model: OODBackbone | None = None,
        inputs: Tensor | None = None,
    ) -> Tensor:
        """FSSD_l for every tap, shape (B, K) in float32; higher = more in-distribution."""
        self.check_fitted()
        taps, centres = self.taps, self.centres()
        if self.epsilon == 0:
            cols = [self._distance(out.tap(t), c, t) for t, c in zip(taps, centres, strict=True)]
            return torch.stack(cols, dim=1)
        x = grad_ready_inputs(model, inputs, self.name)
        assert model is not None
        cols = []
        for t, c in zip(taps, centres, strict=True):
            x_t = self.perturb(model, x, t, c)
            with torch.no_grad():
                cols.append(self._distance(model.extract(x_t, taps=(t,)).tap(t), c, t))
        return torch.stack(cols, dim=1)


__all__ = ["FSSD", "LayerEnsembleDetector"]
