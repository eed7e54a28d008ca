"""The one backbone contract every detector relies on.

Modelled on timm's ``forward_features`` / ``forward_head`` / ``num_features`` /
``get_classifier``: a detector never touches an architecture's layer names, only this API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

#: Tap names every backbone serves without a hook.
FEATURES = "features"
LOGITS = "logits"


@dataclass
class BackboneOutput:
    """Everything one forward pass yields for the detectors.

    Attributes:
        features: penultimate feature h(x), shape (B, q), after the final non-linearity/pool.
        logits: classifier output f(x) = W h(x) + b, shape (B, L).
        taps: named intermediate outputs (unflattened), only those that were asked for.
    """

    features: Tensor
    logits: Tensor
    taps: dict[str, Tensor] = field(default_factory=dict)

    def tap(self, name: str) -> Tensor:
        """Return a tap by name; ``features`` and ``logits`` are always available."""
        if name == FEATURES:
            return self.features
        if name == LOGITS:
            return self.logits
        try:
            return self.taps[name]
        except KeyError:
            raise KeyError(
                f"tap {name!r} was not extracted; extracted taps: {sorted(self.taps)}. "
                "Pass it in `taps=` to OODBackbone.extract."
            ) from None

    def detach(self) -> BackboneOutput:
        return BackboneOutput(
            self.features.detach(),
            self.logits.detach(),
            {k: v.detach() for k, v in self.taps.items()},
        )


class OODBackbone(nn.Module):
    """Base class for classifiers that post-hoc detectors can inspect.

    Subclasses set ``num_classes``, ``num_features``, ``input_shape``, ``input_kind`` and
    ``tap_layers`` (tap name -> dotted sub-module path whose output is the tap), and implement
    :meth:`forward_features` and :meth:`get_classifier`.
    """

    num_classes: int
    num_features: int
    #: Shape of one input without the batch dimension, e.g. (3, 32, 32) or (250,).
    input_shape: tuple[int, ...]
    #: "image" (float pixels) or "tokens" (integer ids in [0, vocab_size)).
    input_kind: Literal["image", "tokens"] = "image"
    vocab_size: int = 0
    tap_layers: dict[str, str] = {}  # noqa: RUF012 - overridden per instance/class

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate feature h(x) of shape (B, num_features)."""
        raise NotImplementedError

    def get_classifier(self) -> nn.Linear:
        """The final linear layer: logits = W h + b."""
        raise NotImplementedError

    def forward_head(self, h: Tensor) -> Tensor:
        return self.get_classifier()(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def tap_names(self) -> tuple[str, ...]:
        """All tap names this backbone serves, in network order, then features and logits."""
        return (*self.tap_layers, FEATURES, LOGITS)

    def extract(self, x: Tensor, taps: Sequence[str] = ()) -> BackboneOutput:
        """One forward pass returning features, logits and the requested taps.

        Taps are captured with temporary forward hooks, so this costs exactly one pass
        whatever the number of detectors that share it.
        """
        hooked = [t for t in dict.fromkeys(taps) if t not in (FEATURES, LOGITS)]
        unknown = [t for t in hooked if t not in self.tap_layers]
        if unknown:
            raise KeyError(
                f"{type(self).__name__} has no tap(s) {unknown}; available taps: "
                f"{list(self.tap_names)}"
            )
        captured: dict[str, Tensor] = {}
        handles = []
        for name in hooked:
            module = self.get_submodule(self.tap_layers[name])

            def hook(_m: nn.Module, _i: object, out: Tensor, name: str = name) -> None:
                captured[name] = out[0] if isinstance(out, tuple) else out

            handles.append(module.register_forward_hook(hook))
        try:
            h = self.forward_features(x)
            logits = self.forward_head(h)
        finally:
            for handle in handles:
                handle.remove()
        return BackboneOutput(h, logits, {t: captured[t] for t in hooked})

    def example_input(self, batch_size: int = 2) -> Tensor:
        """A valid dummy input (used by contract tests and shape probes)."""
        if self.input_kind == "tokens":
            return torch.randint(0, self.vocab_size, (batch_size, *self.input_shape))
        return torch.rand(batch_size, *self.input_shape)


def reference_init(model: nn.Module) -> None:
    """The CIFAR reference codes' initialisation (DenseNet-BC, WideResNet): He (fan-out) for
    convolutions, unit-weight zero-bias BatchNorm, zero linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
