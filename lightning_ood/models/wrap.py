"""Any classifier ``nn.Module`` behind the backbone contract, without subclassing.

:func:`wrap` splits a network at its classifier head, a sub-module named by its dotted path
(``"fc"``, ``"classifier.1"``, ``"heads.head"``) or found as the last ``nn.Linear``: the head's
input is the penultimate feature h(x), the head itself maps h to the logits. One forward
hook on the head serves any architecture, so nothing is written per family, and every named
sub-module is a tap. The hook also checks, on every pass, that the head's output is the
network's output, so a wrong head is refused instead of giving silently wrong features.

A head that is not a single ``nn.Linear`` (an MLP, a conv + pool) still serves the detectors
that read features or logits; :meth:`WrappedBackbone.get_classifier` then raises
:class:`NonLinearHeadError`, naming the head, for the detectors that need W and b.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_ood.models.base import FEATURES, LOGITS, BackboneOutput, OODBackbone


class NonLinearHeadError(TypeError):
    """The classifier head is not one ``nn.Linear``, but a detector needs its W and b."""


def linear_classifier(model: OODBackbone, detector: str) -> nn.Linear:
    """``model.get_classifier()``, with ``detector`` named when the head is not linear.

    Detectors that copy W and b call this instead of ``get_classifier`` so that the error
    says which detector cannot run and which head is at fault.
    """
    try:
        return model.get_classifier()
    except NonLinearHeadError as err:
        msg = f"detector {detector} needs a linear classifier head: {err}"
        raise NonLinearHeadError(msg) from err


def find_head(net: nn.Module) -> str | None:
    """Dotted path of the last ``nn.Linear`` registered in ``net``, or None when it has none.

    Torchvision and timm classifiers (ResNet ``fc``, MobileNet/EfficientNet
    ``classifier.1``, ConvNeXt ``classifier.2``, ViT ``heads.head``, Swin ``head``) all
    register their final linear layer last; :class:`WrappedBackbone` verifies the guess on
    every forward pass.
    """
    last = None
    for name, module in net.named_modules():
        if name and isinstance(module, nn.Linear):
            last = name
    return last


def module_names(net: nn.Module) -> list[str]:
    """Every named sub-module of ``net`` (the root excluded), in registration order."""
    return [name for name, _ in net.named_modules() if name]


def _close(name: str, options: Sequence[str], n: int = 5) -> str:
    near = difflib.get_close_matches(name, list(options), n=n, cutoff=0.5)
    return f"; close matches: {near}" if near else ""


class WrappedBackbone(OODBackbone):
    """A classifier ``net`` split at its head module; built by :func:`wrap`.

    Args:
        net: the classifier; ``net(x)`` must return the logits of the ``head`` module.
        head: dotted path of the head in ``net``; None finds the last ``nn.Linear``.
        input_shape: one input without the batch dimension, e.g. ``(3, 224, 224)``; needed
            for :meth:`example_input` and to measure a non-linear head's feature width.
        name: how errors and ``repr`` name the model (e.g. ``"tv:resnet18"``).
        taps: tap name -> dotted path in ``net``; default every named sub-module under its
            own path (``layer1``, ``features.3``, ``encoder.layers.encoder_layer_11``); a
            module named ``features`` or ``logits`` (reserved: h(x) and f(x)) is
            ``net.features`` / ``net.logits``.
    """

    def __init__(
        self,
        net: nn.Module,
        head: str | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        name: str | None = None,
        taps: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.model_name = name or type(net).__name__
        names = module_names(net)
        if head is None:
            head = find_head(net)
            if head is None:
                raise ValueError(
                    f"cannot find the classifier head of {self.model_name}: it has no nn.Linear "
                    "layer. Pass head='<dotted module path>' (model_kwargs.head in a config) "
                    "naming the module whose output are the logits; its input becomes the "
                    f"penultimate feature. Modules: {names[-8:]} (last 8)"
                )
        if head not in names:
            raise ValueError(
                f"head={head!r}: {self.model_name} has no module of that name{_close(head, names)}"
                f" (its last modules: {names[-8:]})"
            )
        self.head_name = head
        self.input_shape = tuple(int(s) for s in input_shape) if input_shape else ()
        self.input_kind = "image"
        if taps is None:
            # a module named like a reserved tap (torchvision's ``features``) keeps ``net.``
            self.tap_layers = {
                (f"net.{n}" if n in (FEATURES, LOGITS) else n): f"net.{n}" for n in names
            }
        else:
            reserved = [t for t in taps if t in (FEATURES, LOGITS)]
            if reserved:
                raise ValueError(f"taps: {reserved} are reserved tap names (h(x) and f(x))")
            missing = [p for p in taps.values() if p not in names]
            if missing:
                raise ValueError(
                    f"taps: {self.model_name} has no module(s) {missing}{_close(missing[0], names)}"
                )
            self.tap_layers = {t: f"net.{p}" for t, p in taps.items()}
        self._head_in_shape: tuple[int, ...] | None = None
        module = self.head
        if isinstance(module, nn.Linear):
            self.num_features = module.in_features
            self.num_classes = module.out_features
        else:
            self._measure_nonlinear_head()

    @property
    def head(self) -> nn.Module:
        """The head module itself (linear or not)."""
        return self.net.get_submodule(self.head_name)

    def _measure_nonlinear_head(self) -> None:
        if not self.input_shape:
            raise ValueError(
                f"the head {self.head_name!r} of {self.model_name} is a "
                f"{type(self.head).__name__}, not an nn.Linear: pass input_shape= so that its "
                "feature width and class count can be measured with one forward pass"
            )
        was_training = self.training
        self.eval()
        with torch.no_grad():
            h = self.forward_features(torch.zeros(1, *self.input_shape))
            logits = self.forward_head(h)
        self.train(was_training)
        self.num_features = h.shape[1]
        self.num_classes = logits.shape[1]

    def forward_features(self, x: Tensor) -> Tensor:
        """The head's input, flattened to (B, q), from one pass through ``net``."""
        seen: dict[str, Tensor] = {}

        def hook(_m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            seen["in"], seen["out"] = args[0], out

        handle = self.head.register_forward_hook(hook)
        try:
            out = self.net(x)
        finally:
            handle.remove()
        if "in" not in seen:
            raise RuntimeError(
                f"{self.model_name}: the head {self.head_name!r} was not called in the forward "
                "pass; pass head= the module that produces the logits"
            )
        head_out = seen["out"]
        same = out is head_out or (  # SqueezeNet flattens its (B, L, 1, 1) conv head's output
            isinstance(out, Tensor)
            and out.numel() == head_out.numel()
            and torch.equal(out.flatten(1), head_out.flatten(1))
        )
        if not same:
            raise RuntimeError(
                f"{self.model_name}: the output of head {self.head_name!r} is not the network's "
                "output (a layer runs after it, or it is not the classifier); pass head= the "
                "last module, whose output are the logits"
            )
        h = seen["in"]
        if h.dim() > 2:  # a conv head: keep (B, q) for the detectors, reshape in forward_head
            self._head_in_shape = tuple(h.shape[1:])
            h = h.flatten(1)
        return h

    def forward_head(self, h: Tensor) -> Tensor:
        if self._head_in_shape is not None and not isinstance(self.head, nn.Linear):
            h = h.reshape(h.shape[0], *self._head_in_shape)
        logits = self.head(h)
        return logits.flatten(1) if logits.dim() > 2 else logits

    def get_classifier(self) -> nn.Linear:
        head = self.head
        if isinstance(head, nn.Linear):
            return head
        raise NonLinearHeadError(
            f"the classifier head {self.head_name!r} of {self.model_name} is a "
            f"{type(head).__name__}, not a single nn.Linear, so it has no W and b to rescore "
            "features with (the head-rescoring detectors: ReAct, DICE, LINe, ASH, SCALE, ViM, "
            "GradNorm, NCI, fDBD, ... need them). Use detectors that read features or logits "
            "only (MSP, MaxLogit, Energy, GEN, ODIN, Mahalanobis, RMDS, KNN, NNGuide, FSSD, DE, "
            "MCD), or wrap with head= the final nn.Linear so the layers before it are features"
        )

    def extract(self, x: Tensor, taps: Sequence[str] = ()) -> BackboneOutput:
        unknown = [t for t in taps if t not in (FEATURES, LOGITS) and t not in self.tap_layers]
        if unknown:
            raise KeyError(
                f"{self.model_name} has no tap(s) {unknown}{_close(unknown[0], self.tap_names)}. "
                f"Its {len(self.tap_names)} taps are its named modules plus features and logits; "
                f"`lightning-ood models --taps NAME` lists them: {list(self.tap_names)[:40]}"
                + (" ..." if len(self.tap_names) > 40 else "")
            )
        return super().extract(x, taps)

    def example_input(self, batch_size: int = 2) -> Tensor:
        if not self.input_shape:
            raise ValueError(
                f"{self.model_name} was wrapped without input_shape; pass input_shape= to wrap()"
            )
        return super().example_input(batch_size)

    def extra_repr(self) -> str:
        return f"name={self.model_name!r}, head={self.head_name!r}"


def wrap(
    model: nn.Module,
    head: str | None = "fc",
    *,
    input_shape: Sequence[int] | None = None,
    name: str | None = None,
    taps: Mapping[str, str] | None = None,
) -> WrappedBackbone:
    """Wrap a user's classifier so every detector runs on it, e.g. ``wrap(net, head="fc")``.

    ``head`` is the dotted path of the final module (its input is the penultimate feature);
    ``None`` picks the last ``nn.Linear``. See :class:`WrappedBackbone` for the arguments.
    """
    return WrappedBackbone(model, head, input_shape=input_shape, name=name, taps=taps)


def list_taps(model: OODBackbone) -> list[tuple[str, tuple[int, ...] | None]]:
    """``(tap name, output shape without the batch)`` of every tap, from one eval forward pass.

    The shape is None for a module the forward pass does not call (e.g. GoogLeNet's auxiliary
    heads in eval mode) or whose output is not a tensor. A module called several times (a
    shared ReLU) serves its last call's output, as with every hook-based tap.
    """
    shapes: dict[str, tuple[int, ...] | None] = dict.fromkeys(model.tap_layers)
    handles = []
    for tap, path in model.tap_layers.items():

        def hook(_m: nn.Module, _i: object, out: object, tap: str = tap) -> None:
            out = out[0] if isinstance(out, tuple) and out else out
            shapes[tap] = tuple(out.shape[1:]) if isinstance(out, Tensor) else None

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            h = model.forward_features(model.example_input(1))
            logits = model.forward_head(h)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [
        *shapes.items(),
        (FEATURES, tuple(h.shape[1:])),
        (LOGITS, tuple(logits.shape[1:])),
    ]
