"""iODIN (Regmi, 2025, the ASCOOD paper's ODIN variant; OpenOOD's ``iodin`` postprocessor):
ODIN whose input step moves only the one input element with the largest gradient magnitude
(docs/methods.md#iodin)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ood.detectors.base import BatchMemo
from lightning_ood.detectors.odin import ODIN, gradient_sign, odin_gradient
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import OODBackbone

#: The masked gradient sign of the last batch (kept apart from ODIN's: the values differ).
_MASKED_SIGN = BatchMemo()


def largest_gradient_mask(grad: Tensor) -> Tensor:
    """1 at each sample's element of largest |gradient| (the first such on ties, in
    flattened C·H·W order), 0 elsewhere; same shape and dtype as ``grad``."""
    flat = grad.abs().flatten(1)
    mask = torch.zeros_like(flat)
    mask.scatter_(1, flat.argmax(dim=1, keepdim=True), 1.0)
    return mask.reshape(grad.shape)


@register_detector
class IODIN(ODIN):
    """iODIN: x' = x − ε·m ⊙ sign(∇ₓ L)/std, m the one-hot mask of the largest |∇ₓ L|.

    L, T, ε, ``input_std``, the sign convention (0 ↦ +1) and the score max_k softmax(f(x')/T)
    are ODIN's (:class:`~lightning_ood.detectors.odin.ODIN`, whose perturbation this reuses);
    only the step is restricted to one input element per sample. Costs one forward and one
    backward pass per batch, like ODIN.
    """

    kind = "iodin"

    def _gradient_sign(self, model: OODBackbone, inputs: Tensor) -> Tensor:
        """m ⊙ sign(∇ₓ(−log S_ŷ(x; T))), memoised per batch like ODIN's sign."""

        def compute() -> Tensor:
            grad = odin_gradient(model, inputs, self.temperature)
            return gradient_sign(grad) * largest_gradient_mask(grad)

        return _MASKED_SIGN.get(inputs, self.temperature, compute, owners=(model,))


__all__ = ["IODIN", "largest_gradient_mask"]
