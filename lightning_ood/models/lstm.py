"""Bidirectional LSTM classifier for bacterial genome fragments (Ren et al. 2019 setting).

FSSD evaluates a BiLSTM on 250-base fragments over {A, C, G, T} with 10 in-distribution
classes; its reference code does not include the model, so the sizes here are our choice:

- embedding 32: four tokens need very little capacity, and 32 keeps the first LSTM layer's
  input projection cheap;
- hidden 128 per direction, 2 layers: q = 256 features, ~0.6 M parameters, which trains on a
  CPU or small GPU in reasonable time while being large enough to separate 10 genera;
- mean pooling over positions of the top layer's states (both directions): every position
  contributes, whereas the last state of the backward direction at the final position would
  have seen one base only. The mean also gives a length-independent feature scale, which
  distance-based detectors (Mahalanobis, FSSD) rely on.
"""

from __future__ import annotations

import os

from torch import Tensor, nn

from lightning_ood.checks import check_at_least
from lightning_ood.models.base import OODBackbone
from lightning_ood.models.registry import register_model
from lightning_ood.models.weights import load_weights

#: The genome vocabulary in token order (A=0, C=1, G=2, T=3); the one definition, which the
#: TSV reader :mod:`lightning_ood.data.genome` imports (this module stays Lightning-free).
GENOME_VOCAB = ("A", "C", "G", "T")


class GenomeLSTM(OODBackbone):
    """Embedding -> 2-layer BiLSTM -> mean over positions -> linear classifier.

    Args:
        num_classes: classifier outputs.
        seq_len: fragment length the model is meant for (sets ``input_shape``; the forward pass
            itself accepts any length).
        embed_dim: token embedding width.
        hidden: LSTM hidden size per direction; features are 2 * hidden wide.
        num_layers: stacked BiLSTM layers.
    """

    def __init__(
        self,
        num_classes: int = 10,
        seq_len: int = 250,
        embed_dim: int = 32,
        hidden: int = 128,
        num_layers: int = 2,
    ) -> None:
        super().__init__()
        check_at_least(
            1,
            num_classes=num_classes,
            seq_len=seq_len,
            embed_dim=embed_dim,
            hidden=hidden,
            num_layers=num_layers,
        )
        self.vocab_size = len(GENOME_VOCAB)
        self.embedding = nn.Embedding(self.vocab_size, embed_dim)
        self.lstm = nn.LSTM(
            embed_dim, hidden, num_layers=num_layers, batch_first=True, bidirectional=True
        )
        self.fc = nn.Linear(2 * hidden, num_classes)

        self.num_classes = num_classes
        self.num_features = 2 * hidden
        self.input_shape = (seq_len,)
        self.input_kind = "tokens"
        # The LSTM returns (output, (h_n, c_n)); the tap hook keeps output, (B, T, 2 * hidden).
        self.tap_layers = {"embedding": "embedding", "lstm": "lstm"}

    def forward_features(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.dtype.is_floating_point or x.dtype.is_complex:
            raise ValueError(
                f"GenomeLSTM expects integer token ids of shape (B, T), got dtype {x.dtype} and "
                f"shape {tuple(x.shape)}; encode bases as A=0, C=1, G=2, T=3"
            )
        if ((x < 0) | (x >= self.vocab_size)).any():
            raise ValueError(
                f"GenomeLSTM token ids must lie in [0, {self.vocab_size}) (A=0, C=1, G=2, T=3), "
                f"got values in [{int(x.min())}, {int(x.max())}]"
            )
        out, _ = self.lstm(self.embedding(x))
        return out.mean(dim=1)

    def get_classifier(self) -> nn.Linear:
        return self.fc


@register_model("genome_lstm")
def genome_lstm(
    num_classes: int = 10,
    seq_len: int = 250,
    embed_dim: int = 32,
    hidden: int = 128,
    weights: str | os.PathLike[str] | None = None,
) -> GenomeLSTM:
    """The BiLSTM genome classifier; ``weights`` is an optional state_dict/.ckpt path."""
    model = GenomeLSTM(num_classes=num_classes, seq_len=seq_len, embed_dim=embed_dim, hidden=hidden)
    if weights is not None:
        load_weights(model, weights, model_name="genome_lstm")
    return model
