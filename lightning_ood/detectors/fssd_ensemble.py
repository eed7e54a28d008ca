"""Multi-model FSSD: the layer ensemble over the per-layer FSSDs of several networks.

The FSSD paper (Huang et al., 2021, Figure 6; docs/methods.md#fssd_ensemble) ensembles FSSDs "from
different layers of a single neural network and multiple trained networks". Each network n
gets its own feature space singularity per tap, FSSD_{n,l}(x) = ||F_{n,l}(x) - FSS_{n,l}||_2
(the paper's definition), and one logistic regression over all N·K components combines them,
fitted on the same held-out ID + OOD validation samples as the single-network ensemble (never
on reported samples).

The networks are the tested model (``include_model``) plus the members of a deep ensemble,
loaded from lightning-ood checkpoints like :class:`~lightning_ood.detectors.DeepEnsemble`'s
and stored with the detector. Each network's FSS lives in its own :class:`FSSD` sub-detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.detectors.base import Detector, OptInput, OptModel, Reducer, truthy
from lightning_ood.detectors.fssd import FSSD
from lightning_ood.detectors.hparams import HParam
from lightning_ood.detectors.layer_ensemble import LayerEnsembleDetector
from lightning_ood.detectors.members import MemberEnsemble
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


@register_detector
class FSSDEnsemble(MemberEnsemble, LayerEnsembleDetector):
    """Logistic regression over FSSD_{n,l} for every network n and tap l (higher = more ID).

    Components are ordered network-major: the tested model's taps first (with
    ``include_model``), then member 1's, and so on; :meth:`component_names` labels them
    ``model/<tap>``, ``member1/<tap>``, ...

    The networks are :class:`~lightning_ood.detectors.members.MemberEnsemble`'s
    ``checkpoints`` (or ``checkpoint_template`` + ``seeds``), same recipe, other seeds; ``taps``
    are per network (every network has the same architecture), ``None`` = every
    ``tap_layers`` entry then ``"logits"``, as :class:`FSSD`. The noise pass of each network
    (every network sees the same noise) and the logistic combiner are as :class:`FSSD`'s;
    without a fitted combiner the score is component ``default_layer``. No training pass:
    everything but the networks and their taps acts at finalize or later (each network's FSSD
    takes the noise settings from here at :meth:`finalize`).

    Input pre-processing is not offered: it would cost N·K extra backward passes per batch.
    """

    kind: ClassVar[str] = "fssd_ensemble"
    requires_fit: ClassVar[bool] = True
    uses_training_data: ClassVar[bool] = False
    #: No input pre-processing: these replace the layer ensembles' hyperparameters.
    epsilon: ClassVar[float] = 0.0
    input_std: ClassVar[None] = None
    include_model = HParam(
        True,
        truthy,
        doc="the tested network is one of the ensemble's networks (default)",
    )
    noise = FSSD.hparams["noise"]
    n_noise = FSSD.hparams["n_noise"]
    noise_seed = FSSD.hparams["noise_seed"]
    batch_size = FSSD.hparams["batch_size"]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_members(self.kind)
        n = len(self.paths) + self.include_model
        # One FSSD per network; each owns its network's FSS.
        self.fssds = nn.ModuleList(
            FSSD(
                taps=self._taps_arg,
                noise=self.noise,
                n_noise=self.n_noise,
                noise_seed=self.noise_seed,
                batch_size=self.batch_size,
                name=f"{self.name}_{i}",
            )
            for i in range(n)
        )

    # -- networks and components --------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        """One label per network, in component order."""
        return ["model"] * self.include_model + [f"member{i + 1}" for i in range(len(self.paths))]

    def _networks(self, model: OODBackbone | None) -> list[OODBackbone | None]:
        return [model] * self.include_model + list(self.members)

    @property
    def taps(self) -> tuple[str, ...]:
        """The taps read from the tested model's forward pass (none without ``include_model``)."""
        return self.fssds[0].taps if self.include_model else ()

    def tap_names(self, backbone: OODBackbone) -> tuple[str, ...]:
        return self.fssds[0].tap_names(backbone) if self.include_model else ()

    def component_names(self, backbone: OODBackbone) -> tuple[str, ...]:
        nets = self._networks(backbone)
        nets += [None] * (len(self.fssds) - len(nets))  # members not loaded yet
        names: list[str] = []
        for label, fssd, net in zip(self.labels, self.fssds, nets, strict=True):
            taps = fssd.taps or (fssd.tap_names(net) if net is not None else ())
            if not taps:
                raise ValueError(
                    f"{self.name}: the taps of {label} are unknown until its member checkpoint "
                    "is loaded or the detector is fitted; name `taps` in the config"
                )
            names += [f"{label}/{t}" for t in taps]
        return tuple(names)

    @property
    def num_components(self) -> int | None:
        """N·K once every network's taps are known."""
        counts = [len(f.taps) for f in self.fssds]
        return sum(counts) if all(counts) else None

    @property
    def needs_inputs(self) -> bool:
        """The members run on the inputs: cached features cannot score the ensemble."""
        return True

    # -- fitting ------------------------------------------------------------------------------
    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Each network's FSS from the same noise (FSSD's noise pass, once per network)."""
        self.check_members(model)
        for fssd, net in zip(self.fssds, self._networks(model), strict=True):
            for key in ("noise", "n_noise", "noise_seed", "batch_size"):
                setattr(fssd, key, getattr(self, key))
            fssd.finalize(net, reducer)
        self.fitted.fill_(True)

    def mark_unfitted(self) -> None:
        super().mark_unfitted()
        for fssd in self.fssds:
            fssd.mark_unfitted()

    # -- scoring ------------------------------------------------------------------------------
    def score_components(
        self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None
    ) -> Tensor:
        """FSSD_{n,l} of every network and tap, shape (B, N·K) in float32: the tested model's
        from the shared forward pass ``out``, each member's from one forward of its own."""
        self.check_fitted()
        if inputs is None:
            raise ValueError(
                f"{self.name}: FSSDEnsemble scores need `inputs` (every member runs on them); "
                "cached features cannot score it"
            )
        self.check_members(model)
        fssds: Sequence[Detector] = list(self.fssds)
        cols = []
        if self.include_model:
            cols.append(fssds[0].score_components(out))
            fssds = fssds[1:]
        for fssd, member in zip(fssds, self.members, strict=True):
            was_training = member.training
            member.eval()  # frozen members score in eval mode whatever the trainer set
            try:
                with torch.no_grad():
                    mine = member.extract(inputs, taps=fssd.taps)
            finally:
                member.train(was_training)
            cols.append(fssd.score_components(mine))
        return torch.cat(cols, dim=1)


__all__ = ["FSSDEnsemble"]
