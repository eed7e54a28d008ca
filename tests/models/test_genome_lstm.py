"""The BiLSTM genome classifier: tokens in, mean-pooled BiLSTM states out."""

from __future__ import annotations

import pytest
import torch

from lightning_ood.models import create_model
from lightning_ood.models.lstm import GenomeLSTM


def test_features_are_the_mean_of_the_lstm_tap() -> None:
    model = create_model("genome_lstm", seq_len=50, embed_dim=8, hidden=16).eval()
    assert model.input_kind == "tokens" and model.vocab_size == 4
    assert model.input_shape == (50,)
    assert model.num_features == 32
    x = model.example_input(3)
    assert x.dtype == torch.int64 and int(x.min()) >= 0 and int(x.max()) <= 3
    with torch.no_grad():
        out = model.extract(x, ["embedding", "lstm"])
        manual, _ = model.lstm(model.embedding.weight[x])
    assert out.taps["embedding"].shape == (3, 50, 8)
    assert out.taps["lstm"].shape == (3, 50, 32)
    torch.testing.assert_close(out.taps["lstm"], manual)
    torch.testing.assert_close(out.features, manual.mean(dim=1))


def test_bidirectional_states_see_the_whole_sequence() -> None:
    """Changing the last base moves the first position's backward state, not its forward one."""
    torch.manual_seed(0)
    one_layer = GenomeLSTM(seq_len=20, hidden=8, num_layers=1).eval()
    two_layer = create_model("genome_lstm", seq_len=20, hidden=8).eval()
    x = torch.zeros(1, 20, dtype=torch.long)
    y = x.clone()
    y[0, -1] = 3
    fwd, bwd = slice(0, 8), slice(8, 16)
    with torch.no_grad():
        a, b = (one_layer.extract(t, ["lstm"]).taps["lstm"][0, 0] for t in (x, y))
        assert torch.equal(a[fwd], b[fwd])  # a forward state sees only the past
        assert (a[bwd] - b[bwd]).abs().max() > 1e-4
        # Two layers: the top forward state sees layer 1's backward states, hence the future too.
        a, b = (two_layer.extract(t, ["lstm"]).taps["lstm"][0, 0] for t in (x, y))
        assert (a[fwd] - b[fwd]).abs().max() > 1e-5
        assert (a[bwd] - b[bwd]).abs().max() > 1e-4


def test_bad_tokens_are_rejected() -> None:
    model = create_model("genome_lstm")
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        model(torch.tensor([[0, 1, 4]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.rand(2, 250))
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        create_model("genome_lstm", hidden=0)
