"""The fit-path speed-ups keep the results: selection-based percentiles equal the sort-based
ones bit for bit, the Cholesky precision equals ``pinv``, and the shared batch Gram matrix is
recomputed whenever its batch changes."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from lightning_ood.detectors import mahalanobis as maha
from lightning_ood.detectors.base import BatchMemo, percentile
from lightning_ood.detectors.mahalanobis import batch_gram, covariance_pinv
from lightning_ood.detectors.quantile import kth_percentile


@pytest.mark.parametrize("p", [0.0, 12.5, 37.5, 50.0, 90.0, 99.9, 100.0])
def test_kth_percentile_is_the_sort_based_percentile_bit_for_bit(p: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_001, generator=g).round(decimals=1)  # many ties
    for v in (x, x[:7], x[:1], x.double()):
        got, want = kth_percentile(v, p), percentile(v, p)
        assert got.dtype == want.dtype and torch.equal(got, want), (p, v.numel())
        assert float(got) == pytest.approx(float(np.percentile(v.double().numpy(), p)), abs=1e-6)
    with pytest.raises(ValueError, match="empty"):
        kth_percentile(x[:0], p)


def test_covariance_pinv_equals_pinv_regular_and_singular() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 20, generator=g, dtype=torch.float64)
    cov = a.T @ a / 500  # well conditioned: the Cholesky path
    torch.testing.assert_close(
        covariance_pinv(cov), torch.linalg.pinv(cov, hermitian=True), rtol=1e-10, atol=1e-12
    )
    a[:, 3] = 0.0  # a dead unit: singular, pinv drops its eigenvalue
    a[:, 7] = a[:, 8]
    sing = a.T @ a / 500
    torch.testing.assert_close(
        covariance_pinv(sing), torch.linalg.pinv(sing, hermitian=True), rtol=1e-9, atol=1e-9
    )


def test_batch_gram_is_shared_per_batch_and_never_stale() -> None:
    f = torch.randn(64, 5)
    first = batch_gram(f)
    torch.testing.assert_close(first, f.double().T @ f.double(), rtol=1e-12, atol=1e-12)
    assert batch_gram(f) is first  # a second detector on the same batch: no recompute
    f.add_(1.0)  # modified in place: the version counter moves, the product is recomputed
    second = batch_gram(f)
    assert second is not first
    torch.testing.assert_close(second, f.double().T @ f.double(), rtol=1e-12, atol=1e-12)
    other = f.clone()  # equal values, another tensor: computed for it
    assert batch_gram(other) is not second
    del f, other
    gc.collect()
    assert maha._GRAM.empty  # freed batches are forgotten, never kept alive


def test_batch_memo_keys_on_tensor_version_key_and_owners_and_skips_inference_tensors() -> None:
    memo, calls = BatchMemo(), []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    x, model, other = torch.randn(3), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert memo.get(x, "a", compute, owners=(model,)) == 1
    assert memo.get(x, "a", compute, owners=(model,)) == 1  # hit
    assert memo.get(x, "b", compute, owners=(model,)) == 2  # another key
    assert memo.get(x, "b", compute, owners=(other,)) == 3  # another owner
    assert memo.get(x.clone(), "b", compute, owners=(other,)) == 4  # another tensor
    with torch.inference_mode():
        inf = torch.randn(3)
    assert memo.get(inf, "b", compute) == 5 and memo.get(inf, "b", compute) == 6  # never kept


def test_mcd_scores_inference_tensors() -> None:
    """Under Lightning's default inference mode a batch moved to the GPU is an inference
    tensor, which has no version counter: MC Dropout must still score it (unmemoised)."""
    from lightning_ood.detectors import MCDropout, MCDropoutVar
    from lightning_ood.models import create_model

    torch.manual_seed(0)
    net = create_model("lenet", num_classes=10, in_channels=1).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        out = net.extract(x)
    want = MCDropout(passes=4).score(out, net, x), MCDropoutVar(passes=4).score(out, net, x)
    with torch.inference_mode():
        xi = x.clone()
        got = MCDropout(passes=4).score(out, net, xi), MCDropoutVar(passes=4).score(out, net, xi)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
