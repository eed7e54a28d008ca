"""Deep Ensemble (Lakshminarayanan et al. 2017), the FSSD paper's "DE" column.

N classifiers of one recipe, trained independently (different seeds), vote with their mean
softmax p̄(y|x) = (1/N) Σ_n softmax(f_n(x)) (Lakshminarayanan et al. 2017, §2.4); the score is
max_k p̄(y = k|x), higher = more in-distribution. N = 5 in the paper.

The members are backbones held as sub-modules of the detector
(:class:`~lightning_ood.detectors.members.MemberEnsemble`): they share every test batch with
the main network and travel in the checkpoint of the model that carries the detector.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, OptInput, OptModel, truthy
from lightning_ood.detectors.hparams import HParam
from lightning_ood.detectors.members import MemberEnsemble, member_paths
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput


@register_detector
class DeepEnsemble(MemberEnsemble, Detector):
    """Max of the mean softmax of N independently trained members (higher = more ID); the
    members are :class:`~lightning_ood.detectors.members.MemberEnsemble`'s ``checkpoints`` or
    ``checkpoint_template`` + ``seeds``.

    Raises:
        ValueError: members of different architectures or class counts (both files named).
    """

    kind = "de"
    uses_training_data = False
    include_model = HParam(
        False,
        truthy,
        stage="score",
        doc="also count the network the detector is attached to as a member (e.g. 4 listed "
        "files + the tested checkpoint = 5 members)",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_members(self.kind)

    # -- scoring ---------------------------------------------------------------------------
    @property
    def needs_inputs(self) -> bool:
        """Every member runs a forward pass on the inputs: cached features cannot score it."""
        return True

    def mean_softmax(self, inputs: Tensor, out: BackboneOutput | None = None) -> Tensor:
        """(1/N) Σ_n softmax(f_n(x)), shape (B, L); with ``include_model`` the main network's
        logits (``out``) are one more member."""
        probs = []
        with torch.no_grad():
            for member in self.members:
                was_training = member.training
                member.eval()
                try:
                    probs.append(member(inputs).softmax(dim=1))
                finally:
                    member.train(was_training)
        if self.include_model:
            if out is None:
                raise ValueError(f"{self.name}: include_model needs the main network's outputs")
            probs.append(out.logits.detach().softmax(dim=1))
        return torch.stack(probs).mean(dim=0)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        if inputs is None:
            raise ValueError(
                f"{self.name}: DeepEnsemble.score needs `inputs` (every member runs on them); "
                "cached features cannot score it"
            )
        self.check_members(model)
        return self.mean_softmax(inputs, out).amax(dim=1).to(out.logits.dtype)


__all__ = ["DeepEnsemble", "member_paths"]
