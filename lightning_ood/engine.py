"""The one engine: eval pass, detector fitting, batch scoring and calibration. Pure torch.

Every consumer (the Lightning callback, ``task.predict_step``, the hand-off predictor, the
feature cache, the grid, the benchmarks and the tests) goes through these functions; nothing
else loops over detectors to fit or score them.

* :func:`eval_pass` — one eval-mode, no-grad forward per batch of a loader, serving the union
  of every detector's taps (``OODBackbone.extract``), so N detectors cost one pass.
* :func:`fit_detectors` — ``reset`` → ``update`` per batch (only detectors that read training
  data) → the extra passes a detector asks for (``next_pass``: an exact percentile beyond
  memory) → ``finalize`` with a :class:`~lightning_ood.detectors.base.Reducer` (DDP sums).
  The batches come from :func:`eval_pass` or from cached features; both give the same state.
* :func:`fit_validation_detectors` — then, for the detectors fitted on the labelled ID
  validation split (``uses_validation_data``: temperature scaling's T, Gram's validation
  normaliser), ONE pass over it shared by all of them and ``fit_validation``.
* :func:`score_batch` — every detector's score of one batch from the shared forward pass; the
  input-gradient dispatch (ODIN, FSSD/Mahalanobis with ``epsilon > 0``) lives here once.
* :func:`calibrate_detectors` / :func:`decide` — decision thresholds at a target ID TPR and
  the ID/OOD decisions they give.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, InvalidConfiguration, Reducer
from lightning_ood.models.base import FEATURES, LOGITS, BackboneOutput, OODBackbone

#: ``(BackboneOutput, targets)`` pairs: what a fitting pass feeds ``Detector.update``.
#: Training batches as fitting reads them: ``(outputs, targets)``, or ``(outputs, targets,
#: inputs)`` from an eval pass (detectors with ``fit_needs_inputs`` read the inputs; cached
#: features have none).
Outputs = Iterable[tuple[BackboneOutput, Tensor] | tuple[BackboneOutput, Tensor, Tensor]]
#: Training outputs as given to :func:`fit_detectors`: a stream, a list (re-iterable), or a
#: callable that starts the stream anew (needed when a detector asks for another pass).
OutputSource = Outputs | Callable[[], Outputs]


# -- small shared pieces -------------------------------------------------------------------------
def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (or buffer); CPU for a stateless module."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(inputs, targets or None)`` from a tensor or an ``(inputs, targets, ...)`` batch."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    raise TypeError(
        f"expected batches of tensors or (inputs, targets) tuples, got {type(batch).__name__}"
    )


def check_backbone(detectors: Iterable[Detector], backbone: OODBackbone) -> None:
    """Each detector's :meth:`~lightning_ood.detectors.base.Detector.check_backbone`: a
    detector that cannot run on ``backbone`` at all is refused before any pass."""
    for det in detectors:
        det.check_backbone(backbone)


def reads_training_data(det: Detector) -> bool:
    """Whether fitting ``det`` needs the training-set pass (FSSD, MSP, a fixed-clip ReAct: no)."""
    return bool(det.requires_fit and det.uses_training_data)


def detector_taps(detectors: Iterable[Detector], backbone: OODBackbone) -> tuple[str, ...]:
    """The union of the taps ``detectors`` read, in first-seen order, without features/logits
    (every forward pass yields those)."""
    taps: dict[str, None] = {}
    for det in detectors:
        taps.update(
            dict.fromkeys(t for t in det.tap_names(backbone) if t not in (FEATURES, LOGITS))
        )
    return tuple(taps)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` for the duration, restoring its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# -- the eval pass ---------------------------------------------------------------------------------
def eval_pass(
    backbone: OODBackbone,
    loader: Iterable[Any],
    taps: Sequence[str] = (),
    *,
    progress: bool = False,
    desc: str = "eval pass",
) -> Iterator[tuple[Tensor, Tensor | None, BackboneOutput]]:
    """Yield ``(inputs, targets, outputs)`` with ONE eval-mode, no-grad forward per batch.

    Inputs and targets are moved to the backbone's device. ``no_grad`` (not
    ``inference_mode``) wraps only the forward, so consumers can still take input gradients
    (ODIN) or differentiate through the head from the features (LINe's autograd oracle).
    The backbone's train/eval mode is restored when the generator finishes or is closed.
    """
    from tqdm import tqdm

    hooked = [t for t in dict.fromkeys(taps) if t not in (FEATURES, LOGITS)]
    device = module_device(backbone)
    with eval_mode(backbone):
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            x, y = split_batch(batch)
            x = x.to(device)
            with torch.no_grad():
                out = backbone.extract(x, taps=hooked)
            yield x, (None if y is None else y.to(device)), out


def labelled(passes: Iterable[tuple[Tensor, Tensor | None, BackboneOutput]]) -> Outputs:
    """``(outputs, targets, inputs)`` of an :func:`eval_pass`, for :func:`fit_detectors`
    (the inputs reach only detectors that declare ``fit_needs_inputs``); a batch without
    targets is refused (fitting needs the class of every sample)."""
    for x, y, out in passes:
        if y is None:
            raise ValueError(
                "fitting detectors needs (inputs, targets) batches; the loader yielded inputs "
                f"only (shape {tuple(x.shape)})"
            )
        yield out, y, x


# -- fitting ---------------------------------------------------------------------------------------
def restart_of(outputs: OutputSource | None) -> Callable[[], Outputs] | None:
    """A function that starts ``outputs`` anew (a callable itself, or a list's replay); None
    for a one-shot iterator."""
    if outputs is None or callable(outputs):
        return outputs
    if isinstance(outputs, Sequence):
        return lambda: outputs
    return None


def restartable(
    outputs: OutputSource | None,
) -> tuple[Outputs | None, Callable[[], Outputs] | None]:
    """The first stream of ``outputs`` and a way to start it again (None for a one-shot
    iterator)."""
    restart = restart_of(outputs)
    if outputs is None or restart is None:
        return outputs, None  # type: ignore[return-value]
    return restart(), restart


def fit_detectors(
    detectors: Iterable[Detector],
    backbone: OODBackbone,
    outputs: OutputSource | None = None,
    reducer: Reducer | None = None,
    *,
    finalize: bool = True,
) -> None:
    """Fit ``detectors`` together from one stream of training outputs.

    ``reset`` every detector, feed each batch of ``outputs`` to every detector that reads
    training data (consumed once, whatever their number), then ``finalize`` them all with
    ``reducer`` (cross-rank sums under DDP). A detector whose :meth:`Detector.next_pass` asks
    for another pass (an exact percentile beyond memory) gets it, alone, from ``outputs``
    started anew (a list or a callable; a one-shot stream is refused then).
    ``finalize=False`` stops after the first pass, for callers that finalize several
    configurations from one accumulated state (the grid).

    Raises:
        ValueError: a detector reads the training set but ``outputs`` is None.
    """
    dets = list(detectors)
    readers = [d for d in dets if reads_training_data(d)]
    if readers and outputs is None:
        raise ValueError(
            f"detectors {[d.name for d in readers]} are fitted on the training set; pass its "
            "outputs (an eval pass over the training loader, or cached training features)"
        )
    for det in dets:
        det.reset()
    stream, restart = restartable(outputs)
    if readers and stream is not None:
        _update_pass(readers, backbone, stream)
    if finalize:
        finalize_detectors(dets, backbone, reducer, restart)


def _update_pass(readers: Sequence[Detector], backbone: OODBackbone, stream: Outputs) -> None:
    with torch.no_grad():  # sums only; LINe's autograd oracle re-enables grad itself
        for out, target, *rest in stream:
            for det in readers:
                if not det.fit_needs_inputs:
                    det.update(out, target, backbone)
                    continue
                if not rest:
                    raise ValueError(
                        f"detector {det.name!r} ({det.kind}) fits on the training inputs "
                        "themselves (it perturbs them), which cached features do not hold; fit "
                        "it from a loader (an eval pass over the training images)"
                    )
                det.update(out, target, backbone, inputs=rest[0])


def extra_passes(
    detectors: Iterable[Detector],
    backbone: OODBackbone,
    reducer: Reducer | None = None,
    restart: Callable[[], Outputs] | None = None,
) -> None:
    """Run the extra training passes the detectors ask for (:meth:`Detector.next_pass`, fed by
    ``restart``), all pending detectors sharing each pass."""
    reducer = reducer or Reducer()
    pending = [d for d in detectors if reads_training_data(d) and d.next_pass(reducer)]
    while pending:
        if restart is None:
            raise ValueError(
                f"detectors {[d.name for d in pending]} need another pass over the training "
                "data (an exact percentile of more values than `max_samples` holds in memory); "
                "pass the training outputs as a list or a callable that restarts the stream, "
                "or raise `max_samples`"
            )
        _update_pass(pending, backbone, restart())
        pending = [d for d in pending if d.next_pass(reducer)]


def finalize_detectors(
    detectors: Iterable[Detector],
    backbone: OODBackbone,
    reducer: Reducer | None = None,
    restart: Callable[[], Outputs] | None = None,
    *,
    invalid: dict[str, str] | None = None,
    passes: bool = True,
) -> None:
    """:func:`extra_passes` (unless ``passes=False``: the caller ran them), then ``finalize``
    every detector (cross-rank reductions through ``reducer``): the last step of
    :func:`fit_detectors`, on its own for state accumulated once and finalized under several
    finalize-only configurations (the grid, tuning).

    ``invalid``: record ``{name: message}`` of a detector whose ``finalize`` raises
    :class:`~lightning_ood.detectors.base.InvalidConfiguration` (a value this backbone or
    training set rules out, e.g. ViM's ``dim`` >= the feature width) instead of raising:
    tuning drops such candidates and says so."""
    dets = list(detectors)
    reducer = reducer or Reducer()
    if passes:
        extra_passes(dets, backbone, reducer, restart)
    for det in dets:
        if invalid is None:
            det.finalize(backbone, reducer)
            continue
        try:
            det.finalize(backbone, reducer)
        except InvalidConfiguration as err:
            invalid[det.name] = str(err)


def fit_from_loader(
    detectors: Iterable[Detector],
    backbone: OODBackbone,
    loader: Iterable[Any] | None,
    reducer: Reducer | None = None,
    *,
    progress: bool = False,
) -> None:
    """:func:`fit_detectors` over one :func:`eval_pass` of ``loader`` (run only if a detector
    reads training data; ``loader`` may then be None; a detector asking for another pass gets
    another eval pass)."""
    dets = list(detectors)
    readers = [d for d in dets if reads_training_data(d)]
    source = None
    if readers and loader is not None:
        source = loader_source(backbone, loader, readers, progress=progress)
    with eval_mode(backbone):
        fit_detectors(dets, backbone, source, reducer)


# -- validation-fitted detectors -----------------------------------------------------------------
def validation_readers(detectors: Iterable[Detector]) -> list[Detector]:
    """The detectors fitted (also) on the labelled ID validation split
    (``Detector.uses_validation_data``: a class flag or a per-instance property)."""
    return [d for d in detectors if bool(d.uses_validation_data)]


def cat_outputs(parts: Sequence[BackboneOutput]) -> BackboneOutput:
    """One :class:`BackboneOutput` of the rows of ``parts`` (dim 0), taps included."""
    taps = {k: torch.cat([p.taps[k] for p in parts]) for k in parts[0].taps} if parts else {}
    return BackboneOutput(
        torch.cat([p.features for p in parts]), torch.cat([p.logits for p in parts]), taps
    )


def _empty_outputs(backbone: OODBackbone, taps: Sequence[str]) -> BackboneOutput:
    """Zero-row outputs of ``backbone`` (a rank whose shard of a tiny split is empty still
    takes part in the detectors' cross-rank reductions)."""
    shape = tuple(getattr(backbone, "input_shape", ()) or ())
    x = torch.zeros(0, *shape, device=module_device(backbone))
    with torch.no_grad(), eval_mode(backbone):
        return backbone.extract(x, taps=[t for t in taps if t not in (FEATURES, LOGITS)])


def fit_validation_detectors(
    detectors: Iterable[Detector],
    backbone: OODBackbone,
    outputs: Outputs,
    reducer: Reducer | None = None,
    *,
    invalid: dict[str, str] | None = None,
) -> list[Detector]:
    """Call ``fit_validation(out, target, reducer)`` of every detector of ``detectors`` that
    uses validation data, all from ONE stream of labelled ID validation ``outputs`` (this
    rank's rows; the detectors reduce across ranks through ``reducer``, as in ``finalize``).
    Runs after :func:`finalize_detectors` and before calibration. Returns those detectors.

    ``invalid``: record ``{name: message}`` of a detector whose ``fit_validation`` raises
    :class:`~lightning_ood.detectors.base.InvalidConfiguration` instead of raising (tuning).

    Raises:
        ValueError: a sample of the split has no label (target < 0, e.g. cached features
            extracted from a loader without targets); the message names the detectors.
    """
    dets = validation_readers(detectors)
    if not dets:
        return []
    names = [f"{d.name} ({d.kind})" for d in dets]
    parts: list[BackboneOutput] = []
    labels: list[Tensor] = []
    with torch.no_grad():
        for out, target, *_ in outputs:
            parts.append(out.detach())
            labels.append(target.reshape(-1).long())
    target = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if bool((target < 0).any()):
        raise ValueError(
            f"detectors {names} are fitted on the LABELLED ID validation split, but "
            f"{int((target < 0).sum())} of its {target.numel()} samples have no label (target "
            "-1: features cached from a loader without targets?); give them a labelled ID "
            "validation split (a loader of (inputs, targets), or features extracted with labels)"
        )
    out = cat_outputs(parts) if parts else _empty_outputs(backbone, detector_taps(dets, backbone))
    target = target.to(out.logits.device)
    reducer = reducer or Reducer()
    for det in dets:
        if invalid is None:
            det.fit_validation(out, target, reducer)
            continue
        try:
            det.fit_validation(out, target, reducer)
        except InvalidConfiguration as err:
            invalid[det.name] = str(err)
    return dets


def fit_validation_from_loader(
    detectors: Iterable[Detector],
    backbone: OODBackbone,
    loader: Iterable[Any],
    reducer: Reducer | None = None,
    *,
    progress: bool = False,
) -> list[Detector]:
    """:func:`fit_validation_detectors` over ONE :func:`eval_pass` of a labelled ID validation
    ``loader`` (the union of the validation readers' taps); no pass when none reads it."""
    dets = validation_readers(detectors)
    if not dets:
        return []
    taps = detector_taps(dets, backbone)
    desc = "Fitting on ID validation (" + ", ".join(d.name for d in dets[:8]) + ")"
    passes = eval_pass(backbone, loader, taps, progress=progress, desc=desc)
    with eval_mode(backbone):
        return fit_validation_detectors(dets, backbone, labelled(passes), reducer)


def loader_source(
    backbone: OODBackbone,
    loader: Iterable[Any],
    detectors: Sequence[Detector],
    *,
    progress: bool = False,
) -> Callable[[], Outputs]:
    """The training outputs of ``detectors`` as a restartable source: each call starts an
    :func:`eval_pass` over ``loader`` with the union of the readers' taps."""
    readers = [d for d in detectors if reads_training_data(d)]
    names = ", ".join(d.name for d in readers[:8]) + (", ..." if len(readers) > 8 else "")
    desc = f"Fitting detectors ({names})"
    taps = detector_taps(readers, backbone)

    def source() -> Outputs:
        return labelled(eval_pass(backbone, loader, taps, progress=progress, desc=desc))

    return source


def check_feature_only(det: Detector) -> None:
    """Refuse a detector whose score needs the network and the inputs (input gradients),
    before any work, where only features are at hand (cache, grid)."""
    if det.needs_inputs:
        why = (
            "input gradients (input pre-processing, epsilon > 0); use epsilon: 0, or"
            if det.needs_input_grad
            else "the network and the inputs (extra forward passes);"
        )
        raise ValueError(
            f"detector {det.name!r} ({type(det).__name__}, config {det.config()}) needs {why} "
            "score it on images (`lightning-ood test`): cached features cannot provide them"
        )


# -- scoring ---------------------------------------------------------------------------------------
def score_batch(
    detectors: Mapping[str, Detector],
    out: BackboneOutput,
    backbone: OODBackbone | None = None,
    inputs: Tensor | None = None,
    *,
    components: bool = False,
) -> dict[str, Tensor]:
    """Every detector's scores for one batch, from the shared forward pass ``out``.

    Detectors that read the inputs (``needs_inputs``: input gradients, extra forwards) also
    get ``backbone`` and ``inputs``; without them (cached features) they are refused by name.
    ``components=True`` returns a layer ensemble's per-tap components (B, K) instead of its
    combined score, so that the evaluation protocol can fit a combiner per OOD set.
    """
    scores: dict[str, Tensor] = {}
    for name, det in detectors.items():
        fn = det.score_components if components and det.has_combiner else det.score
        if det.needs_inputs:
            if backbone is None or inputs is None:
                check_feature_only(det)
            scores[name] = fn(out, backbone, inputs)
        else:
            scores[name] = fn(out)
    return scores


def score_stream(
    detectors: Mapping[str, Detector],
    batches: Iterable[tuple[Tensor | None, BackboneOutput]],
    backbone: OODBackbone | None = None,
    *,
    components: bool = False,
) -> dict[str, Tensor]:
    """:func:`score_batch` over a stream of ``(inputs or None, outputs)``; every detector's
    scores concatenated in float64 on the CPU."""
    chunks: dict[str, list[Tensor]] = {n: [] for n in detectors}
    for x, out in batches:
        for name, s in score_batch(detectors, out, backbone, x, components=components).items():
            chunks[name].append(s.detach().to("cpu", torch.float64))
    return {
        n: torch.cat(c) if c else torch.zeros(0, dtype=torch.float64) for n, c in chunks.items()
    }


def score_loader(
    detectors: Mapping[str, Detector],
    backbone: OODBackbone,
    loader: Iterable[Any],
    *,
    components: bool = False,
    progress: bool = False,
    desc: str = "scoring",
) -> dict[str, Tensor]:
    """Score ``loader`` with every detector, one :func:`eval_pass` for all of them."""
    taps = detector_taps(detectors.values(), backbone)
    passes = eval_pass(backbone, loader, taps, progress=progress, desc=desc)
    with eval_mode(backbone):
        return score_stream(
            detectors, ((x, out) for x, _, out in passes), backbone, components=components
        )


# -- shipped layer-ensemble combiners ------------------------------------------------------------
#: ``method`` of a combiner fitted on ID validation + validation OOD samples.
COMBINER_LOGISTIC = "logistic"
#: ``method`` of a combiner fitted on ID validation vs FGSM-perturbed ID validation samples
#: (proxy outliers, no OOD data: Lee et al. 2018's validation for the feature ensemble).
COMBINER_FGSM_PROXY = "logistic_fgsm_proxy"
#: ``method`` of the last-resort OOD-free fallback (LayerEnsembleDetector.fit_id_only_combiner)
#: for inputs without gradients (token models).
COMBINER_ID_ONLY = "id_zscore_mean"
#: FGSM step of the proxy outliers, in pixel units ([0, 1] images): one value, set a priori
#: (not tuned on any test set); benchmarks/results/shipped_combiners.md measures it.
FGSM_PROXY_EPS = 0.05


def fgsm_batches(
    backbone: OODBackbone,
    loader: Iterable[Any],
    eps: float = FGSM_PROXY_EPS,
    input_std: Sequence[float] | float | None = None,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """``loader``'s images moved one FGSM step away from the class the network predicts:
    ``x + eps / std * sign(grad_x CE(f(x), argmax f(x)))`` (normalised inputs; ``input_std`` is
    the dataset's per-channel std, so ``eps`` is in pixel units). They serve as proxy outliers
    where no OOD data may be used (Lee et al. 2018, Sec. 3: validation on adversarial samples).
    """
    device = module_device(backbone)
    with eval_mode(backbone):
        for batch in loader:
            x, y = split_batch(batch)
            x = x.to(device)
            if not x.is_floating_point():
                raise ValueError("FGSM proxy outliers need float image inputs")
            std = torch.as_tensor(1.0 if input_std is None else input_std, dtype=x.dtype)
            std = std.to(device).reshape(1, -1, *([1] * (x.ndim - 2)))
            with torch.inference_mode(False), torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)
                logits = backbone(xg)
                loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum")
                (grad,) = torch.autograd.grad(loss, xg)
            yield (x + eps / std * grad.sign()).detach(), y


def ships_combiner(det: Detector, components: Tensor) -> bool:
    """Whether ``det`` is a layer ensemble whose shipped score combines several components
    (``components``: its (N, K) validation components)."""
    return det.has_combiner and components.ndim == 2 and components.shape[1] > 1


def deploy_combiners(
    detectors: Mapping[str, Detector],
    id_components: Mapping[str, Tensor],
    ood_components: Mapping[str, Tensor] | None = None,
    proxy_components: Mapping[str, Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fit the combiner each multi-component layer ensemble ships with, from data that exists
    before deployment only: ID validation components (N, K) and validation OOD components
    (M, K) when given, never a reported test set.

    In order of preference: the detector's logistic regression on ID vs validation OOD (as
    the FSSD/Mahalanobis references fit it per test set); on ID vs ``proxy_components``
    (FGSM-perturbed ID validation samples, :func:`fgsm_batches`) when there is no OOD data;
    else the ID-only z-score mean
    (:meth:`~lightning_ood.detectors.layer_ensemble.LayerEnsembleDetector.fit_id_only_combiner`).
    ``docs/methods.md#layer-ensembles-what-ships`` gives the evidence for that order.
    Returns ``{name: {"method", "n_id", "n_ood"}}`` for the detectors it fitted.
    """
    fitted: dict[str, dict[str, Any]] = {}
    for name, det in detectors.items():
        cid = id_components[name]
        if not ships_combiner(det, cid):
            continue
        cood = None if ood_components is None else ood_components.get(name)
        proxy = None if proxy_components is None else proxy_components.get(name)
        if cood is not None and len(cood):
            det.fit_combiner(cid, cood)  # type: ignore[attr-defined]
            fitted[name] = {"method": COMBINER_LOGISTIC, "n_id": len(cid), "n_ood": len(cood)}
        elif proxy is not None and len(proxy):
            det.fit_combiner(cid, proxy)  # type: ignore[attr-defined]
            fitted[name] = {"method": COMBINER_FGSM_PROXY, "n_id": len(cid), "n_ood": len(proxy)}
        else:
            det.fit_id_only_combiner(cid)  # type: ignore[attr-defined]
            fitted[name] = {"method": COMBINER_ID_ONLY, "n_id": len(cid), "n_ood": 0}
    return fitted


def shipped_score(det: Detector, scores: Tensor) -> Tensor:
    """``det``'s score as it ships from what ``score_batch(components=True)`` gave: a layer
    ensemble's (N, K) components combined by its own combiner, any (N,) score unchanged."""
    if det.has_combiner and scores.ndim == 2:
        return det.combine(scores)  # type: ignore[attr-defined]
    return scores


def combined_scores(detectors: Mapping[str, Detector], bank: Mapping[str, Tensor]) -> dict:
    """:func:`shipped_score` of every detector in ``bank``."""
    return {name: shipped_score(det, bank[name]) for name, det in detectors.items()}


# -- decisions -----------------------------------------------------------------------------------
def calibrate_detectors(
    detectors: Mapping[str, Detector], id_scores: Mapping[str, Tensor], tpr: float = 0.95
) -> dict[str, float]:
    """Each detector's decision threshold from its held-out ID scores (``Detector.calibrate``:
    a fraction ``tpr`` of them is called ID). Returns the thresholds."""
    missing = [n for n in detectors if n not in id_scores]
    if missing:
        raise ValueError(f"calibrate_detectors: no held-out ID scores for detectors {missing}")
    return {n: det.calibrate(id_scores[n], tpr) for n, det in detectors.items()}


def decide(detectors: Mapping[str, Detector], scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ID/OOD decisions: a sample is called OOD when its score is below the threshold."""
    return {n: s < detectors[n].threshold.to(s.dtype) for n, s in scores.items()}


def predict_batch(
    detectors: Mapping[str, Detector],
    out: BackboneOutput,
    backbone: OODBackbone | None = None,
    inputs: Tensor | None = None,
) -> dict[str, Any]:
    """The hand-off output of one batch: logits, predicted class, every detector's score and
    decision. ``task.predict_step`` and the exported predictor both return this."""
    scores = score_batch(detectors, out, backbone, inputs)
    return {
        "logits": out.logits,
        "pred": out.logits.argmax(dim=1),
        "scores": scores,
        "is_ood": decide(detectors, scores),
    }


__all__ = [
    "COMBINER_FGSM_PROXY",
    "COMBINER_ID_ONLY",
    "COMBINER_LOGISTIC",
    "OutputSource",
    "Outputs",
    "calibrate_detectors",
    "cat_outputs",
    "check_feature_only",
    "combined_scores",
    "decide",
    "deploy_combiners",
    "detector_taps",
    "eval_mode",
    "eval_pass",
    "extra_passes",
    "fgsm_batches",
    "finalize_detectors",
    "fit_detectors",
    "fit_from_loader",
    "fit_validation_detectors",
    "fit_validation_from_loader",
    "labelled",
    "loader_source",
    "module_device",
    "predict_batch",
    "reads_training_data",
    "restart_of",
    "restartable",
    "score_batch",
    "score_loader",
    "score_stream",
    "shipped_score",
    "ships_combiner",
    "split_batch",
    "validation_readers",
]
